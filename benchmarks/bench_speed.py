"""Speed, memory (and optionally accuracy) of subspace training against full fine-tuning and PEFT baselines.

One command, one process tree::

    python benchmarks/bench_speed.py [--quick] [--accuracy] [--profile] [--out benchmarks/results]

writes ``<out>/speed.json`` (everything measured, with machine info) and ``<out>/speed.md`` (tables):

a. **Training steps** on MiniLM-L6 sequence classification (batch 16, 64 tokens, AdamW, default torch threads):
   median step time of 10 steps after 2 warm-up ones (forward + backward + optimizer step) and the peak memory of
   each method, each method in a fresh subprocess so that its peak is its own. Methods: full fine-tuning, LoRA,
   VeRA, UniLoRA, hf_subspace on query/value, and hf_subspace over all weights for every projection kind and
   d in {1e3, 1e4, 1e5}. A configuration that would not fit in time or memory is not run: its cost is
   extrapolated from the projection micro-benchmark (b) and reported as an estimate, with the reason.
   ``--rounds N`` runs the measured methods N times round-robin and pools their steps (a shared machine drifts
   by ±10% between single runs); ``--resume --remeasure --only ...`` re-measures some methods, keeping the rest.
   The projection's share is what the step's own projection calls took (per tensor; embeddings only for the
   rows the batch reads).
b. **Projection micro-benchmark**: build time, ``P c`` and ``Pᵀ g`` time and peak memory of each kind as D grows
   (d = 1000) and as d grows (D = 1e7), again one subprocess each, sizes that do not fit skipped (estimated).
   The share of a MiniLM step the projection takes at D = 22.7M comes from (a).
c. ``--accuracy`` (slow: an epoch of 500 steps per method and learning rate): one epoch on the Rotten Tomatoes
   split (8,000 / 2,000), three learning rates per method chosen on the 605 remaining sentences, and that run's
   test accuracy; each d = 10k hf_subspace row is compared with the best PEFT peer of a similar trainable count.
d. ``--profile``: a torch.profiler breakdown of one step (full fine-tuning vs hf_subspace global hashing):
   projection, materialization of θ0 + δ, matmuls, optimizer, the rest.

Memory is the growth of the process's resident set (RSS) over its size after the imports: the model, the
adapter, activations, gradients and optimizer state (peak of ``getrusage`` max-RSS and a 2 ms RSS sampler).
The machine may be shared: the load average before and after each measurement is recorded beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import _models  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)
from _harness import (MIB, PeakMemory, add_ratios, benchmark_parser, fmt_int, fmt_mb, fmt_ratio, fmt_s,  # noqa: E402
                      machine_info, markdown_table, median_time, meminfo, pool_rounds, read_results, source_state,
                      write_report, write_worker_result)
import _harness  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

BATCH, SEQ_LEN = 16, 64
WORKER_THREADS = None  # torch threads of the workers (None: torch's default); set from --threads


# ================================================================================================================
# small utilities (the shared ones are in _harness.py)
# ================================================================================================================
def run_worker(args: list[str], timeout: float) -> dict:
    """This script again in a fresh subprocess (see :func:`_harness.run_worker`)."""
    return _harness.run_worker(__file__, args, timeout, WORKER_THREADS)


# ================================================================================================================
# data and model
# ================================================================================================================
def tokenized_batches(n_examples: int, split: str = "train", seed: int = 0, n_train=8000, n_test=2000):
    """Rotten Tomatoes sentences tokenized to exactly SEQ_LEN tokens: ``(input_ids, attention_mask, labels)``."""
    from transformers import AutoTokenizer

    from hf_subspace.demo.data import ROTTEN_TOMATOES_SIZE, load_rotten_tomatoes, minilm_path

    # the sentences after train and test (605 with the defaults) are the validation split that picks the lr
    train, rest = load_rotten_tomatoes(n_train=n_train, n_test=ROTTEN_TOMATOES_SIZE - n_train, seed=seed)
    if split == "train":
        texts, labels = train.texts[:n_examples], train.labels[:n_examples]
    elif split == "test":
        texts, labels = rest.texts[:min(n_examples, n_test)], rest.labels[:min(n_examples, n_test)]
    else:
        texts, labels = rest.texts[n_test:n_test + n_examples], rest.labels[n_test:n_test + n_examples]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.int64)


def minilm_num_weights() -> tuple[int, int]:
    """(all parameters, parameters outside the classification head = D of a global subspace adapter)."""
    model = _models.minilm_classifier()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    return total, total - head


# ================================================================================================================
# method builders: each takes the pretrained model and returns the model to train (trainable parameters set)
# ================================================================================================================
def build_full(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def build_lora(model, r=8):
    return _models.lora(model, ["query", "value"], "SEQ_CLS", r=r, alpha=2 * r, lora_dropout=0.0)


def build_vera(model, r=256):
    from peft import VeraConfig, get_peft_model

    return get_peft_model(model, VeraConfig(r=r, target_modules=["query", "value"], task_type="SEQ_CLS"))


def build_unilora(model, r=8, theta_d_length=10_000):
    from peft import UniLoraConfig, get_peft_model

    return get_peft_model(model, UniLoraConfig(r=r, theta_d_length=theta_d_length,
                                               target_modules=["query", "value"], task_type="SEQ_CLS"))


def build_subspace(model, dim, projection="hashing", target_modules=None, mode="global"):
    return _models.subspace(model, dim, "SEQ_CLS", projection=projection, mode=mode, target_modules=target_modules)


BUILDERS = {"full": build_full, "lora": build_lora, "vera": build_vera, "unilora": build_unilora,
            "subspace": build_subspace}

VAL_SIZE = 605  # --accuracy: validation sentences (what the 10,605 leave after 8,000 train + 2,000 test)
# learning rates tried in --accuracy, per family (three per method, spanning about a decade around the usual
# value; a spec's own "lrs" wins). With hashing, a weight moves by ~lr·sqrt(d/D) per step: the subspace over all
# 22.7M weights needs a larger lr than over q,v's 0.9M.
LEARNING_RATES = {"full": [2e-5, 5e-5, 1e-4], "lora": [5e-4, 1e-3, 3e-3], "vera": [4e-3, 1e-2, 3e-2],
                  "unilora": [2e-3, 1e-2, 3e-2], "subspace": [1e-2, 3e-2, 1e-1]}
# the learning rate of the speed runs (irrelevant to speed, set to a sensible value)
SPEED_LR = {"full": 2e-5, "lora": 5e-4, "vera": 4e-3, "unilora": 2e-3, "subspace": 1e-3}


def fmt_dim(d: int) -> str:
    return f"{d // 1000}k" if d >= 1000 and d % 1000 == 0 else str(d)


def method_specs(quick: bool) -> list[dict]:
    """The methods of part (a), in the order they run (hashing before the kinds estimated from it)."""
    specs = [
        {"id": "full", "family": "full", "label": "full fine-tuning", "options": {}},
        {"id": "lora", "family": "lora", "label": "PEFT LoRA r=8 (q,v)", "options": {"r": 8}},
        {"id": "vera", "family": "vera", "label": "PEFT VeRA r=256 (q,v)", "options": {"r": 256}},
        {"id": "unilora", "family": "unilora", "label": "PEFT UniLoRA r=8, d=10k (q,v)",
         "options": {"r": 8, "theta_d_length": 10_000}},
        {"id": "subspace-qv-hashing-10000", "family": "subspace", "label": "hf_subspace hashing d=10k (q,v)",
         "options": {"dim": 10_000, "projection": "hashing", "target_modules": ["query", "value"]},
         "lrs": [3e-3, 1e-2, 3e-2]},
        {"id": "subspace-qv-said-hashing-10000", "family": "subspace",
         "label": "hf_subspace SAID hashing d=10k (q,v)",
         "options": {"dim": 10_000, "projection": "hashing", "target_modules": ["query", "value"], "mode": "said"},
         "lrs": [1e-2, 3e-2]},
    ]
    if quick:
        specs = [s for s in specs if s["id"] in ("full", "lora", "subspace-qv-hashing-10000")]
    kinds = ["hashing", "fastfood", "sparse", "dense"]
    for kind in kinds:
        for d in ([10_000 if kind == "hashing" else 1_000] if quick else [1_000, 10_000, 100_000]):
            specs.append({"id": f"global-{kind}-{d}", "family": "subspace",
                          "label": f"hf_subspace global {kind} d={fmt_dim(d)}",
                          "options": {"dim": d, "projection": kind, "target_modules": None}})
    return specs


def find_projection(model):
    import hf_subspace

    for module in model.modules():
        if isinstance(module, hf_subspace.SubspaceEngine):
            return next(iter(module.adapters.values())).projection
    return None


def build_method(spec: dict):
    model = _models.minilm_classifier()
    model = BUILDERS[spec["family"]](model, **spec["options"])
    model.train()
    return model


# ================================================================================================================
# (a) training steps
# ================================================================================================================
def measure_training_steps(spec: dict, warmup: int, steps: int) -> dict:
    """Median step time (forward, backward, AdamW step) and peak memory of one method; runs in a worker."""
    n = BATCH * (warmup + steps)
    input_ids, attention_mask, labels = tokenized_batches(n)
    memory = PeakMemory()
    t0 = time.perf_counter()
    model = build_method(spec)
    build_s = time.perf_counter() - t0
    rss_after_build = memory.growth()
    opt = _models.adamw(model, lr=SPEED_LR[spec["family"]])
    projection = find_projection(model)
    in_step = time_projection_calls(projection) if projection is not None else None
    phases = {"forward": [], "backward": [], "optimizer": [], "step": [], "cpu": [], "proj_fwd": [], "proj_bwd": []}
    for i in tqdm(range(warmup + steps), desc=spec["id"], leave=False):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        if in_step is not None:
            in_step.update(forward=0.0, backward=0.0)
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], labels=labels[sl])
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3, c3 = time.perf_counter(), time.process_time()
        if i >= warmup:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, c3 - c0)):
                phases[key].append(value)
            if in_step is not None:
                phases["proj_fwd"].append(in_step["forward"])
                phases["proj_bwd"].append(in_step["backward"])
    peak = memory.stop()
    result = {
        "status": "measured",
        "trainable_params": _models.trainable(model),
        "build_s": build_s,
        "step_s": statistics.median(phases["step"]),
        "step_s_all": phases["step"],
        "forward_s": statistics.median(phases["forward"]),
        "backward_s": statistics.median(phases["backward"]),
        "optimizer_s": statistics.median(phases["optimizer"]),
        "cpu_s": statistics.median(phases["cpu"]),  # CPU seconds of all threads: less sensitive to a busy machine
        "peak_mem_mb": peak / MIB,
        "mem_after_build_mb": rss_after_build / MIB,
        "torch_threads": torch.get_num_threads(),
    }
    if projection is not None:
        # what the step really spent in P c and Pᵀ g (per tensor, rows only for embeddings), median over steps
        result["step_matvec_s"] = statistics.median(phases["proj_fwd"])
        result["step_rmatvec_s"] = statistics.median(phases["proj_bwd"])
        result["projection_share"] = statistics.median(
            (f + b) / t for f, b, t in zip(phases["proj_fwd"], phases["proj_bwd"], phases["step"]))
        result.update(measure_projection_products(projection, repeats=3))  # whole-D products, for the estimates
        result["D"] = projection.D
    return result


def time_projection_calls(projection) -> dict:
    """Wrap the projection's product methods (on this instance only) to add their wall time to the returned dict's
    ``forward`` (P c and its slices) and ``backward`` (Pᵀ g and its slices) entries."""
    totals = {"forward": 0.0, "backward": 0.0}
    for name, key in (("matvec", "forward"), ("matvec_rows", "forward"), ("matvec_at", "forward"),
                      ("rmatvec", "backward"), ("rmatvec_rows", "backward"), ("rmatvec_at", "backward")):
        fn = getattr(projection, name)

        def timed(*a, _fn=fn, _key=key, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_key] += time.perf_counter() - t
        setattr(projection, name, timed)
    return totals


def measure_projection_products(projection, repeats: int) -> dict:
    c = torch.randn(projection.d)
    g = torch.randn(projection.D)
    mv, _ = median_time(lambda: projection.matvec(c), repeats)
    rmv, _ = median_time(lambda: projection.rmatvec(g), repeats)
    return {"matvec_s": mv, "rmatvec_s": rmv}


# ================================================================================================================
# (b) projection micro-benchmark, with the cost models used to skip (and estimate) sizes that do not fit
# ================================================================================================================
def cost_units(kind: str, D: int, d: int) -> tuple[float, float]:
    """(time units, memory units) of one product: measured cost / units is ~constant per kind."""
    if kind == "hashing":
        return D, D
    if kind == "fastfood":
        from hf_subspace.projections.hadamard import factor_bits

        B = 1 << max(0, math.ceil(math.log2(d)))
        padded = math.ceil(D / B) * B
        return padded * sum(1 << b for b in factor_bits(int(math.log2(B)))) or padded, padded
    if kind == "sparse":
        nnz = d * math.sqrt(D)  # density 1/√D
        return nnz + D, nnz + D
    if kind == "dense":
        return D * d, D
    raise ValueError(kind)


class CostModel:
    """Cost of a projection size from the measured ones: each quantity (product time, build time, peak memory) is
    taken as ``a + b * units`` (:func:`cost_units`) through the two measured sizes nearest to the target in
    (log D, log d), or as proportional to the units from the nearest one when that line does not rise."""

    QUANTITIES = ("product_s", "build_s", "peak_mem_mb")

    def __init__(self):
        self.points: dict[str, list[dict]] = {}

    @staticmethod
    def units(kind: str, quantity: str, D: int, d: int) -> float:
        time_units, memory_units = cost_units(kind, D, d)
        if quantity == "peak_mem_mb" or (quantity == "build_s" and kind != "dense"):
            return memory_units
        return time_units

    def update(self, kind: str, D: int, d: int, result: dict) -> None:
        if result.get("status") == "measured":
            self.points.setdefault(kind, []).append({
                "D": D, "d": d, "product_s": max(result["matvec_s"], result["rmatvec_s"]),
                "build_s": result["build_s"], "peak_mem_mb": result["peak_mem_mb"]})

    def estimate(self, kind: str, D: int, d: int) -> dict | None:
        points = self.points.get(kind)
        if not points:
            return None
        out, used = {}, set()
        for q in self.QUANTITIES:
            target = self.units(kind, q, D, d)
            pts = sorted(((self.units(kind, q, p["D"], p["d"]), p) for p in points),
                         key=lambda up: math.hypot(math.log(up[1]["D"] / D), math.log(up[1]["d"] / d)))
            (u1, p1), value = pts[0], None
            used.add((p1["D"], p1["d"]))
            if len(pts) > 1 and pts[1][0] != u1:
                u2, p2 = pts[1]
                slope = (p2[q] - p1[q]) / (u2 - u1)
                if slope > 0:
                    value = max(0.0, p1[q] + slope * (target - u1))
                    used.add((p2["D"], p2["d"]))
            out[q] = value if value is not None else p1[q] * target / u1
        out["basis"] = f"extrapolated from {kind} measured at " + ", ".join(
            f"D={D_:.0e} d={d_:.0e}" for D_, d_ in sorted(used))
        return out


def too_costly(kind: str, D: int, d: int, est: dict | None, limits: dict) -> str | None:
    """The reason not to run (kind, D, d), or None. Static rules first, then the cost model's estimate."""
    if kind == "sparse" and d * math.sqrt(D) > 600_000_000:
        return f"~{d * math.sqrt(D):.1e} nonzeros: over the sparse projection's own limit (6e8)"
    if est is None:
        return None
    if est["product_s"] > limits["product_s"]:
        return f"estimated {est['product_s']:.0f} s per product > limit {limits['product_s']:.0f} s"
    if est["peak_mem_mb"] > limits["mem_mb"]:
        return f"estimated peak memory {est['peak_mem_mb'] / 1024:.1f} GiB > budget {limits['mem_mb'] / 1024:.1f} GiB"
    if est["build_s"] > limits["build_s"]:
        return f"estimated build time {est['build_s']:.0f} s > limit {limits['build_s']:.0f} s"
    return None


