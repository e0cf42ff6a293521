"""Intrinsic-dimension sweeps (Li et al. 2018): the smallest d whose random subspace reaches 90% of direct training.

The protocol, as the original code leaves it to notebooks, made one function (:func:`run_sweep`):

1. a baseline — a number, or direct training of the same model (a learning rate chosen on validation);
2. a log-spaced grid of d, several seeds each, and for each d a learning rate chosen from a short grid on a
   validation split (the paper's fixed Adam lr 1e-3 is far too small for short budgets and inflates d_int90);
3. bisection (geometric) between the last d that misses the target and the first that reaches it;
4. d_int90 = the smallest evaluated d whose mean test metric over seeds reaches ``threshold x baseline`` (or an
   absolute target), with a bootstrap interval over seeds (M resamples, the original code's M = 100).

Every finished run is appended to ``runs.jsonl`` (one JSON line, flushed and fsynced) before the next starts, so an
interrupted sweep continues where it stopped and a repeated command repeats no run. Outputs: ``runs.json``,
``runs.csv``, ``summary.json`` and ``intrinsic_dim.png`` (metric against d, log axis, with the baseline, the
target line and d_int90 marked).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from ..atomic import atomic_path, atomic_write, write_text

RUNS_FILE = "runs.jsonl"
BASELINE = "full"  # the ``dim`` recorded for a direct-training (baseline) run


class Task(Protocol):
    """What a sweep trains. ``run`` returns at least ``val_metric`` and ``test_metric`` (higher is better)."""

    name: str

    def run(self, dim: Optional[int], seed: int, lr: float) -> dict:
        """Train with a d-dimensional subspace (``dim=None``: directly, all weights) and evaluate."""


# ----------------------------------------------------------------------------------------------------------------
# the results file
# ----------------------------------------------------------------------------------------------------------------
def run_key(task: str, dim, seed: int, lr: float) -> str:
    return f"{task}|{dim}|{seed}|{float(lr):.6g}"


class ResultStore:
    """Append-only JSON-lines file of finished runs, keyed by (task, dim, seed, lr).

    An append is one ``write`` of one line, flushed and fsynced. A process killed mid-write can leave a partial
    last line; it is dropped (and the file cut back to its last complete line) when the store is opened.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished line
        for number, line in enumerate(data[:good].splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:  # not a torn append (those have no newline): an edited or damaged file
                    raise ValueError(f"{self.path} line {number} is not a JSON record ({e}); fix or delete that "
                                     "line to resume the sweep") from None
                self.records[rec["key"]] = rec
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record

    def for_task(self, task: str) -> list[dict]:
        return [r for r in self.records.values() if r["task"] == task]


# ----------------------------------------------------------------------------------------------------------------
# reading the runs: the lr choice, the per-d means, d_int90 and its bootstrap
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DimSummary:
    dim: object  # an int, or BASELINE
    lr: float  # the learning rate chosen on validation (mean over seeds)
    mean: float  # mean test metric over seeds at that lr
    per_seed: dict  # seed -> test metric at that lr
    val_mean: float


def summarize_dims(records: list[dict]) -> dict:
    """Per ``dim``: choose the lr with the best mean validation metric, report the test metrics at that lr."""
    by_dim: dict = {}
    for r in records:
        by_dim.setdefault(r["dim"], {}).setdefault(r["lr"], []).append(r)
    out = {}
    for dim, by_lr in by_dim.items():
        def val_mean(runs):
            return sum(x["val_metric"] for x in runs) / len(runs)
        lr, runs = max(by_lr.items(), key=lambda kv: (val_mean(kv[1]), -kv[0]))
        per_seed = {x["seed"]: x["test_metric"] for x in runs}
        out[dim] = DimSummary(dim, lr, sum(per_seed.values()) / len(per_seed), per_seed, val_mean(runs))
    return out


def smallest_reaching(means: dict[int, float], target: float) -> Optional[int]:
    hits = [d for d, m in means.items() if m >= target]
    return min(hits) if hits else None


def bracket(means: dict[int, float], target: float) -> tuple[Optional[int], Optional[int]]:
    """``(last miss, first hit)``: the largest d below the first hit that misses, and the first hit."""
    hit = smallest_reaching(means, target)
    if hit is None:
        return None, None
    misses = [d for d, m in means.items() if d < hit and m < target]
    return (max(misses) if misses else None), hit


def bootstrap_interval(per_seed: dict[int, dict], target_fn: Callable[[random.Random], float], resamples: int = 100,
                       level: float = 0.9, seed: int = 0) -> dict:
    """Bootstrap of d_int90 over seeds: each resample draws, for every d, as many runs as it has with replacement
    (and the target through ``target_fn``, which resamples the baseline runs); ``per_seed``: d -> {seed: metric}.

    Returns ``{"low", "high", "level", "resamples", "unreached"}``; a resample where no d reaches the target counts
    as above the grid (``high`` is then None when more than the upper tail fail).
    """
    rng = random.Random(seed)
    found, unreached = [], 0
    for _ in range(resamples):
        target = target_fn(rng)
        means = {}
        for d, runs in per_seed.items():
            vals = list(runs.values())
            draw = [vals[rng.randrange(len(vals))] for _ in vals]
            means[d] = sum(draw) / len(draw)
        hit = smallest_reaching(means, target)
        if hit is None:
            unreached += 1
        else:
            found.append(hit)
    tail = (1 - level) / 2
    ordered = sorted(found) + [math.inf] * unreached

    def quantile(q):
        v = ordered[min(len(ordered) - 1, max(0, int(math.floor(q * len(ordered)))))]
        return None if v == math.inf else int(v)

    return {"low": quantile(tail), "high": quantile(1 - tail), "level": level, "resamples": resamples,
            "unreached": unreached}


# ----------------------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------------------
def _geometric_mid(lo: int, hi: int) -> int:
    return int(round(math.sqrt(lo * hi)))


def run_sweep(task: Task, dims: Sequence[int], seeds: Sequence[int], lrs: Sequence[float], output_dir: str,
              baseline: float | None = None, baseline_lrs: Sequence[float] = (), threshold: float = 0.9,
              absolute: float | None = None, refine_steps: int = 3, bootstrap: int = 100,
              full_model_bytes: int | None = None, progress: bool = True) -> dict:
    """Sweep d for ``task``; write the outputs under ``output_dir``; return the summary (also ``summary.json``).

    ``baseline``: the direct-training metric; ``None`` trains the task directly (``dim=None``) for every seed
    and each of ``baseline_lrs``. ``absolute``: a target metric instead of ``threshold x baseline``.
    """
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] <= 0:
        raise ValueError(f"dims must be positive integers, got {list(dims)}")
    if not seeds or not lrs:
        raise ValueError("a sweep needs at least one seed and one learning rate")
    if baseline is None and absolute is None and not baseline_lrs:
        raise ValueError("give a baseline metric, an absolute target, or baseline_lrs to train the baseline")
    out = Path(output_dir)
    store = ResultStore(out / RUNS_FILE)
    planned = (len(dims) + refine_steps) * len(seeds) * len(lrs)
    if baseline is None and absolute is None:
        planned += len(seeds) * len(baseline_lrs)
    bar = _progress(planned, progress, task.name)

    def evaluate(dim, lr_grid):
        for seed in seeds:
            for lr in lr_grid:
                key = run_key(task.name, dim, seed, lr)
                if key in store:
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"d={dim} seed={seed} lr={lr:g}")
                t0 = time.perf_counter()
                result = task.run(None if dim == BASELINE else dim, seed, lr)
                store.append({**result, "key": key, "task": task.name, "dim": dim, "seed": seed, "lr": float(lr),
                              "seconds": round(time.perf_counter() - t0, 3)})
                bar.update(1)

    if baseline is None and absolute is None:
        evaluate(BASELINE, baseline_lrs)
    for d in dims:
        evaluate(d, lrs)

    grid_lrs = {float(lr) for lr in lrs}
    base_lrs = {float(lr) for lr in baseline_lrs}

    def in_this_sweep(r):  # runs of another grid in the same file (an earlier command) do not count here
        return r["seed"] in seeds and r["lr"] in (base_lrs if r["dim"] == BASELINE else grid_lrs)

    def current():
        table = summarize_dims([r for r in store.for_task(task.name) if in_this_sweep(r)])
        base = table.pop(BASELINE, None)
        return table, base

    table, base = current()
    base_value = baseline if baseline is not None else (base.mean if base is not None else None)
    target = absolute if absolute is not None else threshold * base_value
    evaluated = set(dims)
    for _ in range(refine_steps):
        lo, hi = bracket({d: s.mean for d, s in table.items() if d in evaluated}, target)
        if lo is None or hi is None:
            break
        mid = _geometric_mid(lo, hi)
        if mid in (lo, hi):
            break
        evaluate(mid, lrs)
        evaluated.add(mid)
        table, base = current()
    bar.close()

    table = {d: s for d, s in table.items() if d in evaluated}
    means = {d: s.mean for d, s in table.items()}
    d_int = smallest_reaching(means, target)
    base_runs = list(base.per_seed.values()) if (base is not None and baseline is None and absolute is None) else None

    def target_fn(rng):
        if base_runs is None:
            return target
        draw = [base_runs[rng.randrange(len(base_runs))] for _ in base_runs]
        return threshold * sum(draw) / len(draw)

    interval = bootstrap_interval({d: s.per_seed for d, s in table.items()}, target_fn, resamples=bootstrap)
    summary = {
        "task": task.name, "threshold": threshold if absolute is None else None, "absolute_target": absolute,
        "baseline": base_value, "baseline_lr": base.lr if base is not None else None,
        "baseline_per_seed": base.per_seed if base is not None else None, "target": target,
        "d_int": d_int, "d_int_interval": interval, "seeds": list(seeds), "lr_grid": list(lrs),
        "dims": [{"dim": d, "lr": s.lr, "mean": s.mean, "val_mean": s.val_mean, "per_seed": s.per_seed,
                  "reaches_target": s.mean >= target} for d, s in sorted(table.items())],
        "metric": getattr(task, "metric_label", None) or "test metric",
        "lr_at_grid_edge": lr_at_grid_edge({d: s.lr for d, s in table.items()}, lrs),
    }
    records = [r for r in store.for_task(task.name) if in_this_sweep(r)]
    if d_int is not None:
        summary["compression"] = _compression(records, d_int, full_model_bytes)
    _write_outputs(out, records, summary)
    return summary


