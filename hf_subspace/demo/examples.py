"""What the example scripts (``examples/<task>/train.py``) share: arguments, the run, the saved result.

Example code, not the library (the old path ``hf_subspace.examples_support`` is a deprecated alias).


Every example parses its command line with ``HfArgumentParser`` over three dataclasses — :class:`ExampleArguments`
(model, data, the subspace choice), the example's own small dataclass, and :class:`SubspaceTrainingArguments` —
so every ``Trainer`` flag works (``--max_steps``, ``--per_device_train_batch_size``, ``--report_to``, ...), and
the same script runs under ``python``, ``torchrun`` and ``accelerate launch``. :func:`run_example` then evaluates
the untrained model, trains, evaluates again, saves the adapter (or the model) with a card that records the task,
the data, the metric before and after, d, D and the size, and pushes it with ``--push_to_hub``.

``--subspace`` picks what is trained:

=============================================  =================================================================
``hashing`` / ``fastfood`` / ``sparse`` /      a random subspace of dimension ``--subspace_dim`` (mode
``dense``                                      ``--subspace_mode global|said``, over ``--target_modules``)
``twa``                                        one-run Trainable Weight Averaging: ordinary training with
                                               snapshots, then the coefficients of the trajectory basis
``none``                                       ordinary training of every weight (the baseline)
=============================================  =================================================================
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..trainer import SubspaceTrainer, SubspaceTrainingArguments

logger = logging.getLogger(__name__)

SUBSPACE_CHOICES = ("none", "hashing", "fastfood", "sparse", "dense", "twa")
RANDOM_SUBSPACES = ("hashing", "fastfood", "sparse", "dense")


@dataclass
class ExampleArguments:
    """The model, the data and what to train; the example's docstring lists its defaults."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "a Hub model name or a local path (default: the example's offline model)"})
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "a Hub data set name (default: the example's offline data)"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "the Hub data set's configuration"})
    subspace: str = field(default="hashing", metadata={
        "help": "what to train: a random subspace (hashing, fastfood, sparse, dense) of dimension --subspace_dim, "
                "twa (Trainable Weight Averaging), or none (every weight)", "choices": SUBSPACE_CHOICES})
    target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "the modules whose weights form θ, e.g. q_proj v_proj (default: every weight)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use at most this many for training"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "evaluate on at most this many"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace the result an earlier run saved in OUTPUT_DIR/final (without it such a run is refused "
                "before training starts)"})


# the Trainer defaults that every example changes (each example adds its own)
COMMON_DEFAULTS = dict(seed=0, save_strategy="no", eval_strategy="no", logging_steps=10, report_to="none",
                       per_device_eval_batch_size=64,
                       # transformers 5 multiplies the loss by the number of processes when the model's forward
                       # takes **kwargs, for losses divided by the global token count; the classification losses
                       # are plain means (the language-modeling example turns it back on)
                       average_tokens_across_devices=False,
                       dataloader_pin_memory=torch.cuda.is_available())


def parse_args(task_class, defaults: dict, baseline_defaults: Optional[dict] = None,
               twa_defaults: Optional[dict] = None, argv: Optional[list[str]] = None):
    """``(example, task, training)`` from the command line (``argv``; default ``sys.argv[1:]``).

    ``defaults`` overrides the Trainer's own defaults for this example (``output_dir``, ``learning_rate``,
    ``subspace_dim``, ...); ``baseline_defaults`` replaces some of them for ``--subspace none`` and
    ``twa_defaults`` for ``--subspace twa`` (e.g. another learning rate). Anything on the command line wins.
    The subspace seed follows ``--seed`` unless ``--subspace_seed`` is given, and the random state is seeded from
    ``--seed`` here, so a model the example builds next (a new classification head) is the same in every run.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ExampleArguments, task_class, SubspaceTrainingArguments))
    parser.set_defaults(**{**COMMON_DEFAULTS, **defaults})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # torchrun on CPU: accelerate makes a multi-CPU (DDP) run only with cpu=True; with a backend alone it opens
        # the process group but runs N unsynchronized single-process trainings (parallel_mode NOT_PARALLEL), whose
        # evaluations each score a padded copy of the whole set
        parser.set_defaults(ddp_backend="gloo", use_cpu=True)
    known, _ = parser.parse_known_args(argv)
    extra = {"none": baseline_defaults, "twa": twa_defaults}.get(known.subspace) or {}
    parser.set_defaults(**extra, subspace_seed=known.seed)
    example, task, training = parser.parse_args_into_dataclasses(args=argv)
    from transformers import set_seed

    _keep_earlier_result(example, training)
    set_seed(training.seed)  # before the example builds its model: a new head (or a model from a config) from --seed
    return example, task, subspace_training_args(example, training)


def _keep_earlier_result(example: ExampleArguments, training: SubspaceTrainingArguments) -> None:
    """Refuse, before anything is trained, a run that would overwrite an earlier run's saved result."""
    final = os.path.join(training.output_dir, "final")
    held = sorted(os.listdir(final)) if os.path.isdir(final) else []
    if held and not example.overwrite_output_dir and not training.resume_from_checkpoint:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ValueError(f"{final} holds the result of an earlier run ({shown}): pass --output_dir DIR to save this "
                         "run elsewhere, or --overwrite_output_dir to replace it")


