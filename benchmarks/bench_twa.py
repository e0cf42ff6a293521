"""Trainable Weight Averaging (TWA) against full-budget SGD and SWA, at CPU scale on Fashion-MNIST.

The TWA paper (Li et al., ICLR 2023) trains CIFAR models for 200 epochs with SGD (lr 0.1, divided by 10 at
epochs 100 and 150) and shows that 100 ordinary epochs at the constant lr (a snapshot after each) followed by
10 epochs of TWA coefficient training match or beat the 200-epoch run (~40% less time) and beat SWA of the same
snapshots. This script repeats that protocol with E epochs instead of 200::

    python benchmarks/bench_twa.py [--epochs 10] [--train-size 30000] [--seeds 0,1,2] [--out benchmarks/results]
    python benchmarks/bench_twa.py --quick          # tiny smoke run, ~1-2 minutes

Arms (for each seed: the same model initialization, the same data and the same data order):

* **SGD** — SGD (momentum 0.9, weight decay 1e-4) for E epochs, lr 0.1 divided by 10 at E/2 and 3E/4.
* **TWA** — ``TWATrainer``: E/2 epochs of that run (the lr is still constant there), a snapshot
  every ``twa_snapshot_steps`` steps, then ``twa_epochs`` = E/10 epochs of TWA coefficient training (SGD
  momentum 0.9, lr ``twa_learning_rate`` divided by 10 at 50% and 75%, weight decay 1e-5); BatchNorm is
  recalibrated after averaging and at the end. This is the library's one-run TWA code path, unchanged.
* **SWA** — the uniform average of the same snapshots with recalibrated BatchNorm (the point TWA starts from).
* references: the last iterate of the E/2-epoch ordinary phase (what TWA starts from before averaging) and,
  unless ``--no-short-sgd``, **SGD-short**: ordinary SGD with the same step schedule compressed into TWA's
  budget of E/2 + E/10 epochs (is TWA better than simply training for less time?).

``twa_learning_rate`` is chosen on seed 0 with a validation split taken from the training images (never the
test set), unless ``--twa-lr`` is given. Test accuracy is measured on the 10,000 Fashion-MNIST test images.
Wall-clock times exclude evaluation. Results go to ``<out>/twa.json`` and ``<out>/twa.md``.

The model is a small plain ``torch.nn.Module`` CNN (3 conv-BN-ReLU blocks, max pooling, global average
pooling, a linear head); its ``forward(pixel_values, labels=None)`` returns a dict with ``loss`` and ``logits``
so it runs through ``transformers.Trainer`` as any HF model does.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _setup import REPO  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)
import _harness  # noqa: E402
from _harness import benchmark_parser, markdown_table, write_report  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from hf_subspace.demo.data import load_image_classification  # noqa: E402
from hf_subspace import SubspaceTrainer, SubspaceTrainingArguments, TWATrainer, TWATrainingArguments  # noqa: E402
from hf_subspace.twa import run_twa_phase  # noqa: E402
from hf_subspace.twa.arguments import TWA_LR_SCHEDULES, TWA_OPTIMIZERS  # noqa: E402
from hf_subspace.twa import recalibrate_batchnorm  # noqa: E402

DATA_SPLIT_SEED = 1234  # the train/validation split is the same for every seed and arm
NORM_MEAN, NORM_STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


# ================================================================================================================
# model and data
# ================================================================================================================
class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU (c1) → maxpool → conv-BN-ReLU (c2) → maxpool → conv-BN-ReLU (c3) → GAP → linear.

    Input ``pixel_values``: float ``(B, 1, 28, 28)``; output dict ``logits`` ``(B, 10)`` and, with ``labels``
    ``(B,)``, the cross-entropy ``loss``.
    """

    def __init__(self, channels=(16, 32, 32), num_classes: int = 10):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, pixel_values, labels=None):
        h = self.features(pixel_values).mean(dim=(2, 3))
        logits = self.classifier(h)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class ImageDataset(torch.utils.data.Dataset):
    """Normalized ``(N, 1, 28, 28)`` float images; items are ``{"pixel_values", "labels"}`` dicts.

    ``augment``: random 28x28 crop of the image padded by 2 pixels and a random horizontal flip (torch's global
    RNG, which the Trainer seeds).
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.x = ((images_uint8.float() / 255.0 - NORM_MEAN) / NORM_STD).unsqueeze(1).contiguous()
        self.y = labels.long().contiguous()
        self.augment = augment
        self.padded = F.pad(self.x, (2, 2, 2, 2)) if augment else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.augment:
            dy, dx, flip = torch.randint(0, 5, (3,)).tolist()
            img = self.padded[i, :, dy:dy + 28, dx:dx + 28]
            if flip % 2:
                img = img.flip(-1)
        else:
            img = self.x[i]
        return {"pixel_values": img, "labels": self.y[i]}


def load_data(train_size: int, val_size: int, test_size: int | None, augment: bool):
    data = load_image_classification("fashion_mnist")
    n_train_all = len(data.train.labels)
    val_size = min(val_size, n_train_all // 5)
    train_size = min(train_size, n_train_all - val_size)
    order = torch.randperm(n_train_all, generator=torch.Generator().manual_seed(DATA_SPLIT_SEED))
    tr, va = order[:train_size], order[train_size:train_size + val_size]
    n_test = len(data.test.labels) if test_size is None else min(test_size, len(data.test.labels))
    return {
        "name": data.name, "source": data.source,
        "train": ImageDataset(data.train.images[tr], data.train.labels[tr], augment=augment),
        "val": ImageDataset(data.train.images[va], data.train.labels[va]),
        "test": ImageDataset(data.test.images[:n_test], data.test.labels[:n_test]),
    }


@torch.no_grad()
def accuracy(model: nn.Module, ds: ImageDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (eval mode; the model's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for a in range(0, len(ds), batch_size):
        logits = model(ds.x[a:a + batch_size])["logits"]
        correct += int((logits.argmax(-1) == ds.y[a:a + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(ds)


def param_checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


# ================================================================================================================
# runs
# ================================================================================================================
class PhaseProbe(TrainerCallback):
    """Times the ordinary phase, and evaluates the model where it ends (evaluation time is recorded apart).

    ``at_step``: probe after that optimizer step (for the SGD arm: where TWA's ordinary phase would stop);
    otherwise probe at ``on_train_end`` of the ordinary phase (TWATrainer runs TWA after it).
    """

    def __init__(self, data, at_step: int | None = None):
        self.data, self.at_step = data, at_step
        self.t_begin = self.t_end = None
        self.eval_seconds = 0.0
        self.result: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_begin = time.perf_counter()

    def _probe(self, model, step):
        t0 = time.perf_counter()
        self.result = {"step": int(step), "checksum": param_checksum(model),
                       "val_acc": accuracy(model, self.data["val"]), "test_acc": accuracy(model, self.data["test"])}
        self.eval_seconds += time.perf_counter() - t0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.at_step is not None and state.global_step == self.at_step:
            self._probe(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at_step is None and self.result is None:
            self._probe(model, state.global_step)
        self.t_end = time.perf_counter()


def steps_per_epoch(cfg) -> int:
    return math.ceil(cfg.train_size_actual / cfg.batch_size)


def make_args(cfg, seed: int, out_dir: str, epochs: float, cls=SubspaceTrainingArguments, **extra):
    """The Trainer settings every arm shares (``cls``: TWATrainingArguments for the TWA arms, with ``extra``)."""
    return cls(
        output_dir=out_dir, per_device_train_batch_size=cfg.batch_size, num_train_epochs=epochs,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=0.0,  # plain SGD, no clipping
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", eval_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        disable_tqdm=False, **extra,
    )


def make_sgd(model: nn.Module, cfg, total_steps: int | None):
    """SGD (momentum, weight decay on every parameter) and a step schedule: ÷10 at 50% and 75% of
    ``total_steps`` (``None``: constant lr, as in the first half of that schedule)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if total_steps is None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        milestones = sorted({max(1, int(f * total_steps)) for f in (0.5, 0.75)})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return opt, sched


def initial_state(cfg, seed: int) -> dict:
    """The initial weights of seed ``seed`` (every arm of that seed starts from them)."""
    torch.manual_seed(seed)
    return copy.deepcopy(SmallCNN(cfg.channels).state_dict())


def cfg_data(cfg) -> dict:
    """:func:`load_data` with the sizes of ``cfg``; records the actual training size in ``cfg.train_size_actual``."""
    data = load_data(cfg.train_size, cfg.val_size, cfg.test_size, cfg.augment)
    cfg.train_size_actual = len(data["train"])
    return data


def fresh_model(cfg, init_state) -> nn.Module:
    model = SmallCNN(cfg.channels)
    model.load_state_dict(init_state)
    return model


def run_sgd(cfg, data, init_state, seed: int, epochs: float, workdir: str, probe_step: int | None) -> dict:
    """Ordinary SGD with the step schedule over ``epochs`` epochs."""
    model = fresh_model(cfg, init_state)
    total = math.ceil(steps_per_epoch(cfg) * epochs)
    probe = PhaseProbe(data, at_step=probe_step) if probe_step else None
    trainer = SubspaceTrainer(model=model, args=make_args(cfg, seed, workdir, epochs),
                              train_dataset=data["train"], optimizers=make_sgd(model, cfg, total),
                              callbacks=[probe] if probe else None)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0 - (probe.eval_seconds if probe else 0.0)
    model = trainer.model
    return {"test_acc": accuracy(model, data["test"]), "val_acc": accuracy(model, data["val"]),
            "seconds": seconds, "epochs": epochs, "steps": int(trainer.state.global_step),
            "train_loss": float(out.training_loss), "probe": probe.result if probe else None}


def twa_extra(cfg, twa_lr: float) -> dict:
    return dict(twa_snapshot_steps=cfg.snapshot_steps, twa_epochs=cfg.twa_epochs,
                twa_snapshot_start_step=cfg.snapshot_start_step, twa_center=not cfg.uncentered,
                twa_lr_schedule=cfg.twa_schedule, twa_batch_size=cfg.twa_batch_size,
                twa_learning_rate=twa_lr, twa_optimizer=cfg.twa_optimizer, twa_momentum=0.9, twa_weight_decay=1e-5,
                twa_basis=cfg.twa_basis, twa_num_components=cfg.twa_k, twa_lr_milestones=[0.5, 0.75],
                twa_lr_gamma=0.1)


def twa_trainer(cfg, data, init_state, seed: int, twa_lr: float, workdir: str, callbacks=None) -> TWATrainer:
    """``TWATrainer`` on a fresh model from ``init_state``: E/2 epochs at the constant lr with
    snapshots, then (in ``train()``) the TWA phase with ``twa_learning_rate`` = ``twa_lr``."""
    model = fresh_model(cfg, init_state)
    args = make_args(cfg, seed, workdir, cfg.epochs / 2, cls=TWATrainingArguments, **twa_extra(cfg, twa_lr))
    return TWATrainer(model=model, args=args, train_dataset=data["train"],
                           optimizers=make_sgd(model, cfg, None), callbacks=callbacks)


def ordinary_phase(trainer) -> float:
    """Run only the ordinary phase of a :func:`twa_trainer` (``TWATrainer.train`` would add the TWA phase);
    returns its seconds."""
    t0 = time.perf_counter()
    Trainer.train(trainer)
    return time.perf_counter() - t0


def swa_of(trainer, model: nn.Module) -> tuple[nn.Module, float]:
    """Uniform average of the snapshots in ``trainer.snapshot_callback.store`` with recalibrated BatchNorm
    (a copy of ``model``); returns it and the seconds taken."""
    t0 = time.perf_counter()
    store = trainer.snapshot_callback.store
    swa = copy.deepcopy(model)
    params = dict(swa.named_parameters())
    with torch.no_grad():
        for name in store.names:
            mean = sum(store.get_tensor(i, name).double() for i in range(len(store))) / len(store)
            params[name].copy_(mean.to(params[name].dtype))
    recalibrate_batchnorm(swa, trainer.get_train_dataloader(), num_batches=trainer.args.twa_bn_batches)
    return swa, time.perf_counter() - t0


def run_twa(cfg, data, init_state, seed: int, twa_lr: float, workdir: str) -> dict:
    """The library's one-run TWA (E/2 ordinary epochs with snapshots, then TWA), plus SWA of its snapshots."""
    probe = PhaseProbe(data)
    trainer = twa_trainer(cfg, data, init_state, seed, twa_lr, workdir, callbacks=[probe])
    t0 = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    ordinary = probe.t_end - t0 - probe.eval_seconds
    twa_phase = t1 - probe.t_end
    result = trainer.twa_result
    twa_model = trainer.model
    twa = {"test_acc": accuracy(twa_model, data["test"]), "val_acc": accuracy(twa_model, data["val"]),
           "seconds": ordinary + twa_phase, "seconds_ordinary": ordinary, "seconds_twa_phase": twa_phase,
           "epochs": cfg.epochs / 2 + cfg.twa_epochs, "k": int(result.k),
           "num_snapshots": int(result.num_snapshots), "snapshot_steps": list(trainer.snapshot_callback.store.steps),
           "coef_norm": float(result.coefficients.norm()), "orthonormality_error": float(result.orthonormality_error),
           "explained_variance_top3": [float(v) for v in result.explained_variance_ratio[:3]],
           "twa_train_loss": float(result.metrics.get("train_loss", float("nan")))}
    swa_model, swa_seconds = swa_of(trainer, twa_model)
    swa = {"test_acc": accuracy(swa_model, data["test"]), "val_acc": accuracy(swa_model, data["val"]),
           "seconds": ordinary + swa_seconds, "seconds_average_and_bn": swa_seconds, "epochs": cfg.epochs / 2}
    half = {"test_acc": probe.result["test_acc"], "val_acc": probe.result["val_acc"], "seconds": ordinary,
            "epochs": cfg.epochs / 2, "checksum": probe.result["checksum"], "step": probe.result["step"]}
    return {"twa": twa, "swa": swa, "half": half}


def tune_twa_lr(cfg, data, init_state, seed: int, grid, workdir: str) -> dict:
    """Choose twa_learning_rate on the validation split: one ordinary phase (seed ``seed``), then the TWA phase
    (``run_twa_phase``, the code ``TWATrainer.train`` calls) once per learning rate from a copy of it."""
    trainer = twa_trainer(cfg, data, init_state, seed, grid[0], workdir)
    ordinary_seconds = ordinary_phase(trainer)
    store = trainer.snapshot_callback.store
    base = copy.deepcopy(trainer.model)
    swa_model, _ = swa_of(trainer, base)
    rows = [{"twa_learning_rate": None, "what": "SWA (c = 0)", "val_acc": accuracy(swa_model, data["val"])},
            {"twa_learning_rate": None, "what": "last iterate", "val_acc": accuracy(base, data["val"])}]
    for lr in tqdm(grid, desc="tuning twa_learning_rate (validation)"):
        # set in place: a new TrainingArguments (dataclasses.replace) would reset accelerate's shared state under
        # the trainer's Accelerator, and trainer.get_train_dataloader() would then fail
        trainer.args.twa_learning_rate = lr
        t = time.perf_counter()
        result = run_twa_phase(trainer, store, model=copy.deepcopy(base))
        rows.append({"twa_learning_rate": lr, "what": "TWA", "val_acc": accuracy(trainer.model, data["val"]),
                     "coef_norm": float(result.coefficients.norm()), "seconds": time.perf_counter() - t,
                     "twa_train_loss": float(result.metrics.get("train_loss", float("nan")))})
        tqdm.write(f"  twa_learning_rate={lr:g}: val {rows[-1]['val_acc']:.2f}%  |c|={rows[-1]['coef_norm']:.2f}")
    twa_rows = [r for r in rows if r["what"] == "TWA"]
    best = max(twa_rows, key=lambda r: (r["val_acc"], -r["twa_learning_rate"]))  # ties: the smaller lr
    return {"seed": seed, "grid": list(grid), "rows": rows, "chosen": best["twa_learning_rate"],
            "ordinary_seconds": ordinary_seconds, "k": int(result.k), "num_snapshots": len(store)}


# ================================================================================================================
# reporting
# ================================================================================================================
def machine_info() -> dict:
    info = _harness.machine_info()
    info["loadavg_start"] = list(info["load_average"])
    return info


def mean_std(values):
    values = [float(v) for v in values]
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(per_seed: dict, arms) -> dict:
    out = {}
    for arm in arms:
        rows = [per_seed[s][arm] for s in per_seed if arm in per_seed[s]]
        if not rows:
            continue
        m, sd = mean_std(r["test_acc"] for r in rows)
        vm, vsd = mean_std(r["val_acc"] for r in rows)
        tm, tsd = mean_std(r["seconds"] for r in rows)
        out[arm] = {"test_acc_mean": m, "test_acc_std": sd, "val_acc_mean": vm, "val_acc_std": vsd,
                    "seconds_mean": tm, "seconds_std": tsd, "epochs": rows[0]["epochs"], "n": len(rows),
                    "test_acc": [r["test_acc"] for r in rows]}
    return out


ARM_LABELS = {
    "sgd": "SGD, full budget (step lr)",
    "twa": "TWA (E/2 ordinary + TWA epochs)",
    "swa": "SWA of the same snapshots (+BN recal.)",
    "half": "last iterate after E/2 ordinary epochs",
    "sgd_short": "SGD, TWA's budget (step lr compressed)",
}


def markdown_report(report: dict) -> str:
    cfg, s, m = report["config"], report["summary"], report["machine"]
    E = cfg["epochs"]
    lines = [
        "# TWA vs SGD vs SWA — Fashion-MNIST, small CNN with BatchNorm, CPU",
        "",
        f"Generated by `benchmarks/bench_twa.py` at {report['finished']} (total {report['total_seconds'] / 60:.1f} min).",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Data: {report['data']['name']} ({report['data']['source']}); train {report['data']['train']} images, "
        f"validation {report['data']['val']} (held out from the training images, used only to choose "
        f"twa_learning_rate), test {report['data']['test']}. Seeds: {cfg['seeds']} (per seed: same init, same data "
        "order in every arm). Accuracy: top-1 %, mean ± sample std over seeds.",
        "",
    ]
    sgd_t = s["sgd"]["seconds_mean"] if "sgd" in s else None
    rows = [[ARM_LABELS[arm], f"{r['epochs']:g}", f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}",
             ", ".join(f"{v:.2f}" for v in r["test_acc"]), f"{r['val_acc_mean']:.2f}",
             f"{r['seconds_mean']:.0f} ± {r['seconds_std']:.0f}", f"{r['seconds_mean'] / sgd_t:.2f}×" if sgd_t else ""]
            for arm in ("sgd", "twa", "swa", "sgd_short", "half") if arm in s for r in [s[arm]]]
    lines += markdown_table(["arm", "epochs", "test acc (%)", "per seed", "val acc (%)", "wall time (s)",
                             "time vs SGD"], rows, "lrrlrrr")
    g = report["goal"]
    lines += [
        "",
        f"Goal of the issue: TWA ≥ SGD − 0.3 points: **{'met' if g['twa_within_0.3_of_sgd'] else 'NOT met'}** "
        f"(TWA − SGD = {g['twa_minus_sgd']:+.2f} points); TWA > SWA: **{'met' if g['twa_beats_swa'] else 'NOT met'}** "
        f"(TWA − SWA = {g['twa_minus_swa']:+.2f} points). TWA time / SGD time = {g['time_ratio']:.2f}.",
    ]
    if "twa_minus_sgd_short" in g:
        lines.append(f"TWA − SGD-short (same budget) = {g['twa_minus_sgd_short']:+.2f} points.")
    lines += ["", "Per-seed differences (test, points): "
              + "; ".join(f"seed {d['seed']}: TWA−SGD {d['twa_minus_sgd']:+.2f}, TWA−SWA {d['twa_minus_swa']:+.2f}"
                          for d in g["per_seed"]), ""]
    tw = report["twa_details"]
    lines += [
        "TWA details (mean over seeds): "
        f"{tw['num_snapshots']} snapshots (every {cfg['snapshot_steps']} steps), subspace k = {tw['k']}, "
        f"‖c‖ = ‖θ_TWA − θ_SWA‖ = {tw['coef_norm']:.2f}, ordinary phase {tw['seconds_ordinary']:.0f} s + TWA phase "
        f"{tw['seconds_twa_phase']:.0f} s (basis, 2 BN recalibrations, {cfg['twa_epochs']:g} epoch(s) of coefficients).",
        "",
    ]
    if report.get("tuning"):
        t = report["tuning"]
        lines += [f"## Choice of twa_learning_rate (seed {t['seed']}, validation split)", ""]
        rows = [[("—" if r["twa_learning_rate"] is None else f"{r['twa_learning_rate']:g}")
                 + ("" if r["what"] == "TWA" else f" ({r['what']})"), f"{r['val_acc']:.2f}",
                 f"{r.get('coef_norm', 0.0):.2f}"] for r in t["rows"]]
        lines += markdown_table(["twa_learning_rate", "val acc (%)", "‖c‖"], rows, "rrr")
        lines += ["", f"Chosen: **{t['chosen']:g}**.", ""]
    lines += [
        "## Hyperparameters", "",
        f"- model: SmallCNN channels {cfg['channels']} (conv3x3-BN-ReLU, max-pool between blocks, global average "
        f"pool, linear), {report['num_params']:,} parameters; a plain torch module run through transformers.Trainer",
        f"- ordinary training: SGD momentum {cfg['momentum']}, lr {cfg['lr']}, weight decay {cfg['weight_decay']} "
        f"(all parameters), batch {cfg['batch_size']}, no gradient clipping, augmentation "
        f"{'random crop (pad 2) + horizontal flip' if cfg['augment'] else 'none'}; "
        f"SGD arm: {E:g} epochs, lr ÷10 at {E * 0.5:g} and {E * 0.75:g} epochs",
        f"- TWA: TWATrainer, num_train_epochs {E / 2:g} at constant lr {cfg['lr']} (= the first half "
        f"of the SGD arm), twa_snapshot_steps {cfg['snapshot_steps']}, twa_snapshot_start_step "
        f"{cfg.get('snapshot_start_step', 0)} ({cfg.get('snapshot_start', 0):g} epochs), twa_basis {cfg['twa_basis']}"
        + (f" (k = {cfg['twa_k']})" if cfg["twa_k"] else "")
        + f", twa_center {not cfg.get('uncentered', False)}"
        + f", twa_epochs {cfg['twa_epochs']:g} (batch {cfg.get('twa_batch_size') or cfg['batch_size']}), "
        f"twa_learning_rate {cfg['twa_lr']:g}, "
        + ("twa_optimizer adamw, " if cfg.get("twa_optimizer") == "adamw" else "twa_momentum 0.9, ")
        + "twa_weight_decay 1e-5, twa_lr_schedule " + cfg.get("twa_schedule", "step")
        + (" (lr ÷10 at 50% and 75% of the TWA phase)" if cfg.get("twa_schedule", "step") == "step" else "")
        + ", BN recalibrated on all training batches",
        "- SWA: mean of the same snapshots, BN recalibrated on all training batches",
        "",
        "## Machine", "",
        f"{m['cpu_model']} · {m['cpu_count']} CPUs · {m['mem_total_gib']} GiB · torch threads {m['torch_threads']} · "
        f"{m['platform']} · Python {m['python']} · torch {m['torch']} · transformers {m['transformers']}",
        "",
        f"Load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; at end "
        f"{', '.join(f'{x:.2f}' for x in report['loadavg_end'])}. The machine is shared: other processes running "
        "at the same time slow every arm (wall-clock times are comparable within one run, not across machines).",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


# ================================================================================================================
# main
# ================================================================================================================
def parse_args(argv=None):
    p = benchmark_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, threads=2,
                         threads_help="torch.set_num_threads")
    p.add_argument("--epochs", type=float, default=10, help="E: epochs of the full-budget SGD arm")
    p.add_argument("--train-size", type=int, default=30000, help="training images (from the 60k)")
    p.add_argument("--val-size", type=int, default=5000, help="validation images (from the 60k, disjoint)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: all 10k)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="default: benchmarks/results (--quick: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~1-2 min)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--channels", default="16,32,32")
    p.add_argument("--augment", action="store_true", help="random crop + flip on the training images")
    p.add_argument("--snapshots", type=int, default=15, help="about this many snapshots in the E/2 epochs")
    p.add_argument("--snapshot-steps", type=int, default=None, help="overrides --snapshots")
    p.add_argument("--snapshot-start", type=float, default=0.0,
                   help="epochs of the ordinary phase before the first snapshot (twa_snapshot_start_step)")
    p.add_argument("--uncentered", action="store_true", help="twa_center=False: span the raw snapshots")
    p.add_argument("--twa-schedule", default="step", choices=TWA_LR_SCHEDULES)
    p.add_argument("--twa-batch-size", type=int, default=None, help="batch of the TWA phase (default: --batch-size)")
    p.add_argument("--twa-epochs", type=float, default=None, help="default E/10")
    p.add_argument("--twa-lr", type=float, default=None, help="skip tuning and use this twa_learning_rate")
    p.add_argument("--twa-lr-grid", default="0.5,1,2,4", help="tuned on seed 0 with the validation split")
    p.add_argument("--twa-optimizer", default="sgd", choices=TWA_OPTIMIZERS)
    p.add_argument("--twa-basis", default="twa", choices=["twa", "pca"])
    p.add_argument("--twa-k", type=int, default=None, help="k for --twa-basis pca")
    p.add_argument("--no-short-sgd", action="store_true", help="skip the same-budget SGD reference arm")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.val_size, args.test_size = 2, 2000, 1000, 2000
        args.seeds = "0" if args.seeds == "0,1,2" else args.seeds
        args.snapshots = 8
        if args.twa_lr is None:
            args.twa_lr_grid = "1,2"
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="bench_twa_quick_") if args.quick else str(REPO / "benchmarks" / "results")
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.channels = tuple(int(c) for c in args.channels.split(","))
    if args.twa_epochs is None:
        args.twa_epochs = args.epochs / 10
    return args


