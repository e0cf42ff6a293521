"""TWA-phase variants on the validation split, from one ordinary phase (the exploration behind bench_twa's settings).

One seed's ordinary phase of ``bench_twa.py`` (E/2 epochs at the constant lr) runs once with a dense snapshot
schedule; then each variant runs the TWA phase (``run_twa_phase``, the code ``TWATrainer.train`` calls) from a
copy of the model over a subset of those snapshots, with its own TWA settings, and reports validation accuracy.
The test set is never read. Variants are JSON objects::

    {"start": 23, "every": 3}                                   # snapshots 23, 26, 29, ...
    {"start": 23, "every": 1, "args": {"twa_basis": "pca", "twa_num_components": 32}}
    {"start": 23, "args": {"twa_optimizer": "adamw", "twa_learning_rate": 0.05, "twa_epochs": 3}}

``args`` are ``TWATrainingArguments`` TWA-phase fields (:data:`PHASE_FIELDS`); the rest keep bench_twa's
settings (lr 1, step schedule, one epoch, SGD momentum 0.9, weight decay 1e-5, centered ``twa`` basis)::

    python benchmarks/twa_variants.py --seed 0 --snapshot-every 10 \\
        --variants '[{"start": 23, "every": 3}, {"start": 23, "every": 1, "args": {"twa_basis": "pca", "twa_num_components": 32}}]'

The session-3 table in ``benchmarks/results/twa.md`` came from this (seeds 0 and 2, ``--threads 1``, run side
by side).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import _setup  # noqa: F401  (REPO on sys.path, offline environment)
import torch
from tqdm.auto import tqdm

import bench_twa as B
from hf_subspace.twa import run_twa_phase
from hf_subspace.twa import SnapshotStore

# the TWA-phase settings a variant may change; the others' values are bench_twa's (read off its arguments)
PHASE_FIELDS = ("twa_learning_rate", "twa_lr_schedule", "twa_lr_milestones", "twa_lr_gamma", "twa_epochs",
                "twa_optimizer", "twa_momentum", "twa_weight_decay", "twa_basis", "twa_num_components", "twa_center",
                "twa_batch_size")


def subset(store: SnapshotStore, start: int, every: int) -> SnapshotStore:
    """An in-memory store of snapshots start, start + every, ... of ``store``."""
    if every < 1 or not 0 <= start < len(store):
        raise ValueError(f"start must be in [0, {len(store)}) and every ≥ 1, got start={start}, every={every}")
    out = SnapshotStore()
    for i in range(start, len(store), every):
        out.add(store[i], step=store.steps[i])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", required=True, help="JSON list of variants (see the module docstring)")
    p.add_argument("--snapshot-every", type=int, default=10, help="steps between the dense snapshots")
    p.add_argument("--out", default=None, help="write the rows here as JSON (after each variant)")
    p.add_argument("--epochs", type=float, default=10, help="E of bench_twa (the ordinary phase is E/2)")
    p.add_argument("--train-size", type=int, default=30000)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    try:
        ns.variants = json.loads(ns.variants)
    except json.JSONDecodeError as e:
        p.error(f"--variants is not valid JSON: {e}")
    if not isinstance(ns.variants, list) or not all(isinstance(v, dict) for v in ns.variants):
        p.error("--variants must be a JSON list of objects")
    unknown = {k for v in ns.variants for k in v.get("args", {})} - set(PHASE_FIELDS)
    if unknown:
        p.error(f"unknown TWA settings in --variants: {sorted(unknown)}; known: {sorted(PHASE_FIELDS)}")
    return ns


def main(argv=None) -> list[dict]:
    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    cfg = B.parse_args(["--epochs", str(ns.epochs), "--train-size", str(ns.train_size), "--seeds", str(ns.seed),
                        "--threads", str(ns.threads), "--twa-lr", "1"])
    data = B.cfg_data(cfg)
    cfg.snapshot_steps, cfg.snapshot_start_step, cfg.twa_batch_size = ns.snapshot_every, 0, None
    half = math.ceil(B.steps_per_epoch(cfg) * cfg.epochs / 2)
    print(f"ordinary phase: {half} steps, a snapshot every {ns.snapshot_every} (~{half // ns.snapshot_every})",
          flush=True)
    trainer = B.twa_trainer(cfg, data, B.initial_state(cfg, ns.seed), ns.seed, 1.0, f"/tmp/twa_variants_seed{ns.seed}")
    B.ordinary_phase(trainer)
    store = trainer.snapshot_callback.store
    base = copy.deepcopy(trainer.model)
    defaults = {k: copy.deepcopy(getattr(trainer.args, k)) for k in PHASE_FIELDS}
    rows = [{"variant": "last iterate", "val": B.accuracy(base, data["val"])}]
    for v in tqdm(ns.variants, desc="variants"):
        snaps = subset(store, v.get("start", 0), v.get("every", 1))
        for k, val in {**defaults, **v.get("args", {})}.items():
            setattr(trainer.args, k, val)  # in place: see bench_twa.tune_twa_lr
        t = time.perf_counter()
        result = run_twa_phase(trainer, snaps, model=copy.deepcopy(base))
        rows.append({"variant": v, "snapshots": len(snaps), "k": int(result.k),
                     "val": B.accuracy(trainer.model, data["val"]),
                     "twa_train_loss": float(result.metrics.get("train_loss", float("nan"))),
                     "seconds": round(time.perf_counter() - t, 1)})
        tqdm.write(json.dumps(rows[-1]))
        if ns.out:
            Path(ns.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