def lr_at_grid_edge(chosen: dict, grid: Sequence[float]) -> list[dict]:
    """The dims whose chosen lr is the grid's smallest or largest (the best may lie beyond it); empty with one lr."""
    grid = sorted(float(lr) for lr in grid)
    if len(grid) < 2:
        return []
    return [{"dim": d, "lr": lr, "edge": "largest" if lr == grid[-1] else "smallest"}
            for d, lr in sorted(chosen.items()) if lr in (grid[0], grid[-1])]


def _compression(records: list[dict], d_int: int, full_model_bytes: int | None) -> dict:
    """The adapter's bytes at d_int against the full model's (Li et al.'s compression)."""
    run = next((r for r in records if r["dim"] == d_int and r.get("adapter_bytes")), None)
    adapter = run["adapter_bytes"] if run else 4 * d_int
    full = full_model_bytes or (run or {}).get("full_bytes")
    return {"adapter_bytes": adapter, "full_model_bytes": full,
            "ratio": (full / adapter) if full else None}


def _progress(total: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"intrinsic-dim {name}", unit="run", disable=not enabled)


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text)  # a temporary file in the same folder, fsynced, then os.replace


def _write_outputs(out: Path, records: list[dict], summary: dict) -> None:
    records = sorted(records, key=lambda r: (r["dim"] == BASELINE, r["dim"] if r["dim"] != BASELINE else 0,
                                             r["seed"], r["lr"]), reverse=False)
    _atomic_write(out / "runs.json", json.dumps(records, indent=1, sort_keys=True))
    fields = sorted({k for r in records for k in r})
    lead = [f for f in ("dim", "seed", "lr", "val_metric", "test_metric") if f in fields]
    fields = lead + [f for f in fields if f not in lead]
    with atomic_write(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str))
    plot_sweep(summary, records, str(out / "intrinsic_dim.png"))


