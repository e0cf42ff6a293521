"""Peak memory and step time of training the whole model in a subspace, against full fine-tuning and LoRA.

    python benchmarks/bench_memory.py [--rounds 2] [--threads 1] [--models gpt2 minilm] [--out benchmarks/results]

writes ``<out>/memory.json`` and ``<out>/memory.md``. For each model — GPT-2 124M from its default config (causal
LM, batch 4 x 128) and MiniLM-L6 (22.7M, sequence classification, batch 16 x 64) — each method runs in a fresh
process (so its peak is its own): build the model and the method, then 1 warm-up + 3 timed AdamW steps on random
token ids. Peak memory is the growth of the resident set over the process after its imports (model, adapter,
activations, gradients, optimizer state). The methods run ``--rounds`` times round-robin, and step times are the
median over all timed steps of all rounds (peaks: the median of the rounds' peaks). Methods: full fine-tuning,
PEFT LoRA r=8 (attention q,v), hf_subspace hashing d=10k on q,v, and hf_subspace over all weights (global) at
d = 1k / 10k / 100k — plus, for comparison in the same run, the global d=10k configuration as hf_subspace 0.1.0
ran it (hashing format 1: an int32 index per weight; adapted weights kept from forward to backward).
``--models llama4bit``: QLoRA (PEFT LoRA r=8 on q,v) against hf_subspace global hashing d=10k over every weight of
the same 4-bit (NF4, bitsandbytes) Llama, both after peft's ``prepare_model_for_kbit_training``.

The report also carries the same bytes per parameter to a 7B model (bf16 weights) on paper.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _setup import REPO  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)
from _harness import (MIB, PeakMemory, add_ratios, fmt_int, fmt_mb, fmt_ratio, fmt_s, machine_info,  # noqa: E402
                      markdown_table, pool_rounds, round_robin, run_worker, source_state, sources_sha256)

import torch  # noqa: E402

MODELS = {
    "gpt2": {"title": "GPT-2 124M (default config), causal LM, batch 4 x 128", "batch": 4, "seq": 128,
             "qv": ["c_attn"], "task": "CAUSAL_LM"},
    "minilm": {"title": "MiniLM-L6 (22.7M), sequence classification, batch 16 x 64", "batch": 16, "seq": 64,
               "qv": ["query", "value"], "task": "SEQ_CLS"},
    # QLoRA against the subspace on the same 4-bit base (issue 23): both after peft's prepare_model_for_kbit_training
    "llama4bit": {"title": "Llama (hidden 1024, 4 layers: 45.1M weights in linear layers, NF4 by bitsandbytes; "
                           "embeddings and untied head 32k x 1024 float32), causal LM, batch 4 x 128", "batch": 4,
                  "seq": 128, "qv": ["q_proj", "v_proj"], "task": "CAUSAL_LM", "quantized": True,
                  "methods": ["lora", "global10k", "global10k_linears"],
                  "labels": {"lora": "QLoRA: PEFT LoRA r=8 (q,v) on the 4-bit base",
                             "global10k": "hf_subspace global hashing d=10k on the 4-bit base (every weight)",
                             "global10k_linears": "hf_subspace global hashing d=10k on the 4-bit base (every weight "
                                                  "but embeddings and head)"}},
}

METHODS = [
    {"id": "full", "label": "full fine-tuning (AdamW)"},
    {"id": "lora", "label": "PEFT LoRA r=8 (q,v)"},
    {"id": "qv10k", "label": "hf_subspace hashing d=10k (q,v)", "dim": 10_000, "qv": True},
    {"id": "global1k", "label": "hf_subspace global hashing d=1k", "dim": 1_000},
    {"id": "global10k", "label": "hf_subspace global hashing d=10k", "dim": 10_000},
    {"id": "global100k", "label": "hf_subspace global hashing d=100k", "dim": 100_000},
    {"id": "global10k_linears", "label": "hf_subspace global hashing d=10k, embeddings and head left out",
     "dim": 10_000, "exclude": ["embed_tokens", "lm_head"], "models": ["llama4bit"]},
    {"id": "global10k_0.1.0", "label": "global hashing d=10k as in 0.1.0 (format 1, weights kept)", "dim": 10_000,
     "format": 1, "keep_weights": True},
]
WARMUP, STEPS = 1, 3


def build_model(name: str):
    if MODELS[name].get("quantized"):
        from peft import prepare_model_for_kbit_training
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_subspace.quantized import quantize_linear_layers

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816,
                                             num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                             max_position_embeddings=2048))
        quantize_linear_layers(model, bits=4, quant_type="nf4")
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config())
    from transformers import AutoModelForSequenceClassification

    from hf_subspace.demo.data import minilm_path

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def build_method(model, model_name: str, method: dict):
    from peft import LoraConfig, get_peft_model

    import hf_subspace

    spec = MODELS[model_name]
    if method["id"] == "full":
        return model
    if method["id"] == "lora":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=spec["qv"],
                                                task_type=spec["task"], fan_in_fan_out=model_name == "gpt2"))
    config = hf_subspace.SubspaceConfig(dim=method["dim"], target_modules=spec["qv"] if method.get("qv") else None,
                                        projection_format=method.get("format"), task_type=spec["task"],
                                        exclude_modules=method.get("exclude"))
    peft_model = get_peft_model(model, config)
    if method.get("keep_weights"):
        hf_subspace.find_engine(peft_model).recompute_saved_weights = False
    return peft_model


def projection_state_bytes(model) -> int | None:
    """Bytes of tensors the projections of ``model`` hold (their persistent state)."""
    import hf_subspace

    engine = hf_subspace.find_engine(model)
    if engine is None:
        return None
    total = 0
    for state in engine.adapters.values():
        total += sum(t.numel() * t.element_size() for t in vars(state.projection).values()
                     if isinstance(t, torch.Tensor))
    return total


def measure(model_name: str, method_id: str) -> dict:
    """One method on one model, in this (fresh) process: build, then WARMUP + STEPS AdamW steps."""
    spec = MODELS[model_name]
    method = next(m for m in METHODS if m["id"] == method_id)
    g = torch.Generator().manual_seed(0)
    memory = PeakMemory()
    model = build_model(model_name)
    vocab = model.config.vocab_size
    n = WARMUP + STEPS
    ids = torch.randint(0, vocab, (n, spec["batch"], spec["seq"]), generator=g)
    labels = ids if spec["task"] == "CAUSAL_LM" else torch.randint(0, 2, (n, spec["batch"]), generator=g)
    model = build_method(model, model_name, method).train()
    after_build = memory.growth()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        model(input_ids=ids[i], labels=labels[i]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = memory.stop()
    return {"status": "measured", "step_s": statistics.median(times), "step_s_all": times,
            "peak_mem_mb": peak / MIB, "mem_after_build_mb": after_build / MIB,
            "trainable": sum(p.numel() for p in params), "projection_state_bytes": projection_state_bytes(model),
            "torch_threads": torch.get_num_threads()}


def time_interleaved(model_name: str, method_ids: list[str], rounds: int) -> dict:
    """Step times of several methods in ONE process, one step of each in turn, ``rounds`` times (after a warm-up
    step each): a machine whose speed drifts (other work, frequency) slows every method alike, so the ratios hold.
    Returns ``{method: [step seconds, ...]}``."""
    spec = MODELS[model_name]
    g = torch.Generator().manual_seed(0)
    runs = {}
    for method_id in method_ids:
        method = next(m for m in METHODS if m["id"] == method_id)
        model = build_method(build_model(model_name), model_name, method).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[method_id] = (model, opt)
    vocab = next(iter(runs.values()))[0].config.vocab_size
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
    labels = ids if spec["task"] == "CAUSAL_LM" else torch.randint(0, 2, (spec["batch"],), generator=g)
    times = {m: [] for m in method_ids}
    for r in range(rounds + 1):
        for method_id, (model, opt) in runs.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[method_id].append(time.perf_counter() - t0)
    return times


# -- on paper: a 7B model, bf16 weights ---------------------------------------------------------------------------
LLAMA_7B = {"params": 6_738_415_616, "hidden": 4096, "layers": 32, "vocab": 32_000}


def paper_7b(d: int = 10_000) -> list[dict]:
    """Bytes per GPU (one GPU holding the whole model, activations left out: the same for all at the same batch)."""
    P = LLAMA_7B["params"]
    h, L = LLAMA_7B["hidden"], LLAMA_7B["layers"]
    lora = L * 2 * 8 * (h + h)  # r=8 on q and v: A (8 x h) and B (h x 8) per projection
    from hf_subspace.blocked import MIN_ELEMENTS

    # the head (32000 x 4096) is large enough for the row-block path (hf_subspace.blocked: heads only); every other
    # linear is adapted one tensor at a time: the largest transient is an MLP weight (11008 x 4096), its δ in fp32,
    # its adapted weight and weight gradient in bf16, and that gradient in fp32 for Pᵀ (4 + 2 + 2 + 4 B each)
    assert LLAMA_7B["vocab"] * h >= MIN_ELEMENTS
    largest = 11_008 * h * 12
    rows = [
        {"method": "full fine-tuning (bf16 weights + grads, fp32 master + AdamW)", "bytes": P * (2 + 2 + 4 + 8),
         "how": "16 B per weight"},
        {"method": "LoRA r=8 (q,v)", "bytes": P * 2 + lora * 16, "how": f"2 B per weight + {lora:,} adapter weights "
                                                                         "x 16 B"},
        {"method": f"global subspace d={d:,} (hf_subspace 0.2)", "bytes": P * 2 + d * 16 + 3 * d * 4 + largest,
         "how": "2 B per weight + c (16 B x d) + projection state (12 B x d) + one MLP weight's δ, adapted weight and "
                "gradients (12 B x 45M), transiently; the head runs in row blocks"},
        {"method": f"global subspace d={d:,} as in 0.1.0", "bytes": P * (2 + 4 + 2) + d * 16,
         "how": "+ an int32 index per weight (4 B) + every adapted weight kept for the backward (2 B)"},
    ]
    return rows + paper_4bit(d)


#: Llama-2-70B: 80 layers, hidden 8192, MLP 28672, grouped-query attention (k, v 1024 wide), vocab 32k
LLAMA_70B = {"params": 68_976_648_192, "hidden": 8192, "layers": 80, "vocab": 32_000, "kv": 1024, "mlp": 28_672}
#: bitsandbytes NF4 as from_pretrained stores it by default: 4 bits + one float32 absmax per 64 weights
NF4_BYTES = 0.5 + 4 / 64


def paper_4bit(d: int = 10_000) -> list[dict]:
    """QLoRA against the subspace on a 4-bit (NF4) base: linear layers NF4, embeddings and head bf16."""
    rows = []
    shapes = [("7B", {**LLAMA_7B, "kv": LLAMA_7B["hidden"], "mlp": 11_008}), ("70B", LLAMA_70B)]
    for name, m in shapes:
        h, L, V = m["hidden"], m["layers"], m["vocab"]
        dense = 2 * V * h  # embeddings and the untied head stay bf16
        linear = m["params"] - dense - (2 * L + 1) * h  # norms aside
        base = linear * NF4_BYTES + dense * 2 + (2 * L + 1) * h * 4  # norms float32 (prepare_model_for_kbit_training)
        lora = L * 8 * ((h + h) + (h + m["kv"]))  # r=8 on q (h -> h) and v (h -> kv)
        largest = m["mlp"] * h
        rows += [
            {"method": f"{name}, 4-bit NF4 base: QLoRA r=8 (q,v)", "bytes": base + lora * 16,
             "how": f"NF4 linears ({NF4_BYTES} B per weight) + bf16 embeddings and head + {lora:,} adapter weights "
                    "x 16 B"},
            {"method": f"{name}, 4-bit NF4 base: global subspace d={d:,}", "bytes": base + d * 28 + largest * 8,
             "how": f"the same base + c and projection state (28 B x d) + transiently, for the largest linear "
                    f"({m['mlp']:,} x {h:,}), 8 B per weight: its fp32 δ and dequantized and adapted bf16 weights "
                    "in the forward; the bf16 recompute, then the fp32 weight gradient in the backward — one layer "
                    "at a time, nothing kept from forward to backward"},
        ]
    return rows


# -- report ---------------------------------------------------------------------------------------------------------
def fmt_bytes(x):
    if x is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def markdown_report(results: dict) -> str:
    m = results["machine"]
    out = ["# hf_subspace memory benchmark", "",
           f"{m['time']} · {m['cpu_model']} · {m['cpu_affinity']} CPUs · torch {m['torch']} with "
           f"{results['threads'] or m['torch_threads']} thread(s) · transformers {m['transformers']} · peft "
           f"{m['peft']} · hf_subspace at commit {m['hf_subspace_source'].get('commit')}", "",
           f"Peak memory: each method in its own process, {WARMUP} warm-up + {STEPS} AdamW steps, {results['rounds']} "
           "round(s) round-robin (median of the rounds' peaks); peak RSS growth over the process after imports "
           "(model, adapter, activations, gradients, optimizer state). Step time: all methods of a model in one "
           f"process, one step of each in turn, {results.get('time_rounds', '?')} rounds after a warm-up (median), "
           "so drift of a shared machine hits all alike.", ""]
    if len(results.get("sources_versions", [])) > 1:
        out += ["**Warning: the hf_subspace sources changed during this run** "
                f"({len(results['sources_versions'])} versions measured).", ""]
    for model_name, rows in results["models"].items():
        out += [f"## {MODELS[model_name]['title']}", ""]
        table = []
        labels = MODELS[model_name].get("labels", {})
        for method in METHODS:
            row = rows.get(method["id"])
            if row is None:
                continue
            label = labels.get(method["id"], method["label"])
            if row.get("status") != "measured":
                table.append([label, "—", "—", "—", "—", "—", "—", "—", row.get("reason", "failed")])
                continue
            table.append([label, fmt_int(row["trainable"]), fmt_mb(row["peak_mem_mb"]),
                          fmt_ratio(row.get("mem_vs_lora")), fmt_ratio(row.get("mem_vs_full")), fmt_s(row["step_s"]),
                          fmt_ratio(row.get("time_vs_full")), fmt_ratio(row.get("time_vs_lora")),
                          fmt_bytes(row.get("projection_state_bytes"))])
        out += markdown_table(["method", "trainable", "peak mem", "mem ×LoRA", "mem ×full", "step (s)", "time ×full",
                               "time ×LoRA", "P state"], table)
        out.append("")
    out += ["## On paper: a 7B model (Llama-2-7B shapes, bf16 weights; and 7B / 70B on a 4-bit base), one GPU, "
            "activations left out", ""]
    out += markdown_table(["method", "bytes per GPU", "what"],
                          [[r["method"], fmt_bytes(r["bytes"]), r["how"]] for r in results["paper_7b"]], "lrl")
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["gpt2", "minilm"], choices=list(MODELS),
                   help="llama4bit: QLoRA against the global subspace on the same 4-bit base")
    p.add_argument("--only", nargs="*", help="method ids to run (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: fair on a shared "
                                                          "machine, as the issue measured)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite memory.md from memory.json (no runs)")
    p.add_argument("--time-rounds", type=int, default=5, help="step times: rounds of the interleaved timing run "
                                                                  "(all methods of a model in one process)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_worker:
        model_name, methods = args.timing_worker.split(":")
        result = {"status": "measured", "times": time_interleaved(model_name, methods.split(","), args.time_rounds)}
        result["sources_sha256"] = sources_sha256()
        Path(args.result_file).write_text(json.dumps(result))
        return
    if args.worker:
        result = measure(*args.worker)
        result["sources_sha256"] = sources_sha256()  # the tree may change during a run: each result says its code
        Path(args.result_file).write_text(json.dumps(result))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "memory.json").read_text())
        results["paper_7b"] = paper_7b()
        (out / "memory.json").write_text(json.dumps(results, indent=1))
        (out / "memory.md").write_text(markdown_report(results))
        print((out / "memory.md").read_text())
        return
    results = {"machine": machine_info(), "rounds": args.rounds, "threads": args.threads, "models": {},
               "time_rounds": args.time_rounds,
               "paper_7b": paper_7b()}
    methods = [m["id"] for m in METHODS if not args.only or m["id"] in args.only]

    def methods_of(model_name):
        listed = MODELS[model_name].get("methods")  # a model may list its methods; a method may list its models
        models = {x["id"]: x.get("models") for x in METHODS}
        return [m for m in methods if (m in listed if listed else model_name in (models[m] or [model_name]))]

    jobs = {(mn, mid): ["--worker", mn, mid] for mn in args.models for mid in methods_of(mn)}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs) * args.rounds + len(args.models), desc="memory benchmark")

    def progress(name, r, result):
        bar.update(1)
        bar.set_postfix_str(f"{name[0]} {name[1]} round {r + 1}: {result.get('peak_mem_mb', 0):.0f} MiB, "
                            f"{result.get('step_s', 0):.2f} s")

    runs = round_robin({k: v for k, v in jobs.items()}, __file__, args.rounds, args.timeout, args.threads, progress)
    for (model_name, method_id), rounds in runs.items():
        measured = [r for r in rounds if r.get("status") == "measured"]
        row = pool_rounds(rounds, medians=("peak_mem_mb", "mem_after_build_mb")) if measured else rounds[-1]
        results["models"].setdefault(model_name, {})[method_id] = row
    # step times: all methods of a model interleaved in one process (see time_interleaved)
    for model_name in args.models:
        timing = run_worker(__file__, ["--timing-worker", f"{model_name}:{','.join(methods_of(model_name))}",
                                       "--time-rounds", str(args.time_rounds)], args.timeout, args.threads)
        bar.update(1)
        bar.set_postfix_str(f"{model_name} interleaved timing: {timing.get('status')}")
        for method_id, times in timing.get("times", {}).items():
            row = results["models"][model_name][method_id]
            row["step_s_process"] = row.get("step_s")  # its own process's steps (kept, less robust to drift)
            row["step_s_all"], row["step_s"] = times, statistics.median(times)
        results.setdefault("timing_sources", {})[model_name] = timing.get("sources_sha256")
    for rows in results["models"].values():
        add_ratios(rows)
    bar.close()
    results["machine"]["hf_subspace_source_end"] = source_state()
    versions = {r.get("sources_sha256") for rounds in runs.values() for r in rounds if r.get("status") == "measured"}
    results["sources_versions"] = sorted(v for v in versions if v)
    (out / "memory.json").write_text(json.dumps(results, indent=1))
    (out / "memory.md").write_text(markdown_report(results))
    print((out / "memory.md").read_text())


if __name__ == "__main__":
    main()