def import_projections():
    """``hf_subspace.projections`` without running ``hf_subspace/__init__`` (it imports peft: seconds per worker)."""
    import importlib
    import importlib.util
    import types

    if "hf_subspace" not in sys.modules:
        package = types.ModuleType("hf_subspace")
        package.__path__ = list(importlib.util.find_spec("hf_subspace").submodule_search_locations)
        sys.modules["hf_subspace"] = package
    return importlib.import_module("hf_subspace.projections")


def measure_projection(kind: str, D: int, d: int, repeats: int) -> dict:
    """Build time, median P c / Pᵀ g time and peak memory growth of one projection; runs in a worker."""
    projections = import_projections()
    c = torch.randn(d)
    g = torch.randn(D)
    memory = PeakMemory()
    t0 = time.perf_counter()
    proj = projections.make_projection(kind, D, d, seed=0)
    if kind == "dense":
        proj.inv_norms()  # column norms: one pass over P, done once and cached
    build_s = time.perf_counter() - t0
    first = time.perf_counter()
    proj.matvec(c)
    first = time.perf_counter() - first
    if first > 5:
        repeats = 1
    elif first > 1:
        repeats = min(repeats, 3)
    mv, mv_all = median_time(lambda: proj.matvec(c), repeats)
    rmv, rmv_all = median_time(lambda: proj.rmatvec(g), repeats)
    peak = memory.stop()
    state = 0 if kind == "dense" else sum(t.numel() * t.element_size() for t in proj.state_tensors().values())
    return {"status": "measured", "build_s": build_s, "matvec_s": mv, "rmatvec_s": rmv, "matvec_s_all": mv_all,
            "rmatvec_s_all": rmv_all, "peak_mem_mb": peak / MIB, "state_mb": state / MIB,
            "torch_threads": torch.get_num_threads()}


