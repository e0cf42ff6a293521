"""What a training step asks of the device, counted, and what it costs in time, side by side (issue 21).

    python benchmarks/bench_engine.py [--rounds 3] [--threads 1] [--no-7b] [--no-time] [--out benchmarks/results]

writes ``<out>/engine.json`` and ``<out>/engine.md``:

(a) **Counts per training step** (forward + backward; the optimizer's own ops are left out, they are the same
    for every method with the same trainable tensors) with a ``TorchDispatchMode`` (:mod:`hf_subspace.opcount`):
    aten ops, host-scalar reads (``_local_scalar_dense``/``equal``: each one a device→host sync on a GPU) and
    data-dependent-shape ops (``nonzero``, ``unique``, ...), for the plain model trained in full, PEFT LoRA r=8
    (q,v), and each subspace kind (global; hashing also SAID and q,v), on tiny Llama (tied embeddings) / GPT-2 /
    BERT / ViT built from configs.
(b) **Llama-2-7B shapes**: the same counts on a Llama with Llama-2-7B's widths (4096 hidden, 11008 MLP, 32000
    vocabulary, untied head) and 1 and 2 decoder layers, batch 1 x 16, extrapolated to 32 layers as
    ``count(1) + 31 · (count(2) - count(1))``. Counts depend on shapes (row blocks of the big linears, chunks of
    Pᵀg), so they are measured at the real widths, not scaled from a toy. ~2.6 GB of RAM, a minute or two.
(c) **Step time**, one process, methods interleaved step by step (``bench_memory.time_interleaved``), medians over
    ``--rounds``: full fine-tuning, LoRA r=8 (q,v), hashing d=10k on q,v and global hashing d=10k on GPT-2 124M
    (batch 4 x 128) and MiniLM-L6 (batch 16 x 64), with ratios to full fine-tuning and to LoRA.
"""
from __future__ import annotations

import time
from pathlib import Path

import _models  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)
from _harness import (benchmark_parser, fmt_int, fmt_ratio, machine_info, markdown_table, medians,  # noqa: E402
                      read_results, write_report)

import torch  # noqa: E402

from hf_subspace.opcount import OpCounter  # noqa: E402