def main(argv=None):
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started = time.perf_counter()

    data = cfg_data(cfg)
    spe = steps_per_epoch(cfg)
    half_steps = math.ceil(spe * cfg.epochs / 2)
    cfg.snapshot_start_step = int(round(cfg.snapshot_start * spe))
    snapshot_span = half_steps - cfg.snapshot_start_step  # steps of the ordinary phase that record snapshots
    cfg.snapshot_steps = cfg.snapshot_steps or max(1, snapshot_span // cfg.snapshots)
    notes = []
    if data["name"] != "fashion_mnist":
        notes.append(f"Fashion-MNIST was not installed: this ran on {data['name']} ({data['source']}).")
    print(f"data: {data['name']} train {len(data['train'])} val {len(data['val'])} test {len(data['test'])}; "
          f"{spe} steps/epoch, E={cfg.epochs:g}, snapshot every {cfg.snapshot_steps} steps "
          f"from step {cfg.snapshot_start_step} (~{snapshot_span // cfg.snapshot_steps} snapshots), "
          f"twa_epochs={cfg.twa_epochs:g}", flush=True)

    inits = {seed: initial_state(cfg, seed) for seed in cfg.seeds}
    num_params = sum(p.numel() for p in SmallCNN(cfg.channels).parameters())

    workroot = tempfile.mkdtemp(prefix="bench_twa_")
    tuning = None
    if cfg.twa_lr is None:
        grid = [float(x) for x in cfg.twa_lr_grid.split(",")]
        tuning = tune_twa_lr(cfg, data, inits[cfg.seeds[0]], cfg.seeds[0], grid, os.path.join(workroot, "tune"))
        cfg.twa_lr = tuning["chosen"]
        print(f"chosen twa_learning_rate = {cfg.twa_lr:g} (validation, seed {cfg.seeds[0]})", flush=True)

    per_seed = {}
    short_epochs = cfg.epochs / 2 + cfg.twa_epochs
    for seed in tqdm(cfg.seeds, desc="seeds"):
        wd = os.path.join(workroot, f"seed{seed}")
        res = {}
        res["sgd"] = run_sgd(cfg, data, inits[seed], seed, cfg.epochs, wd + "-sgd", probe_step=half_steps)
        res.update(run_twa(cfg, data, inits[seed], seed, cfg.twa_lr, wd + "-twa"))
        if not cfg.no_short_sgd:
            res["sgd_short"] = run_sgd(cfg, data, inits[seed], seed, short_epochs, wd + "-short", probe_step=None)
        per_seed[seed] = res
        probe = res["sgd"]["probe"]
        res["same_trajectory_check"] = {
            "sgd_checksum_at_half": probe["checksum"] if probe else None, "twa_checksum_at_half": res["half"]["checksum"],
            "identical": bool(probe and probe["checksum"] == res["half"]["checksum"]),
            "sgd_test_acc_at_half": probe["test_acc"] if probe else None,
        }
        tqdm.write(f"seed {seed}: " + "  ".join(f"{a} {res[a]['test_acc']:.2f}% ({res[a]['seconds']:.0f}s)"
                                                 for a in ("sgd", "twa", "swa", "sgd_short", "half") if a in res))
        # write partial results as we go
        so_far = {"partial": True, "per_seed": per_seed}
        (out / "twa.partial.json").write_text(json.dumps(so_far, indent=1, default=str))

    arms = ("sgd", "twa", "swa", "sgd_short", "half")
    summary = summarize(per_seed, arms)
    goal_rows = [{"seed": s, "twa_minus_sgd": r["twa"]["test_acc"] - r["sgd"]["test_acc"],
                  "twa_minus_swa": r["twa"]["test_acc"] - r["swa"]["test_acc"]} for s, r in per_seed.items()]
    goal = {
        "twa_minus_sgd": summary["twa"]["test_acc_mean"] - summary["sgd"]["test_acc_mean"],
        "twa_minus_swa": summary["twa"]["test_acc_mean"] - summary["swa"]["test_acc_mean"],
        "time_ratio": summary["twa"]["seconds_mean"] / summary["sgd"]["seconds_mean"],
        "per_seed": goal_rows,
    }
    goal["twa_within_0.3_of_sgd"] = goal["twa_minus_sgd"] >= -0.3
    goal["twa_beats_swa"] = goal["twa_minus_swa"] > 0
    if "sgd_short" in summary:
        goal["twa_minus_sgd_short"] = summary["twa"]["test_acc_mean"] - summary["sgd_short"]["test_acc_mean"]
    twa_rows = [per_seed[s]["twa"] for s in per_seed]
    twa_details = {key: statistics.fmean(r[key] for r in twa_rows)
                   for key in ("num_snapshots", "k", "coef_norm", "seconds_ordinary", "seconds_twa_phase")}
    same = [per_seed[s]["same_trajectory_check"]["identical"] for s in per_seed]
    notes.append("Same-trajectory check: the SGD arm's weights after E/2 epochs "
                 + ("equal" if all(same) else "do NOT all equal")
                 + " the TWA arm's weights where its ordinary phase ends (parameter checksums, per seed: "
                 + ", ".join(str(x) for x in same) + ").")

    cfg_dict = {k: v for k, v in vars(cfg).items()}
    cfg_dict["channels"] = list(cfg.channels)
    report = {
        "benchmark": "twa", "command": command, "config": cfg_dict, "machine": machine,
        "data": {"name": data["name"], "source": data["source"], "train": len(data["train"]),
                 "val": len(data["val"]), "test": len(data["test"]), "split_seed": DATA_SPLIT_SEED},
        "num_params": num_params, "tuning": tuning, "per_seed": {str(k): v for k, v in per_seed.items()},
        "summary": summary, "goal": goal, "twa_details": twa_details, "notes": notes,
        "total_seconds": time.perf_counter() - started, "loadavg_end": list(os.getloadavg()),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    write_report(out, "twa", report, markdown_report(report))
    shutil.rmtree(workroot, ignore_errors=True)  # the Trainers' output_dirs (nothing is saved there)
    partial = out / "twa.partial.json"
    if partial.exists():
        partial.unlink()
    return report


if __name__ == "__main__":
    main()