def micro_configs(quick: bool) -> list[tuple[str, str, int, int]]:
    kinds = ["hashing", "fastfood", "sparse", "dense"]
    Ds = [10**5, 10**6, 10**7] if quick else [10**5, 10**6, 10**7, 10**8]
    ds = [10**4] if quick else [10**2, 10**3, 10**4, 10**5]
    configs = [("D sweep", kind, D, 1000) for kind in kinds for D in Ds]
    configs += [("d sweep", kind, 10**7, d) for kind in kinds for d in ds if d != 1000]  # d=1000 is in D sweep
    return configs


def run_micro(args, results: dict, save) -> CostModel:
    costs = CostModel()
    limits = {"mem_mb": args.mem_budget_gb * 1024, "product_s": args.max_product_s, "build_s": args.max_build_s}
    rows = results.setdefault("micro", [])
    done = {(r["kind"], r["D"], r["d"]) for r in rows}
    for row in rows:  # learn from rows measured by an earlier (resumed) run
        costs.update(row["kind"], row["D"], row["d"], row)
    for sweep, kind, D, d in tqdm(micro_configs(args.quick), desc="(b) projections"):
        if (kind, D, d) in done:
            continue
        est = costs.estimate(kind, D, d)
        reason = too_costly(kind, D, d, est, limits)
        if reason:
            row = {"status": "estimated" if est else "skipped", "reason": reason, **(est or {})}
            if est:
                row["matvec_s"] = row["rmatvec_s"] = row.pop("product_s")
        else:
            row = run_worker(["--worker", "micro", "--kind", kind, "--D", str(D), "--d", str(d),
                              "--repeats", str(args.micro_repeats)], timeout=args.timeout)
            costs.update(kind, D, d, row)
        row.update({"sweep": sweep, "kind": kind, "D": D, "d": d})
        rows.append(row)
        done.add((kind, D, d))
        save()
    return costs