def subspace_training_args(example: ExampleArguments, training: SubspaceTrainingArguments):
    """``training`` with ``example.subspace`` and ``example.target_modules`` applied (``--subspace`` decides; for
    ``twa`` it becomes :class:`~hf_subspace.TWATrainingArguments`)."""
    changes = {}
    # --push_to_hub uploads the final result with our card at the end (run_example), not the Trainer's checkpoints
    example.push_at_end = bool(training.push_to_hub or getattr(example, "push_at_end", False))
    if example.subspace == "twa":  # TWATrainingArguments: the Trainer's and the twa_* settings, no subspace_* ones
        from ..twa.arguments import as_twa_arguments

        return dataclasses.replace(as_twa_arguments(training), push_to_hub=False)
    if example.subspace in RANDOM_SUBSPACES:
        if training.subspace_dim is None:
            raise ValueError(f"--subspace {example.subspace} needs --subspace_dim")
        changes.update(subspace_projection=example.subspace)
    else:
        changes.update(subspace_dim=None)
    if example.subspace == "none":  # every weight: the example's subspace defaults (and --seed's) do not apply
        from ..trainer import _subspace_defaults

        changes.update(_subspace_defaults())
    elif example.target_modules:
        changes.update(subspace_target_modules=list(example.target_modules))
    changes.update(push_to_hub=False)
    return dataclasses.replace(training, **changes)


def run_script(main: Callable) -> None:
    """What an example's ``if __name__ == "__main__"`` runs: ``main()``, with a wrong input (``--subspace_dim 0``,
    a missing data package, ...) reported on one ``error:`` line and exit status 2, as ``hf-subspace`` does;
    ``--debug`` (or ``HF_SUBSPACE_DEBUG=1``) shows the traceback instead."""
    import sys

    from ..cli import run_reporting_errors

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    def call():
        main()
        return 0

    sys.exit(run_reporting_errors(call, debug=debug))


def take(dataset, n: Optional[int]):
    """The first ``n`` items of ``dataset`` (all when ``n`` is None): a ``datasets.Dataset`` or any sequence."""
    if n is None or n >= len(dataset):
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(range(n))
    return torch.utils.data.Subset(dataset, range(n))


def accuracy_metrics(eval_pred) -> dict:
    """``compute_metrics`` for classification: accuracy of the arg-max class (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits, labels = torch.as_tensor(np.asarray(logits)), torch.as_tensor(np.asarray(labels))
    acc = multiclass_accuracy(logits.argmax(-1), labels, num_classes=logits.shape[-1], average="micro")
    return {"accuracy": float(acc)}


def coco_map(predictions: list[dict], targets: list[dict]) -> dict:
    """COCO box mAP by pycocotools (the reference implementation of the COCO protocol).

    ``predictions[i]``: ``boxes`` ``(n, 4)`` absolute ``x_min, y_min, x_max, y_max``, ``scores`` ``(n,)``,
    ``labels`` ``(n,)`` for image i; ``targets[i]``: ``boxes`` and ``labels`` of its ground truth. Returns
    ``{"map": mAP@[.5:.95], "map_50": mAP@.5}`` (0 when nothing was predicted; -1 when there is no ground truth).
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        b = [float(v) for v in b]
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    images, annotations, detections, categories = [], [], [], set()
    for i, (pred, target) in enumerate(zip(predictions, targets)):
        images.append({"id": i})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            w, h = xywh(box)[2:]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                                "bbox": xywh(box), "area": w * h, "iscrowd": 0})
            categories.add(int(label))
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            detections.append({"image_id": i, "category_id": int(label), "bbox": xywh(box), "score": float(score)})
            categories.add(int(label))
    if not annotations:
        return {"map": -1.0, "map_50": -1.0}
    if not detections:
        return {"map": 0.0, "map_50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c} for c in sorted(categories)]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": max(0.0, float(evaluation.stats[0])), "map_50": max(0.0, float(evaluation.stats[1]))}


