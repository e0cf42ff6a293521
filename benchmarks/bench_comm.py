"""Bytes sent per training step on 2 processes (DDP over gloo), counted, and the same on paper for 7B / 70B models.

    python benchmarks/bench_comm.py [--only sub1k full ...] [--steps 4] [--out benchmarks/results]

writes ``<out>/comm.json`` and ``<out>/comm.md``. Each method runs in its own ``torchrun --nproc_per_node 2`` launch
(through the shared harness: a fresh process per method) and trains a small BERT (hidden 128, 4 layers, vocab 2,000:
D ≈ 1.1M weights, sequence classification) for a few steps with the ``SubspaceTrainer`` / ``TWATrainer`` / ``Trainer`` as a user
would. What crosses the network is counted on rank 0 by :class:`CommCounter` (benchmarks/_comm.py): DDP's gradient
buckets through a communication hook (``DistributedDataParallel.register_comm_hook``), and every collective called
outside DDP (``torch.distributed.all_reduce`` / ``all_gather`` / ``broadcast`` and DDP's buffer broadcasts) by
wrapping it. A count is a collective's payload; a ring all-reduce puts ``2 (N-1)/N`` times that on each link.

Methods: hf_subspace global hashing d = 1k and 10k (+ the classifier head, trained in full), PEFT LoRA r=8 (q,v; +
head), full fine-tuning, and one-run TWA (its ordinary phase is full fine-tuning; the TWA phase trains k
coefficients). FSDP2 (``llama_*``, a small Llama in a loop of one's own): hf_subspace fastfood d = 10k under DDP and
under FSDP2 (``hf_subspace.shard_model``: θ0's all-gathers + 4·d), PEFT LoRA r=8 under FSDP2, and the parameter
bytes each rank holds at 1 and 2 processes. ``--only`` keeps the other methods' earlier results in ``comm.json``.
The on-paper table carries the per-step gradient payloads to Llama-2-7B / 70B at 8 and 64 GPUs and the time of a
ring all-reduce of them at 100 Gb/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import _models  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)
from _harness import (benchmark_parser, fmt_int, machine_info, markdown_table, read_results,  # noqa: E402
                      round_robin, write_report)
import _harness  # noqa: E402

import torch  # noqa: E402

METHODS = {
    "sub1k": "hf_subspace global hashing d=1k (+ head)",
    "sub10k": "hf_subspace global hashing d=10k (+ head)",
    "lora": "PEFT LoRA r=8 on q,v (+ head)",
    "full": "full fine-tuning",
    "twa": "one-run TWA (ordinary phase, then k coefficients)",
    "basis_sharded": "TWA basis built sharded by coordinates over 2 ranks (memory)",
    "basis_whole": "TWA basis built whole on each of 2 ranks (memory)",
    # a small Llama (causal LM, untied embedding and head), a loop of one's own
    "llama_ddp_sub10k": "Llama, DDP: hf_subspace fastfood d=10k",
    "llama_fsdp_sub10k": "Llama, FSDP2 (hf_subspace.shard_model): hf_subspace fastfood d=10k",
    "llama_fsdp_sub10k_1proc": "Llama, FSDP2 on 1 process (memory reference)",
    "llama_fsdp_lora": "Llama, FSDP2 (fully_shard per decoder layer + root): PEFT LoRA r=8 (q,v)",
}
LLAMA_METHODS = tuple(m for m in METHODS if m.startswith("llama_"))
PER_DEVICE_BATCH, SEQ = 8, 32
LINK_GBIT = 100


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(cfg)


def dataset(n):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 2000, (n, SEQ), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


BASIS_D, BASIS_SNAPSHOTS, BASIS_CHUNK = 8 * 2**20, 9, 1 << 18


def basis_memory_worker(variant: str, result_file: str) -> None:
    """Peak RSS growth of building the TWA basis ``variant`` = "sharded" over the ranks or "whole" on each, from 9
    snapshots of D = 8M weights (in memory before the measurement starts), in a fresh launch per variant; every
    rank measures, rank 0 writes."""
    import torch.distributed as dist

    from _harness import PeakMemory
    from hf_subspace.twa import build_trajectory_basis
    from hf_subspace.twa.sharded import build_sharded_trajectory_basis

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    sizes = [BASIS_D // 4] * 4
    snaps = [{f"w{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)} for _ in range(BASIS_SNAPSHOTS)]
    dist.barrier()
    peak = PeakMemory()
    if variant == "sharded":
        result = build_sharded_trajectory_basis(snaps, chunk_size=BASIS_CHUNK)
        held = result.projection.state_bytes()
    else:
        result = build_trajectory_basis(snaps, chunk_size=BASIS_CHUNK)
        held = result.basis.numel() * 4
    mine = {"peak_growth_mb": peak.stop() / 2**20, "basis_mb": held / 2**20,
            "mean_mb": sum(t.numel() for t in result.mean.values()) * 4 / 2**20}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        Path(result_file).write_text(json.dumps({
            "status": "measured", "method": f"basis_{variant}", "label": METHODS[f"basis_{variant}"],
            "D": BASIS_D, "snapshots": BASIS_SNAPSHOTS, "k": result.k, "chunk_size": BASIS_CHUNK, "ranks": gathered,
            "world_size": dist.get_world_size(), "bytes_per_step": None}))
    dist.destroy_process_group()


def build_llama():
    """A small Llama: hidden 128, 4 layers, vocab 2,000, untied embedding and head (as Llama-2): D ≈ 1.3M."""
    return _models.llama(vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)


def _param_bytes(model) -> dict:
    """Bytes of the parameters this rank holds: θ0 (its shard under FSDP2) and what is trained (c, LoRA)."""
    from hf_subspace.fsdp import is_dtensor

    held = {"theta0": 0, "trained": 0}
    for p in model.parameters():
        local = p.to_local() if is_dtensor(p) else p
        held["trained" if p.requires_grad else "theta0"] += local.numel() * local.element_size()
    return held


def llama_worker(method: str, steps: int, result_file: str) -> None:
    """A loop of one's own (AdamW, clipping) on the small Llama under DDP or FSDP2; every collective counted on
    rank 0, per step."""
    import torch.distributed as dist

    import hf_subspace as hs
    from _comm import CommCounter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = build_llama()
    D = sum(p.numel() for p in base.parameters())
    if method == "llama_fsdp_lora":
        from torch.distributed.fsdp import fully_shard

        model = _models.lora(base, ["q_proj", "v_proj"], alpha=None)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = _models.subspace(base, 10_000, projection="fastfood")
        if "fsdp" in method:
            hs.shard_model(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    held = _param_bytes(model)
    counter = CommCounter()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        counter.attach(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    per_step = []
    with counter.counting(ddp=False):
        for _ in range(steps):
            before = {k: list(v) for k, v in counter.outside.items()}
            ids = torch.randint(1, 2000, (PER_DEVICE_BATCH, SEQ), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            per_step.append({k: {"calls": len(v) - len(before.get(k, [])), "bytes": sum(v[len(before.get(k, [])):])}
                             for k, v in counter.outside.items() if len(v) > len(before.get(k, []))})
    if rank != 0:
        return
    last = per_step[-1]
    ddp = counter.syncs[-1] if counter.syncs else 0
    total = ddp + sum(v["bytes"] for v in last.values())
    result = {"status": "measured", "method": method, "label": METHODS[method], "world_size": world, "D": D,
              "trainable": sum(p.numel() for p in params), "per_step": last, "ddp_bytes_per_step": ddp,
              "bytes_per_step": total, "held": held}
    Path(result_file).write_text(json.dumps(result))


def worker(method: str, steps: int, result_file: str) -> None:
    """Runs on every rank of a torchrun launch; rank 0 writes the result."""
    if method in LLAMA_METHODS:
        llama_worker(method, steps, result_file)
        return
    if method.startswith("basis_"):
        basis_memory_worker(method.split("_", 1)[1], result_file)
        return
    import torch.distributed as dist

    from hf_subspace import SubspaceTrainer, SubspaceTrainingArguments, TWATrainer, TWATrainingArguments
    from _comm import CommCounter

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    model = build_model()
    D = sum(p.numel() for p in model.parameters())
    kw = dict(output_dir=os.path.join(os.path.dirname(result_file), f"comm-{method}"), use_cpu=True, report_to=[],
              per_device_train_batch_size=PER_DEVICE_BATCH, save_strategy="no", disable_tqdm=True, logging_steps=1,
              max_steps=steps, dataloader_num_workers=0, learning_rate=1e-3)
    if method.startswith("sub"):
        kw["subspace_dim"] = {"sub1k": 1_000, "sub10k": 10_000}[method]
    elif method == "lora":
        model = _models.lora(model, ["query", "value"], "SEQ_CLS", alpha=None)
    elif method == "twa":
        kw.update(twa_snapshot_steps=max(1, steps // 4), twa_epochs=1.0, twa_learning_rate=0.5)
    n_examples = PER_DEVICE_BATCH * world * steps
    counter = CommCounter()
    with counter.counting():
        trainer_cls, args_cls = (TWATrainer, TWATrainingArguments) if method == "twa" else (SubspaceTrainer,
                                                                                         SubspaceTrainingArguments)
        trainer = trainer_cls(model=model, args=args_cls(**kw), train_dataset=dataset(n_examples))
        trainer.train()
    if dist.get_rank() != 0:
        return
    trained = trainer.model if method != "twa" else None
    trainable = _models.trainable(trained) if trained is not None else D
    outside = {k: {"calls": len(v), "bytes": sum(v), "first_calls": v[:3], "last_call": v[-1]}
               for k, v in counter.outside.items()}
    result = {"status": "measured", "method": method, "label": METHODS[method], "world_size": world, "D": D,
              "trainable": trainable, "syncs": counter.syncs, "outside": outside,
              "bytes_per_step": counter.syncs[-1] if counter.syncs else None}
    if method == "twa":
        res = trainer.twa_result
        shard_steps = {k: outside[k]["last_call"] for k in ("all_gather_single", "reduce_scatter_single")
                       if k in outside}
        result.update(k=res.k, bytes_per_step_ordinary=counter.syncs[0], bytes_per_step=counter.syncs[-1],
                      sharded_collectives_per_step=shard_steps,
                      basis_bytes_per_rank=getattr(res, "basis_bytes_per_rank", None), basis_bytes_whole=4 * res.k * D)
    Path(result_file).write_text(json.dumps(result))


def launch(method: str, steps: int, result_file: str) -> None:
    """One torchrun launch of :func:`worker` on 2 processes (what the harness runs in a fresh process)."""
    import socket

    from torch.distributed import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    nproc = "1" if method.endswith("_1proc") else "2"
    run.main(["--nproc_per_node", nproc, "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
              "--worker", method, "--steps", str(steps), "--result-file", result_file])


# ------------------------------------------------------------------------------------------------------------
# on paper
# ------------------------------------------------------------------------------------------------------------
#: (name, D, layers, hidden, kv width) — Llama-2 7B and 70B (70B: grouped-query attention, 8 KV heads of 128)
PAPER_MODELS = [("Llama-2-7B", 6_738_415_616, 32, 4096, 4096), ("Llama-2-70B", 68_976_648_192, 80, 8192, 1024)]


def paper_rows(gpus=(8, 64), link_gbit=LINK_GBIT, k_twa=20) -> list[list]:
    """Per-step gradient payload and its ring all-reduce time (bandwidth term only) for each model and method."""
    rows = []
    for name, D, layers, hidden, kv in PAPER_MODELS:
        lora = layers * 8 * ((hidden + hidden) + (hidden + kv))  # r=8 on q (h->h) and v (h->kv): r·(in + out)
        # (label, payload, ring factor(N)): an all-reduce sends 2(N-1)/N of its payload per GPU, an all-gather or a
        # reduce-scatter (N-1)/N
        allreduce, gather = (lambda n: 2 * (n - 1) / n), (lambda n: (n - 1) / n)
        methods = [("full fine-tuning, fp32 gradients", 4 * D, allreduce),
                   ("full fine-tuning, bf16 gradients", 2 * D, allreduce),
                   ("LoRA r=8 (q,v)", 4 * lora, allreduce), ("hf_subspace d=10k", 4 * 10_000, allreduce),
                   (f"TWA phase, basis whole on each rank (k={k_twa})", 4 * k_twa, allreduce),
                   ("TWA phase, basis sharded by coordinates: all-gather of P c + reduce-scatter of g, fp32",
                    8 * D, gather),
                   ("TWA phase as nblt/TWA train_twa_ddp.py: DDP's all-reduce of g + one of Pᵀ-projected g, fp32",
                    8 * D, allreduce)]
        for label, payload, factor in methods:
            times = []
            for n in gpus:
                wire = factor(n) * payload  # bytes each GPU sends
                times.append(wire / (link_gbit * 1e9 / 8))
            rows.append([name, label, fmt_bytes(payload)] + [fmt_time(t) for t in times])
    return rows


#: vocabulary of Llama-2 (untied embedding and head)
PAPER_VOCAB = 32_000


def fsdp_paper_rows(gpus=(8, 64), link_gbit=LINK_GBIT, d=10_000, dtype_bytes=2) -> list[list]:
    """FSDP2 on paper, θ0 in bf16, ``hf_subspace.shard_model``'s grouping with ``reshard_after_forward=True``: per
    rank the parameter memory (θ0's shard; two decoder layers gathered at a time, the one computing and the one
    prefetched; the embedding and the head kept gathered from forward to backward; c and AdamW's two moments,
    float32) and the bytes each GPU receives per step (every unit gathered in the forward, the decoder layers again
    in the backward; c's all-reduce), with the time of that at ``link_gbit`` (bandwidth term; FSDP overlaps it with
    compute). Rows: ``[model, N, shard, gathered, c + Adam, total, all-gather bytes, c bytes, time]``."""
    rows = []
    for name, D, layers, hidden, _ in PAPER_MODELS:
        emb = PAPER_VOCAB * hidden
        layer = (D - 2 * emb - hidden) // layers
        for n in gpus:
            shard = dtype_bytes * D / n
            gathered = dtype_bytes * (2 * layer + 2 * emb)
            c_adam = 3 * 4 * d
            gather_payload = dtype_bytes * (D + D - 2 * emb - hidden)  # forward: all; backward: the layers again
            wire = (n - 1) / n * gather_payload + 2 * (n - 1) / n * 4 * d
            rows.append([name, str(n), fmt_bytes(shard), fmt_bytes(gathered), fmt_bytes(c_adam),
                         fmt_bytes(shard + gathered + c_adam), fmt_bytes(gather_payload), fmt_bytes(4 * d),
                         fmt_time(wire / (link_gbit * 1e9 / 8))])
    return rows


fmt_bytes = partial(_harness.fmt_bytes, spec=".3g")  # 3 significant digits: "27 GB", "16.8 MB"


def fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def markdown_report(results: dict, steps: int) -> str:
    lines = ["# Bytes per training step on 2 processes (DDP, gloo, CPU)", "",
             f"Small BERT (hidden 128, 4 layers, vocab 2,000), sequence classification, {PER_DEVICE_BATCH} × {SEQ} "
             f"tokens per process, {steps} steps; counted on rank 0 by `benchmarks/_comm.py`'s `CommCounter` "
             "(`python benchmarks/bench_comm.py`). Gradient bytes are the payload DDP all-reduces per optimizer step "
             "(its buckets, seen by a communication hook); buffers are DDP's broadcast of the model's buffers "
             "before each forward (BERT's position_ids / token_type_ids, int64); at start DDP broadcasts the "
             "whole model (θ0 included) once.", ""]
    rows = []
    for method, runs in results.items():
        if method.startswith("basis_") or method in LLAMA_METHODS:
            continue
        r = runs[-1]
        if r.get("status") != "measured":
            rows.append([METHODS[method], "failed: " + r.get("reason", "")[:80], "", "", "", ""])
            continue
        bc = r["outside"].get("_broadcast_coalesced", {})
        start = bc.get("first_calls", [None])[0]
        buffers = bc.get("last_call")
        per_step = r["bytes_per_step"]
        what = fmt_int(r["trainable"]) + " trainable"
        other = "—"
        if method == "twa":
            what = f"ordinary phase {fmt_int(r['bytes_per_step_ordinary'])} B; TWA phase k = {r['k']}"
            other = " + ".join(f"{fmt_int(v)} ({k.replace('_single', '')})"
                               for k, v in r.get("sharded_collectives_per_step", {}).items()) or "—"
        rows.append([r["label"], fmt_int(r["D"]), what, fmt_int(per_step), other, fmt_int(buffers), fmt_int(start)])
    lines += markdown_table(["method", "D", "trained", "gradient bytes / step (DDP)", "other collectives / step",
                             "buffer bytes / step", "bytes once at start"], rows)
    twa = results.get("twa", [{}])[-1]
    if twa.get("basis_bytes_per_rank"):
        lines += ["", f"TWA basis per rank (sharded by coordinates over 2 processes, the default on several): "
                  f"{fmt_int(twa['basis_bytes_per_rank'])} B, against {fmt_int(twa['basis_bytes_whole'])} B whole "
                  f"({twa['basis_bytes_per_rank'] / twa['basis_bytes_whole']:.3f}); the TWA phase's gradient bytes "
                  "are DDP's all-reduce of c, the other collectives the all-gather of P c and the reduce-scatter of "
                  "the gradient that the sharded basis needs (`twa_shard_basis=False` keeps the basis whole on every "
                  "rank and sends only the k numbers)."]
    sharded, whole = (results.get(m, [{}])[-1] for m in ("basis_sharded", "basis_whole"))
    if sharded.get("status") == "measured" and whole.get("status") == "measured":
        lines += ["", f"## TWA basis memory per rank, measured (2 processes, {sharded['snapshots']} snapshots of "
                  f"D = {fmt_int(sharded['D'])}, k = {sharded['k']})", "",
                  "Peak resident-set growth of each rank while building the basis, each way in a fresh launch (the "
                  "snapshots are in memory before; both also build the whole mean, "
                  f"{sharded['ranks'][0]['mean_mb']:.0f} MiB, and stream a float64 working block of "
                  f"{sharded['snapshots']} × {fmt_int(sharded['chunk_size'])}):", ""]
        mrows = [[str(i), f"{s_['basis_mb']:.0f} MiB", f"{s_['peak_growth_mb']:.0f} MiB", f"{w['basis_mb']:.0f} MiB",
                  f"{w['peak_growth_mb']:.0f} MiB", f"{s_['peak_growth_mb'] / w['peak_growth_mb']:.2f}"]
                 for i, (s_, w) in enumerate(zip(sharded["ranks"], whole["ranks"]))]
        lines += markdown_table(["rank", "sharded: basis held", "sharded: peak growth", "whole: basis held",
                                 "whole: peak growth", "peak ratio"], mrows)
        lines += ["", "The basis itself is exactly 1/N per rank; the peak falls less, because what both ways hold "
                  "besides it — the whole mean (the model is whole on every rank under DDP), the working block and "
                  "the float64 temporaries of each pass — does not shrink with N."]
    full = results.get("full", [{}])[-1].get("bytes_per_step")
    if full:
        lines += ["", "Ratio to full fine-tuning (gradient bytes per step): " + ", ".join(
            f"{m} {full / r[-1]['bytes_per_step']:.0f}×" for m, r in results.items()
            if m not in ("full", "twa") and m not in LLAMA_METHODS and r[-1].get("bytes_per_step"))]
    lines += llama_report(results)
    lines += ["", f"## On paper: gradient payload per step and ring all-reduce time at {LINK_GBIT} Gb/s", "",
              "Bandwidth term only: `2 (N-1)/N × payload / link` for a ring all-reduce, `(N-1)/N × payload / link` for "
              "an all-gather or a reduce-scatter; a collective's latency (a few µs to tens of µs "
              "per ring hop) dominates the small payloads. A subspace's payload does not grow with the model: "
              "d float32 numbers (the LM head is in θ; no head trained in full). TWA with the k × D basis whole on "
              "each rank also sends k numbers per step, but holds k·D floats per rank (k = 20: 540 GB at 7B in "
              "float32); sharding the basis by coordinates (`twa_shard_basis`, the default on several processes) "
              "cuts that to k·D/N, at the price of an all-gather of P c and a reduce-scatter of the gradient every "
              "step (each D-sized, as FSDP's).", ""]
    lines += markdown_table(["model", "method", "payload / step", "8 GPUs", "64 GPUs"], paper_rows(), align="llrrr")
    return "\n".join(lines) + "\n"


def llama_report(results: dict) -> list[str]:
    """The FSDP2 section: bytes per step by collective and the parameter bytes each rank holds."""
    got = {m: results[m][-1] for m in LLAMA_METHODS if m in results}
    if not got:
        return []
    lines = ["", "## FSDP2 beside DDP, and beside LoRA under FSDP2 (small Llama, measured)", "",
             f"Llama (hidden 128, 4 layers, vocab 2,000, untied embedding and head), {PER_DEVICE_BATCH} × {SEQ} tokens "
             "per process, AdamW with clipping, a loop of one's own (`python benchmarks/bench_comm.py --only "
             + " ".join(LLAMA_METHODS) + "`). Bytes per step on rank 0, last step: DDP's gradient buckets, and the "
             "collectives FSDP2 calls (`all_gather_single`: θ0's all-gathers, counted as the gathered buffer; "
             "`reduce_scatter_single`: gradients of sharded trainable parameters; `all_reduce`: c's gradient, by "
             "hf_subspace). Held: parameter bytes on one rank (θ0 or its shard; what is trained).", ""]
    rows = []
    for m, r in got.items():
        if r.get("status") != "measured":
            rows.append([METHODS[m], "failed: " + str(r.get("reason", ""))[:60], "", "", "", "", ""])
            continue
        ps = r["per_step"]
        cell = lambda k: (f"{fmt_int(ps[k]['bytes'])} ({ps[k]['calls']})" if k in ps else "—")  # noqa: E731
        rows.append([r["label"], str(r["world_size"]), fmt_int(r["D"]), fmt_int(r["trainable"]),
                     fmt_int(r["ddp_bytes_per_step"]) if r["ddp_bytes_per_step"] else "—",
                     cell("all_gather_single"), cell("reduce_scatter_single"), cell("all_reduce"),
                     fmt_int(r["bytes_per_step"]), fmt_int(r["held"]["theta0"]), fmt_int(r["held"]["trained"])])
    lines += markdown_table(["method", "processes", "D", "trained", "DDP buckets", "all-gathers (calls)",
                             "reduce-scatters (calls)", "all-reduces (calls)", "total / step", "θ0 held / rank",
                             "trained held / rank"], rows)
    lines += ["", f"## FSDP2 on paper: Llama-2, θ0 in bf16, d = 10k, {LINK_GBIT} Gb/s per GPU", "",
              "Per rank: θ0's shard (2·D/N), what is gathered at once (two decoder layers, the computing one and the "
              "prefetched one, plus the untied embedding and head, kept from forward to backward), c with AdamW's "
              "two moments (float32). Per step: the all-gathers' payload (every unit in the forward, the decoder "
              "layers again in the backward with reshard_after_forward: true; each GPU receives (N-1)/N of it) and "
              "c's all-reduce (4·d). Activations and the transient P c of the tensor being computed (one weight's "
              "size in float32) come on top. LoRA under FSDP2 gathers the same θ0 (and its adapters), then "
              "reduce-scatters its gradients; DDP gathers nothing but holds all of θ0 on every rank (13.5 GB / "
              "138 GB).", ""]
    lines += markdown_table(["model", "GPUs", "θ0 shard / rank", "gathered at once", "c + AdamW", "parameters / rank",
                             "all-gathers / step", "c all-reduce / step", "time of the gathers"], fsdp_paper_rows(),
                            align="lrrrrrrrr")
    return lines


def parse_args(argv=None):
    p = benchmark_parser(__doc__.split("\n\n")[0], out=True, timeout=900.0, worker=True)
    p.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--launch", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # run_worker passes it; workers use 1 thread
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.result_file)
        return
    if args.launch:
        launch(args.launch, args.steps, args.result_file)
        return
    methods = args.only or list(METHODS)
    jobs = {m: ["--launch", m, "--steps", str(args.steps)] for m in methods}
    results = round_robin(jobs, __file__, rounds=1, timeout=args.timeout,
                          progress=lambda name, r, res: print(f"{name}: {res.get('bytes_per_step', res)}",
                                                              file=sys.stderr))
    out = Path(args.out)
    if args.only:  # a partial run keeps the other methods' earlier results
        previous = read_results(out / "comm.json").get("results", {})
        results = {**{m: r for m, r in previous.items() if m in METHODS and m not in results}, **results}
        results = {m: results[m] for m in METHODS if m in results}
    write_report(out, "comm", {"machine": machine_info(), "steps": args.steps, "results": results},
                 markdown_report(results, args.steps))


if __name__ == "__main__":
    main()