# ================================================================================================================
# (a) driver: measured runs, estimates for the infeasible ones, ratios
# ================================================================================================================
def estimate_global_step(spec: dict, D: int, head: int, costs: CostModel, measured: dict,
                         limits: dict) -> dict | None:
    """None if the global subspace method ``spec`` should be run; else a row that estimates it (or says why it
    was skipped): the step of the measured global hashing run at the nearest d, minus its projection, plus the
    estimated products of this kind (from the micro-benchmark's cost model)."""
    kind, d = spec["options"]["projection"], spec["options"]["dim"]
    if kind == "hashing" or spec["options"]["target_modules"] is not None:
        return None
    est = costs.estimate(kind, D, d)
    reason = too_costly(kind, D, d, est, limits)
    hashing = {r["options"]["dim"]: r for r in measured.values() if r.get("status") == "measured"
               and r.get("options", {}).get("projection") == "hashing" and r["options"].get("target_modules") is None}
    base = hashing[min(hashing, key=lambda x: abs(math.log(x / d)))] if hashing else None
    step = None
    if est is not None and base is not None:
        step = base["step_s"] - base["matvec_s"] - base["rmatvec_s"] + 2 * est["product_s"]
        if reason is None and step > limits["step_s"]:
            reason = f"estimated step {step:.0f} s > limit {limits['step_s']:.0f} s"
    if reason is None:
        return None
    if step is None:
        return {"status": "skipped", "reason": reason + " (no basis for an estimate)"}
    peak = base["peak_mem_mb"] + est["peak_mem_mb"]  # hashing's own state is small next to the model's
    return {"status": "estimated", "reason": reason, "step_s": step, "matvec_s": est["product_s"],
            "rmatvec_s": est["product_s"], "peak_mem_mb": peak, "build_s": est["build_s"],
            "projection_share": 2 * est["product_s"] / step, "trainable_params": d + head, "D": D,
            "basis": f"hashing step at d={fmt_dim(base['options']['dim'])} - its projection + 2 x {est['basis']}; "
                     "memory: that run's peak + the projection's estimated peak"}


def selected_specs(args) -> list[dict]:
    """The methods ``--only`` picks: an entry equal to a method id picks that method alone, any other entry every
    method whose id contains it."""
    specs = method_specs(args.quick)
    if not args.only:
        return specs
    ids = {s["id"] for s in specs}
    return [s for s in specs if any(o == s["id"] or (o not in ids and o in s["id"]) for o in args.only)]


def run_steps(args, results: dict, costs: CostModel, save) -> None:
    total, D = minilm_num_weights()
    results["minilm"] = {"num_parameters": total, "D_global": D}
    limits = {"mem_mb": args.mem_budget_gb * 1024, "product_s": args.max_step_s / 2, "build_s": args.max_build_s,
              "step_s": args.max_step_s}
    rows = results.setdefault("steps", {})
    specs = selected_specs(args)
    if args.remeasure:  # --resume keeps the other rows; these are measured afresh
        for spec in specs:
            rows.pop(spec["id"], None)
    specs = [s for s in specs if not (s["id"] in rows and rows[s["id"]].get("status") == "measured")]
    rounds: dict[str, list[dict]] = {}
    # round-robin: every method runs once per round, so slow drifts of a shared machine hit all methods alike
    for r in range(args.rounds):
        for spec in tqdm(specs, desc=f"(a) training steps, round {r + 1}/{args.rounds}"):
            if r > 0 and rows.get(spec["id"], {}).get("status") != "measured":
                continue  # estimated or failed in round 1
            row = None
            if spec["family"] == "subspace" and r == 0:
                row = estimate_global_step(spec, D, total - D, costs, rows, limits)
            if row is None:
                row = run_worker(["--worker", "steps", "--spec", json.dumps(spec), "--warmup", str(args.warmup),
                                  "--steps", str(args.steps)], timeout=args.timeout)
                rounds.setdefault(spec["id"], []).append(row)
                if row.get("status") == "measured":
                    row = pool_rounds(rounds[spec["id"]])
            row.update({"label": spec["label"], "family": spec["family"], "options": spec["options"]})
            rows[spec["id"]] = row
            save()
    add_ratios(rows)
    save()