def gather_lists(items: list) -> list:
    """Concatenate every process's ``items`` in rank order (``items`` itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def describe_subspace(trainer) -> dict:
    """d, D and what was trained, for the card and the log (empty for ``--subspace none``)."""
    info = trainer.subspace_info()
    return {"d": info["subspace_d"], "D": info["subspace_D"]} if info else {}


def _label_metrics(metrics: dict, metric: str, prefix: str) -> Optional[float]:
    value = metrics.get(f"{prefix}_{metric}")
    return float(value) if isinstance(value, (int, float)) else None


def run_example(trainer: SubspaceTrainer, example: ExampleArguments, *, task: str, metric: str,
                training_data: str, training_data_ids=(), base_model_id: Optional[str] = None,
                evaluate: Optional[Callable[[str], dict]] = None, after_training: Optional[Callable] = None,
                save_base: bool = False) -> dict:
    """Evaluate, train, evaluate, save (and push): what every example does with its trainer.

    ``metric`` names the headline metric (``"accuracy"``; the Trainer's ``eval_`` / ``before_`` prefixes are
    added). ``evaluate(prefix)`` replaces ``trainer.evaluate(metric_key_prefix=prefix)`` (e.g. to add mAP).
    ``base_model_id`` is the Hub id to record for an offline default base (else the model's own name).
    ``save_base``: the base was built from a config (a random θ0 no hub holds), so it is saved, before training,
    to ``output_dir/final/base`` and the adapter points there. The adapter goes to ``output_dir/final`` and all
    metrics to ``output_dir/all_results.json``; returns the metrics after training, plus ``before_*``.
    """
    args: SubspaceTrainingArguments = trainer.args
    evaluate = evaluate or (lambda prefix: trainer.evaluate(metric_key_prefix=prefix))
    config = trainer.model.peft_config["default"] if hasattr(trainer.model, "peft_config") else None
    if config is not None:
        if base_model_id:
            config.base_model_name_or_path = base_model_id
        config.training_data = training_data
        config.training_data_ids = list(training_data_ids) or None
        if save_base:
            base_dir = os.path.join(args.output_dir, "final", "base")
            if trainer.is_world_process_zero():  # c = 0 before training: the plain checkpoint is exactly θ0
                trainer.model.get_base_model().save_pretrained(base_dir)
            config.base_model_name_or_path = base_dir

    before = evaluate("before")
    resume = args.resume_from_checkpoint  # --resume_from_checkpoint PATH, or "last" / "true": the newest complete one
    if isinstance(resume, str) and resume.lower() in ("last", "true", "latest"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    after = evaluate("eval")
    trainer.save_metrics("before", before)
    trainer.save_metrics("eval", after)  # output_dir/all_results.json holds both (what intrinsic-dim --script reads)
    first, last = _label_metrics(before, metric, "before"), _label_metrics(after, metric, "eval")
    summary = {"task": task, f"{metric} before training": first, f"{metric} after training": last,
               **describe_subspace(trainer), "subspace": example.subspace}
    if after_training is not None:
        summary.update(after_training(trainer) or {})
    final = os.path.join(args.output_dir, "final")
    saved = save_result(trainer, example, final, summary, training_data)
    if trainer.is_world_process_zero():
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}, indent=1))
        print(f"{metric}: {first:.4f} before training -> {last:.4f} after" if first is not None and last is not None
              else f"{metric}: see {os.path.join(args.output_dir, 'all_results.json')}")
        print(f"saved to {saved['folder']} ({saved['what']}: {saved['size']}); model card: {saved['card']}")
    if getattr(example, "push_at_end", False):
        push_result(trainer, example, saved)
    return {**before, **after}


def _size(path: str) -> str:
    from ..hub import exact_bytes

    return exact_bytes(os.path.getsize(path))


def save_result(trainer: SubspaceTrainer, example: ExampleArguments, folder: str, summary: dict,
                training_data: str) -> dict:
    """Save the adapter (random subspace), the TWA base + adapter, or the whole model (``none``) with a card."""
    from ..hub import adapter_file

    metrics = {k: v for k, v in summary.items() if v is not None}
    if example.subspace in RANDOM_SUBSPACES:
        trainer.model.peft_config["default"].training_metrics = metrics
        trainer.save_model(folder)  # PeftModel.save_pretrained: the adapter and our card
        weights = adapter_file(folder)
        return {"folder": folder, "what": "adapter", "size": _size(weights) if weights else "?",
                "card": os.path.join(folder, "README.md")}
    if example.subspace == "twa":
        from ..twa import save_twa_adapter

        if trainer.is_world_process_zero():
            save_twa_adapter(trainer.model, trainer.twa_result, folder, training_metrics=metrics,
                             training_data=training_data)
        adapter = os.path.join(folder, "adapter")
        weights = adapter_file(adapter) if os.path.isdir(adapter) else None
        return {"folder": folder, "what": "TWA adapter (k x D basis and c; the base is the snapshot mean in base/)",
                "size": _size(weights) if weights else "?", "card": os.path.join(adapter, "README.md")}
    trainer.save_model(folder)
    peft_config = getattr(trainer.model, "peft_config", None)
    if peft_config:  # an adapter of another PEFT method (the detection example's --lora_rank): peft's files, our card
        weights = adapter_file(folder)
        kind = str(getattr(peft_config.get("default"), "peft_type", "PEFT")).split(".")[-1]
        if trainer.is_world_process_zero():
            from ..atomic import write_text

            write_text(os.path.join(folder, "README.md"), _plain_card(summary, training_data, adapter=kind))
        return {"folder": folder, "what": f"{kind} adapter (on the unchanged base)",
                "size": _size(weights) if weights else "?", "card": os.path.join(folder, "README.md")}
    if trainer.is_world_process_zero():
        from ..atomic import write_text

        write_text(os.path.join(folder, "README.md"), _plain_card(summary, training_data))
    weights = os.path.join(folder, "model.safetensors")
    return {"folder": folder, "what": "full model", "size": _size(weights) if os.path.isfile(weights) else "?",
            "card": os.path.join(folder, "README.md")}


def _plain_card(summary: dict, training_data: str, adapter: Optional[str] = None) -> str:
    """The card of an example's baseline: every weight trained, or (``adapter``: its PEFT type) another PEFT
    method's adapter on the frozen base."""
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in summary.items() if v is not None)
    if adapter:
        head = (f"---\nlibrary_name: peft\ntags:\n- hf-subspace\n- {adapter.lower()}\n---\n\n# {summary['task']} "
                f"({adapter} adapter)\n\nA baseline of an hf_subspace example: a {adapter} adapter trained on the "
                f"frozen base; read it back with `PeftModel.from_pretrained(base, FOLDER)`.\n\n")
    else:
        head = (f"---\nlibrary_name: transformers\ntags:\n- hf-subspace\n---\n\n# {summary['task']} (every weight "
                f"trained)\n\nThe baseline of an hf_subspace example: ordinary training of all weights.\n\n")
    return f"{head}## Training data\n\n{training_data}\n\n## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n"


def push_result(trainer: SubspaceTrainer, example: ExampleArguments, saved: dict):
    """Upload what :func:`save_result` wrote to ``--hub_model_id`` (default: the output folder's name)."""
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    if example.subspace in RANDOM_SUBSPACES:  # hf_subspace.hub.push_to_hub: our card, the exact adapter bytes
        return trainer.model.push_to_hub(repo_id, private=args.hub_private_repo, token=args.hub_token)
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=saved["folder"], commit_message="Upload hf_subspace example")


__all__ = ["COMMON_DEFAULTS", "ExampleArguments", "SUBSPACE_CHOICES", "accuracy_metrics", "coco_map", "gather_lists",
           "parse_args",
           "run_example", "run_script", "save_result", "subspace_training_args", "take"]