def plot_sweep(summary: dict, records: list[dict], path: str) -> str:
    """Metric against d (log axis): every seed at the chosen lr, the mean, the baseline, the target, d_int."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dims = summary["dims"]
    xs = [r["dim"] for r in dims]
    for r in dims:
        ax.scatter([r["dim"]] * len(r["per_seed"]), list(r["per_seed"].values()), s=14, color="#9bbbd9", zorder=2)
    n_seeds = len(summary.get("seeds") or [None])
    ax.plot(xs, [r["mean"] for r in dims], "-o", color="#1f5a96", zorder=3,
            label=f"subspace (mean over {n_seeds} seeds)" if n_seeds > 1 else "subspace (1 seed)")
    if summary.get("baseline") is not None:
        ax.axhline(summary["baseline"], color="black", lw=1, label=f"direct training {summary['baseline']:.3f}")
    label = (f"{summary['threshold']:.0%} of direct training" if summary.get("threshold") is not None
             else "target")
    ax.axhline(summary["target"], color="#c0392b", ls="--", lw=1, label=f"{label} {summary['target']:.3f}")
    if summary.get("d_int") is not None:
        iv = summary["d_int_interval"]
        ax.axvline(summary["d_int"], color="#c0392b", lw=1.5, label=f"d_int = {summary['d_int']:,}")
        if iv.get("low") is not None and iv.get("high") is not None and iv["high"] > iv["low"]:
            ax.axvspan(iv["low"], iv["high"], color="#c0392b", alpha=0.08,
                       label=f"{iv['level']:.0%} bootstrap [{iv['low']:,}, {iv['high']:,}]")
        elif iv.get("low") is not None and iv.get("low") == iv.get("high"):
            ax.plot([], [], " ", label="bootstrap interval: one point" + (" (1 seed: nothing to resample)"
                                                                          if n_seeds == 1 else ""))
    values = [v for r in dims for v in r["per_seed"].values()] + [summary["target"]]
    if summary.get("baseline") is not None:
        values.append(summary["baseline"])
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.05 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1))  # the baseline line inside the frame
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(summary.get("metric") or "test metric")
    ax.set_title(f"intrinsic dimension: {summary['task']}")
    ax.grid(alpha=0.3, which="both")
    if summary.get("lr_at_grid_edge"):
        ax.text(0.01, 0.01, "lr chosen at the grid's edge for d = " + ", ".join(
            f"{e['dim']:,}" for e in summary["lr_at_grid_edge"]) + ": extend --lrs", transform=ax.transAxes,
            fontsize=6, color="#7f4f00", va="bottom")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
    return path