# ================================================================================================================
# (c) accuracy
# ================================================================================================================
def train_and_evaluate(spec: dict, lr: float, n_train: int, n_test: int, seed: int = 0) -> dict:
    """One epoch of AdamW (linear decay, 6% warm-up) on the Rotten Tomatoes split, then test accuracy."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    train = tokenized_batches(n_train, "train", seed, n_train=n_train, n_test=n_test)
    test = tokenized_batches(n_test, "test", seed, n_train=n_train, n_test=n_test)
    val = tokenized_batches(VAL_SIZE, "val", seed, n_train=n_train, n_test=n_test)
    model = build_method(spec)
    opt = _models.adamw(model, lr=lr, weight_decay=0.0 if spec["family"] == "subspace" else 0.01)
    n_steps = math.ceil(n_train / BATCH)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * n_steps), n_steps)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    losses = []
    t0 = time.perf_counter()
    model.train()
    for i in tqdm(range(n_steps), desc=f"{spec['id']} lr={lr:g}", leave=False):
        idx = order[i * BATCH : (i + 1) * BATCH]
        out = model(input_ids=train[0][idx], attention_mask=train[1][idx], labels=train[2][idx])
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    train_s = time.perf_counter() - t0
    model.eval()

    def accuracy_on(split) -> float:
        correct = 0
        with torch.no_grad():
            for i in range(0, len(split[2]), 64):
                logits = model(input_ids=split[0][i : i + 64], attention_mask=split[1][i : i + 64]).logits
                correct += int((logits.argmax(-1) == split[2][i : i + 64]).sum())
        return correct / max(1, len(split[2]))

    tail = losses[-50:]
    return {"status": "measured", "lr": lr, "accuracy": accuracy_on(test), "val_accuracy": accuracy_on(val),
            "n_val": len(val[2]), "train_s": train_s,
            "final_train_loss": sum(tail) / len(tail), "trainable_params": _models.trainable(model),
            "n_train": n_train, "n_test": n_test}


def next_lr(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3-10 ladder above (or below) ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    ladder = [m * 10.0 ** e for e in range(exponent - 1, exponent + 2) for m in (1, 3)]
    out = min(x for x in ladder if x > lr * 1.01) if up else max(x for x in ladder if x < lr / 1.01)
    return float(f"{out:.1g}")


def run_accuracy(args, results: dict, save) -> None:
    def train_at(spec, lr) -> dict:  # one accuracy run, in a worker
        row = run_worker(["--worker", "accuracy", "--spec", json.dumps(spec), "--lr", str(lr),
                          "--n-train", str(args.n_train), "--n-test", str(args.n_test)], timeout=args.accuracy_timeout)
        row.setdefault("lr", lr)
        return row

    rows = results.setdefault("accuracy", {})
    steps = results.get("steps", {})
    specs = selected_specs(args)
    for spec in tqdm(specs, desc="(c) accuracy"):
        if steps.get(spec["id"], {}).get("status") in ("estimated", "skipped", "failed"):
            rows[spec["id"]] = {"label": spec["label"], "status": "skipped",
                                "reason": "not run: " + steps[spec["id"]].get("reason", "too costly")}
            continue
        runs = rows.setdefault(spec["id"], {"label": spec["label"], "runs": []})["runs"]
        for lr in spec.get("lrs") or LEARNING_RATES[spec["family"]]:
            if any(r.get("lr") == lr and r.get("status") == "measured" for r in runs):
                continue
            runs.append(train_at(spec, lr))
            save()
        for _ in range(args.extend_edges):  # the best on validation at an end of the grid: one step further out
            done = [r for r in runs if r.get("status") == "measured"]
            if not done:
                break
            best = max(done, key=lambda r: (r.get("val_accuracy", r["accuracy"]), -r["lr"]))
            tried = sorted(r["lr"] for r in done)
            if len(tried) < 2 or tried[0] < best["lr"] < tried[-1]:
                break
            row = train_at(spec, next_lr(best["lr"], up=best["lr"] == tried[-1]))
            row["extended"] = True
            runs.append(row)
            save()
        done = [r for r in runs if r.get("status") == "measured"]
        if done:
            best = max(done, key=lambda r: (r.get("val_accuracy", r["accuracy"]), -r["lr"]))  # chosen on validation
            rows[spec["id"]].update({"best_lr": best["lr"], "accuracy": best["accuracy"],
                                     "val_accuracy": best.get("val_accuracy"),
                                     "trainable_params": best["trainable_params"]})
        save()


# ================================================================================================================
# (d) profile of one step: where the time goes
# ================================================================================================================
@contextmanager
def labelled_subspace_regions():
    """Wrap the projection products (whole or per tensor rows) and the θ0 + δ materialization in profiler labels,
    without changing the library: every class that defines one of the methods gets a labelled wrapper."""
    from torch.profiler import record_function

    from hf_subspace.engine import SubspaceEngine
    from hf_subspace.projections import PROJECTION_KINDS
    from hf_subspace.projections.base import Projection

    labels = {"matvec": "hf_subspace: P c", "matvec_rows": "hf_subspace: P c",
              "rmatvec": "hf_subspace: P^T g", "rmatvec_rows": "hf_subspace: P^T g",
              "matvec_at": "hf_subspace: P c", "rmatvec_at": "hf_subspace: P^T g",
              "apply_delta": "hf_subspace: theta0 + delta", "rows_delta": "hf_subspace: theta0 + delta"}
    patched = []

    def labelled(fn, label):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper

    for cls in {Projection, SubspaceEngine, *PROJECTION_KINDS.values()}:
        for name, label in labels.items():
            if name in vars(cls):
                patched.append((cls, name, vars(cls)[name]))
                setattr(cls, name, labelled(vars(cls)[name], label))
    try:
        yield
    finally:
        for cls, name, fn in reversed(patched):
            setattr(cls, name, fn)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
MATERIALIZE_BACKWARD = ("SliceBackward0", "SplitWithSizesBackward0", "ToCopyBackward0")


def profile_one_step(spec: dict) -> dict:
    """torch.profiler over one training step (after 2 warm-up steps), grouped into where the time goes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    input_ids, attention_mask, labels = tokenized_batches(3 * BATCH)
    model = build_method(spec)
    opt = _models.adamw(model, lr=SPEED_LR[spec["family"]])

    def step(i):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        with record_function("forward"):
            out = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], labels=labels[sl])
        with record_function("backward"):
            out.loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    with labelled_subspace_regions():
        step(0)
        step(1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(2)
            wall = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}

    def total(key):
        return events[key].cpu_time_total / 1e6 if key in events else 0.0

    def self_time(key):
        return events[key].self_cpu_time_total / 1e6 if key in events else 0.0

    backward_nodes = {k.split(": ", 1)[1]: e.cpu_time_total / 1e6 for k, e in events.items()
                      if k.startswith("autograd::engine::evaluate_function: ")}
    parts = {
        "projection P c": total("hf_subspace: P c"),
        "projection P^T g": total("hf_subspace: P^T g"),
        "materialize theta0+delta (forward)": total("hf_subspace: theta0 + delta") - total("hf_subspace: P c"),
        "materialize backward (slice/split/view grads)": sum(backward_nodes.get(k, 0.0) for k in MATERIALIZE_BACKWARD),
        "matmuls + attention (fwd+bwd)": sum(self_time(k) for k in MATMUL_OPS),
        "optimizer step": total("optimizer"),
    }
    profiled = total("forward") + total("backward") + total("optimizer")
    parts["everything else"] = profiled - sum(parts.values())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"status": "measured", "wall_s": wall, "profiled_s": profiled,
            "forward_s": total("forward"), "backward_s": total("backward"), "parts_s": parts,
            "top_backward_nodes_s": dict(sorted(backward_nodes.items(), key=lambda kv: -kv[1])[:8]),
            "op_table": table}