# -- tiny models -------------------------------------------------------------------------------------------------
def tiny(name: str, layers: int = 2, big: bool = False):
    """``(model, inputs, q/v module names, peft task)``; ``big``: Llama-2-7B widths (Llama only)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        if big:
            cfg = dict(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=64,
                       tie_word_embeddings=False)
            ids = torch.randint(0, 32_000, (1, 16), generator=g)
        else:
            cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)
            ids = torch.randint(0, 128, (2, 12), generator=g)
        return _models.llama(**cfg), {"input_ids": ids, "labels": ids}, ["q_proj", "v_proj"], "CAUSAL_LM"
    if name == "gpt2":
        ids = torch.randint(0, 97, (2, 12), generator=g)
        model = _models.gpt2(vocab_size=97, n_embd=32, n_layer=layers, n_head=2, n_positions=32)
        return model, {"input_ids": ids, "labels": ids}, ["c_attn"], "CAUSAL_LM"
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, num_labels=2)
        ids = torch.randint(0, 99, (2, 12), generator=g)
        return (BertForSequenceClassification(cfg), {"input_ids": ids, "labels": torch.tensor([0, 1])},
                ["query", "value"], "SEQ_CLS")
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=layers,
                    num_attention_heads=2, intermediate_size=37, num_labels=3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    return ViTForImageClassification(cfg), {"pixel_values": x, "labels": torch.tensor([0, 2])}, ["q_proj", "v_proj"], \
        None


METHODS = [
    ("full", "full fine-tuning (the plain model's training step)"),
    ("lora", "PEFT LoRA r=8 (q,v)"),
    ("hashing", "subspace hashing, global"),
    ("hashing_said", "subspace hashing, SAID"),
    ("hashing_qv", "subspace hashing, q,v"),
    ("fastfood", "subspace fastfood, global"),
    ("sparse", "subspace sparse, global"),
    ("dense", "subspace dense, global"),
]


def apply_method(model, method: str, qv, task, dim: int):
    import hf_subspace as hs

    if method == "full":
        return model.train()
    if method == "lora":
        return _models.lora(model, qv, task).train()
    kind, _, rest = method.partition("_")
    engine = hs.reparameterize(model, dim, kind, mode="said" if rest == "said" else "global",
                               target_modules=qv if rest == "qv" else None)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 1e-3)
    return model.train()


def count_step(model, inputs) -> dict:
    def step():
        model(**inputs).loss.backward()

    step()  # warm: caches the first step fills (block ranges, P c of non-row kinds) are not what a step costs
    model.zero_grad(set_to_none=True)
    with OpCounter() as n:
        step()
    return n.summary()


def counts_tiny(models) -> dict:
    out = {}
    for name in models:
        for method, _ in METHODS:
            model, inputs, qv, task = tiny(name)
            dim = 300 if method.endswith("said") else 100
            out[f"{name}/{method}"] = count_step(apply_method(model, method, qv, task, dim), inputs)
            print(name, method, out[f"{name}/{method}"], flush=True)
    return out


def counts_7b() -> dict:
    """Counts at Llama-2-7B widths with 1 and 2 layers, extrapolated to 32."""
    out = {}
    for method in ("full", "lora", "hashing", "fastfood"):
        per = {}
        for layers in (1, 2):
            model, inputs, qv, task = tiny("llama", layers, big=True)
            if method == "full":  # the plain model's training step: every weight gets its gradient
                model.train()
            per[layers] = count_step(apply_method(model, method, qv, task, 10_000), inputs)
            del model
        out[method] = {k: per[1][k] + 31 * (per[2][k] - per[1][k]) for k in per[1]}
        out[method]["per_layer"] = {k: per[2][k] - per[1][k] for k in per[1]}
        print("7b", method, out[method], flush=True)
    return out


def step_times(rounds: int) -> dict:
    from bench_memory import time_interleaved  # the same models, methods and steps as bench_memory's timing

    out = {}
    for model_name in ("gpt2", "minilm"):
        times = time_interleaved(model_name, ["full", "lora", "qv10k", "global10k"], rounds)
        med = medians(times)
        out[model_name] = {"median_s": med, "all_s": times,
                           "global10k/full": med["global10k"] / med["full"],
                           "qv10k/lora": med["qv10k"] / med["lora"],
                           "global10k/lora": med["global10k"] / med["lora"]}
        print(model_name, {k: v for k, v in out[model_name].items() if k != "all_s"}, flush=True)
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# hf_subspace engine benchmark: counts per training step, step-time ratios", "",
             f"{m['time']} · {m['cpu_model']} · torch {m['torch']} with {m['torch_threads']} thread(s) · "
             f"transformers {m['transformers']} · hf_subspace at commit {m['hf_subspace_source'].get('commit')}"
             + (f" · sections measured at commits {results['sections_from']}" if results.get("sections_from") else ""),
             "",
             "## Counts per training step (forward + backward), tiny models from configs", "",
             "aten ops / host-scalar reads (device→host syncs on a GPU) / data-dependent-shape ops; ratio: aten ops "
             "over full fine-tuning's (the plain model's forward + backward).", ""]
    tiny_counts = results["counts_tiny"] or {}
    models = sorted({k.split("/")[0] for k in tiny_counts}, key=["llama", "gpt2", "bert", "vit"].index)
    rows = []
    for method, label in METHODS:
        row = [label]
        for name in models:
            c = tiny_counts.get(f"{name}/{method}")
            base = tiny_counts.get(f"{name}/full")
            row.append("—" if c is None else f"{fmt_int(c['ops'])} ({c['ops'] / base['ops']:.2f}x) / "
                                               f"{c['host_reads']} / {c['data_dependent']}")
        rows.append(row)
    lines += markdown_table(["method"] + [f"{n}: ops (x full) / syncs / data-dep." for n in models], rows)
    if results.get("counts_7b"):
        lines += ["", "## Llama-2-7B shapes (measured at 1 and 2 layers, extrapolated to 32), batch 1 x 16", ""]
        rows = []
        base = results["counts_7b"]["full"]["ops"]
        for method, c in results["counts_7b"].items():
            rows.append([method, fmt_int(c["ops"]), fmt_ratio(c["ops"] / base), fmt_int(c["per_layer"]["ops"]),
                         fmt_int(c["host_reads"]), fmt_int(c["data_dependent"])])
        lines += markdown_table(["method", "aten ops", "x full", "per layer", "host reads", "data-dep. ops"], rows)
    if results.get("times"):
        lines += ["", f"## Step time, methods interleaved in one process, median of {results['rounds']} rounds "
                      "(AdamW step included)", ""]
        rows = []
        for model_name, t in results["times"].items():
            med = t["median_s"]
            rows.append([model_name, *(f"{med[k]:.3f}" for k in ("full", "lora", "qv10k", "global10k")),
                         fmt_ratio(t["global10k/full"]), fmt_ratio(t["qv10k/lora"]), fmt_ratio(t["global10k/lora"])])
        lines += markdown_table(["model", "full s", "LoRA s", "q,v 10k s", "global 10k s", "global / full",
                                 "q,v / LoRA", "global / LoRA"], rows)
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = benchmark_parser(__doc__.split("\n\n")[0], out=True, rounds=3, threads=1)
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2", "bert", "vit"])
    ap.add_argument("--no-7b", action="store_true", help="skip the Llama-2-7B-shape counts (~2.6 GB of RAM)")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time ratios")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny-model counts")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = {"machine": {**machine_info(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
               "rounds": args.rounds}
    out = Path(args.out)
    # a section skipped keeps what the last run wrote there (its own machine and commit are noted beside it)
    earlier = read_results(out / "engine.json")
    results["counts_tiny"] = earlier.get("counts_tiny", {}) if args.no_tiny else counts_tiny(args.models)
    results["counts_7b"] = earlier.get("counts_7b") if args.no_7b else counts_7b()
    results["times"] = earlier.get("times") if args.no_time else step_times(args.rounds)
    if args.no_time:
        results["rounds"] = earlier.get("rounds", args.rounds)
    results["sections_from"] = {k: (earlier.get("sections_from", {}).get(k) or earlier.get("machine", {}).get(
        "hf_subspace_source", {}).get("commit")) if skipped else results["machine"]["hf_subspace_source"].get("commit")
        for k, skipped in (("counts_tiny", args.no_tiny), ("counts_7b", args.no_7b), ("times", args.no_time))}
    results["wall_s"] = time.time() - t0
    write_report(out, "engine", results, markdown(results))


if __name__ == "__main__":
    main()