PROFILE_CASES = [
    {"id": "full", "family": "full", "label": "full fine-tuning", "options": {}},
    {"id": "lora", "family": "lora", "label": "PEFT LoRA r=8 (q,v)", "options": {"r": 8}},
    {"id": "subspace-qv-hashing-10000", "family": "subspace", "label": "hf_subspace hashing d=10k (q,v)",
     "options": {"dim": 10_000, "projection": "hashing", "target_modules": ["query", "value"]}},
    {"id": "global-hashing-10000", "family": "subspace", "label": "hf_subspace global hashing d=10k",
     "options": {"dim": 10_000, "projection": "hashing", "target_modules": None}},
]


def run_profile(args, results: dict, save) -> None:
    rows = results.setdefault("profile", {})
    for spec in tqdm(PROFILE_CASES, desc="(d) profile"):
        cmd = ["--worker", "profile", "--spec", json.dumps(spec)]
        rows[spec["id"]] = {"label": spec["label"], **run_worker(cmd, timeout=args.timeout)}
        save()


# ================================================================================================================
# report
# ================================================================================================================
def markdown_report(results: dict) -> str:
    m = results["machine"]
    out = ["# hf_subspace speed benchmark", "",
           f"{m['time']} · {m['cpu_model']} · {m['cpu_count']} CPUs (affinity {m['cpu_affinity']}) · "
           f"torch {m['torch']} with {m['torch_threads']} threads ({m['torch_parallel_backend']}) · "
           f"transformers {m['transformers']} · peft {m['peft']} · {m['mem_total_gib']} GiB RAM · "
           f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}", ""]
    src = m.get("hf_subspace_source", {})
    out += [f"hf_subspace at commit {src.get('commit', '?')} (sources {src.get('sources_sha256', '?')}"
            + (f", modified: {', '.join(src['modified'])}" if src.get("modified") else "") + ").", ""]
    hashes = {r.get("sources_sha256") for r in list(results.get("steps", {}).values()) + results.get("micro", [])
              + list(results.get("profile", {}).values()) if r.get("sources_sha256")}
    if len(hashes) > 1:
        out += [f"**Warning: the hf_subspace sources changed during this run** ({len(hashes)} versions measured; "
                "see sources_sha256 in speed.json).", ""]
    if results.get("args", {}).get("quick"):
        out += ["**Quick run**: reduced set of methods and sizes, fewer steps.", ""]
    steps = results.get("steps")
    if steps:
        a = results["args"]
        out += [f"## (a) Training step on MiniLM-L6 sequence classification "
                f"(batch {BATCH}, {SEQ_LEN} tokens, AdamW; median of {a['steps']} steps after {a['warmup']} warm-up"
                f"{', in each of ' + str(a.get('rounds', 1)) + ' round-robin rounds' if a.get('rounds', 1) > 1 else ''})",
                "", f"D (global θ, all weights but the head) = {results['minilm']['D_global']:,}. "
                "Peak memory = peak RSS growth over the process after imports (model + adapter + training state). "
                "CPU s/step = CPU seconds of all threads (less sensitive to other load on the machine than wall time). "
                "Ratios are of wall-clock step times and peak memories. *Estimated* (~) rows were not run; "
                "see the notes below the table.", ""]
        table, notes = [], []
        for key, r in steps.items():
            status = r.get("status", "?")
            if status != "measured":
                notes.append(f"- **{r['label']}** — {status}: {r.get('reason', '')}"
                             + (f" (estimate: {r['basis']})" if r.get("basis") else ""))
            phases = (f"{fmt_s(r['forward_s'])} / {fmt_s(r['backward_s'])} / {fmt_s(r['optimizer_s'])}"
                      if "forward_s" in r else "—")
            proj = (f"{fmt_s(r['step_matvec_s'])} + {fmt_s(r['step_rmatvec_s'])}" if "step_matvec_s" in r
                    else f"{fmt_s(r['matvec_s'])} + {fmt_s(r['rmatvec_s'])}" if "matvec_s" in r else "—")
            share = f"{100 * r['projection_share']:.0f}%" if "projection_share" in r else "—"
            est = "~" if status == "estimated" else ""
            load = r.get("load_average_1min")
            table.append([r["label"], fmt_int(r.get("trainable_params")), est + fmt_s(r.get("step_s")), phases,
                          fmt_s(r.get("cpu_s")), est + fmt_mb(r.get("peak_mem_mb")),
                          est + fmt_ratio(r.get("time_vs_full")), est + fmt_ratio(r.get("time_vs_lora")),
                          fmt_ratio(r.get("cpu_vs_full")), fmt_ratio(r.get("cpu_vs_lora")),
                          est + fmt_ratio(r.get("mem_vs_full")), est + fmt_ratio(r.get("mem_vs_lora")), est + proj,
                          est + share, status, "→".join(str(x) for x in load) if load else "—"])
        out += markdown_table(["method", "trainable", "step (s)", "fwd / bwd / opt (s)", "CPU s/step", "peak mem",
                               "time ×full", "time ×LoRA", "CPU ×full", "CPU ×LoRA", "mem ×full", "mem ×LoRA",
                               "P c + Pᵀg (s)", "share of step", "status", "load avg"], table, "lrrlrrrrrrrrrrll")
        out += [""] + notes + [""]
    micro = results.get("micro")
    if micro:
        out += ["## (b) Projection micro-benchmark (one product, median; memory = peak RSS growth of build + products)",
                ""]
        table, notes = [], []
        for r in micro:
            status = r.get("status", "?")
            est = "~" if status == "estimated" else ""
            if status != "measured":
                notes.append(f"- {r['kind']} D={r['D']:.0e} d={r['d']:.0e} — {status}: {r.get('reason', '')}"
                             + (f" ({r['basis']})" if r.get("basis") else ""))
            table.append([r["sweep"], r["kind"], f"{r['D']:.0e}", f"{r['d']:.0e}", est + fmt_s(r.get("build_s")),
                          est + fmt_s(r.get("matvec_s")), est + fmt_s(r.get("rmatvec_s")),
                          est + fmt_mb(r.get("peak_mem_mb")), fmt_mb(r.get("state_mb")), status])
        out += markdown_table(["sweep", "kind", "D", "d", "build (s)", "P c (s)", "Pᵀ g (s)", "peak mem", "P state",
                               "status"], table, "llrrrrrrrl")
        out += [""] + notes + [""]
    if steps:
        rows = [r for k, r in steps.items() if k.startswith("global-") and "projection_share" in r]
        if rows:
            out += [f"### Share of one MiniLM global step taken by the projection (P c + Pᵀ g) at "
                    f"D = {results['minilm']['D_global']:,}", "",
                    "In the step: the time of the projection calls the step made (per tensor; embeddings only for "
                    "the rows the batch reads), median over the timed steps. Whole θ: one P c and one Pᵀ g over all "
                    "D weights, timed alone (what a projection without row slices pays every step).", ""]
            table = []
            for r in rows:
                whole = r['matvec_s'] + r['rmatvec_s']
                in_step = (f"{fmt_s(r['step_matvec_s'])} + {fmt_s(r['step_rmatvec_s'])}"
                           if "step_matvec_s" in r else "—")
                table.append([r["label"], in_step, f"{100 * r['projection_share']:.1f}%", fmt_s(whole),
                              fmt_s(r["step_s"]), f"{100 * whole / r['step_s']:.1f}%", r["status"]])
            out += markdown_table(["method", "in the step: P c + Pᵀ g (s)", "share of step",
                                   "whole θ: P c + Pᵀ g (s)", "step (s)", "whole θ ÷ step", "status"], table, "lrrrrrl")
            out.append("")
    acc = results.get("accuracy")
    if acc:
        out += ["## (c) Accuracy after one epoch on Rotten Tomatoes", ""]
        table = []
        for r in acc.values():
            tried = ", ".join(f"{x['lr']:g} → {x.get('val_accuracy', float('nan')):.3f} / {x['accuracy']:.3f}"
                              if x.get("status") == "measured"
                              else f"{x.get('lr', '?'):g} → {x.get('status')}" for x in r.get("runs", []))
            table.append([r["label"], fmt_int(r.get("trainable_params")), tried or r.get("reason", ""),
                          r.get("best_lr", "—"), f"{r.get('accuracy', float('nan')):.3f}"])
        out += markdown_table(["method", "trainable", "learning rate → validation / test accuracy", "chosen lr",
                               "test accuracy"], table, "lrlrr")
        done = {k: r for k, r in acc.items() if "accuracy" in r and r.get("trainable_params")}
        ours = {k: r for k, r in done.items() if k.startswith(("subspace-", "global-")) and k.endswith("-10000")}
        for k, r in ours.items():  # the target: within 1 point of the best PEFT peer with a similar trainable count
            n = r["trainable_params"]
            peers = [p for j, p in done.items() if j in ("lora", "vera", "unilora") and n / 2 <= p["trainable_params"] <= 2 * n]
            if peers:
                best = max(peers, key=lambda p: p["accuracy"])
                gap = 100 * (r["accuracy"] - best["accuracy"])
                out.append(f"\n**{r['label']}** vs the best peer with a similar trainable count ({best['label']}, "
                           f"{best['trainable_params']:,}): {gap:+.1f} points — target (≥ −1.0): "
                           f"{'met' if gap >= -1.0 else 'NOT met'}.")
        n_val = next((x.get("n_val") for r in acc.values() for x in r.get("runs", []) if x.get("n_val")), None)
        out += ["", f"One epoch of AdamW (linear decay, 6% warm-up), batch {BATCH}, {SEQ_LEN} tokens. The learning "
                f"rate is chosen on a validation split ({n_val} sentences, disjoint from train and test); the test "
                "accuracy is that run's.", ""]
    prof = results.get("profile")
    if prof:
        out += ["## (d) Where one step's time goes (torch.profiler, one step after two warm-up ones)", ""]
        labels = [k for k in prof if "parts_s" in prof[k]]
        names = list(prof[labels[0]]["parts_s"]) if labels else []
        table = []
        for name in names:
            cells = []
            for k in labels:
                r = prof[k]
                v = r.get("parts_s", {}).get(name)
                cells.append("—" if v is None else f"{v:.3f} s ({100 * v / r['profiled_s']:.0f}%)")
            table.append([name, *cells])
        table.append(["**profiled step**", *(f"{prof[k].get('profiled_s', float('nan')):.3f} s" for k in labels)])
        out += markdown_table(["part", *(prof[k]["label"] for k in labels)], table)
        out += ["", "Profiler overhead inflates absolute times; compare the shares."]
    return "\n".join(out) + "\n"


# ================================================================================================================
# command line
# ================================================================================================================
def preload_imports() -> None:
    """Import everything a worker may use before its memory baseline, so imports do not count as a method's cost."""
    import importlib

    for name in ("peft", "peft.tuners.lora", "peft.tuners.vera", "peft.tuners.unilora",
                 "transformers.models.bert.modeling_bert", "hf_subspace"):
        importlib.import_module(name)


def worker_main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker != "micro":
        preload_imports()
    if args.worker == "steps":
        result = measure_training_steps(json.loads(args.spec), args.warmup, args.steps)
    elif args.worker == "micro":
        result = measure_projection(args.kind, args.D, args.d, args.repeats)
    elif args.worker == "accuracy":
        result = train_and_evaluate(json.loads(args.spec), args.lr, args.n_train, args.n_test)
    elif args.worker == "profile":
        result = profile_one_step(json.loads(args.spec))
    else:
        raise ValueError(args.worker)
    write_worker_result(args.result_file, result)


def parse_args(argv=None):
    p = benchmark_parser(__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter, out=True,
                         timeout=1800.0, worker=True, rounds=1,
                         rounds_help="(a): run every method this many times, round-robin, and pool the steps "
                                     "(default 1)", threads=None,
                         threads_help="torch threads in every measurement (default: torch's default, all cores). 1 "
                                      "makes CPU s/step a fair measure on a machine shared with other work")
    p.add_argument("--quick", action="store_true", help="reduced methods and sizes, 1 warm-up + 3 timed steps")
    p.add_argument("--accuracy", action="store_true", help="also train one epoch per method and learning rate (slow)")
    p.add_argument("--profile", action="store_true", help="also profile one step (full FT, LoRA, global hashing)")
    p.add_argument("--only", nargs="*", help="run only these methods: an exact id, or a string the ids contain")
    p.add_argument("--skip-micro", action="store_true", help="skip (b) (estimates then have no basis)")
    p.add_argument("--skip-steps", action="store_true", help="skip (a)")
    p.add_argument("--extend-edges", type=int, default=1,
                   help="(c): when the best lr on validation is at an end of the grid, try up to this many further "
                        "steps of the 1-3-10 ladder (default 1)")
    p.add_argument("--remeasure", action="store_true",
                   help="(a) with --resume: measure the methods chosen by --only again instead of keeping them")
    p.add_argument("--resume", action="store_true", help="keep measured results already in <out>/speed.json")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 3)")
    p.add_argument("--micro-repeats", type=int, default=None, help="products timed per size (default 5, quick 3)")
    p.add_argument("--max-product-s", type=float, default=None, help="micro: skip a size whose product would take "
                   "longer (default 20 s, quick 5 s)")
    p.add_argument("--max-step-s", type=float, default=None, help="(a): estimate instead of running a method whose "
                   "step would take longer (default 40 s, quick 20 s)")
    p.add_argument("--max-build-s", type=float, default=120.0, help="skip a projection slower to build")
    p.add_argument("--mem-budget-gb", type=float, default=None, help="skip what would need more memory "
                   "(default: half of the available memory)")
    p.add_argument("--n-train", type=int, default=None, help="accuracy: training examples (default 8000, quick 400)")
    p.add_argument("--n-test", type=int, default=None, help="accuracy: test examples (default 2000, quick 400)")
    p.add_argument("--accuracy-timeout", type=float, default=4 * 3600.0)
    # worker-only arguments
    p.add_argument("--worker", choices=["steps", "micro", "accuracy", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--D", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"warmup": 1 if q else 2, "steps": 3 if q else 10, "micro_repeats": 3 if q else 5,
                "max_product_s": 12.0 if q else 20.0, "max_step_s": 20.0 if q else 40.0,
                "n_train": 400 if q else 8000, "n_test": 400 if q else 2000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mem_budget_gb is None:
        args.mem_budget_gb = round(meminfo("MemAvailable") / 2**30 / 2, 1)
    return args


def main(argv=None) -> None:
    global WORKER_THREADS
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    WORKER_THREADS = args.threads
    out = Path(args.out)
    json_path, md_path = out / "speed.json", out / "speed.md"
    results = read_results(json_path) if args.resume else {}
    results["machine"] = machine_info()
    if args.threads:
        results["machine"]["torch_threads"] = args.threads  # what the workers use
    results["args"] = {k: v for k, v in vars(args).items() if k not in ("worker", "result_file", "spec", "kind",
                                                                         "D", "d", "repeats", "lr")}

    def save():
        write_report(out, "speed", results, markdown_report(results), echo=False)

    t0 = time.time()
    costs = CostModel() if args.skip_micro else run_micro(args, results, save)
    if not args.skip_steps:
        run_steps(args, results, costs, save)
    if args.profile:
        run_profile(args, results, save)
    if args.accuracy:
        run_accuracy(args, results, save)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["machine"]["hf_subspace_source_end"] = source_state()
    results["elapsed_s"] = time.time() - t0
    save()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {results['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
