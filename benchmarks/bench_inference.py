"""Inference cost of a subspace adapter against the plain model, side by side in one process.

(a) MiniLM-L6 sequence classifier, ``eval()`` + ``no_grad`` forward of a 16 x 64 batch: the plain model, the
    model with a global hashing adapter (d = 10k, all 22.7M weights) reading its cached adapted weights (the
    default), and the same adapter with the cache switched off (θ0 + P c recomputed every forward — what every
    forward cost before the cache).
(b) ``generate`` of 32 new tokens (greedy, batch 1) on a small GPT-2 from its config (4 layers, 256 wide): plain
    vs adapter, cached and uncached.

Each arm runs ``--rounds`` round-robin rounds of ``--repeats`` timed calls after warm-up, so a drift of the machine
hits every arm alike; reported are medians and ratios to the plain model. Results go to
``benchmarks/results/inference.json`` and ``.md``.

    python benchmarks/bench_inference.py                # ~2 min on 2 cores
"""
from __future__ import annotations

import _setup  # noqa: F401  (offline defaults, checkout on sys.path)

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _round_robin(arms: dict, rounds: int, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name] += _timed(fn, repeats)
    return times


def minilm_arms(dim: int):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import hf_subspace as hs
    from hf_subspace.demo.data import minilm_path
    from hf_subspace.engine import find_engine

    plain = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    wrapped = get_peft_model(AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2),
                             hs.SubspaceConfig(dim=dim, projection="hashing", task_type="SEQ_CLS")).eval()
    engine = find_engine(wrapped)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (16, 64), generator=g)
    mask = torch.ones_like(ids)

    def run(model, cache=True):
        def call():
            engine.inference_cache = cache
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        return call

    return {"plain": run(plain), "adapter, cached": run(wrapped, True), "adapter, uncached": run(wrapped, False)}


def gpt2_arms(dim: int):
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_subspace as hs
    from hf_subspace.engine import find_engine

    def build():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=5000, n_embd=256, n_layer=4, n_head=4, n_positions=128)
        return GPT2LMHeadModel(cfg).eval()

    plain = build()
    wrapped = get_peft_model(build(), hs.SubspaceConfig(dim=dim, task_type="CAUSAL_LM")).eval()
    engine = find_engine(wrapped)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(0, 5000, (1, 8), generator=torch.Generator().manual_seed(2))

    def run(model, cache=True):
        def call():
            engine.inference_cache = cache
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                           do_sample=False, pad_token_id=0)
        return call

    return {"plain": run(plain), "adapter, cached": run(wrapped, True), "adapter, uncached": run(wrapped, False)}


def summarize(times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"median_s": med[k], "x_plain": med[k] / med["plain"], "n": len(times[k])} for k in times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "torch": torch.__version__}
    for name, arms in (("minilm_eval_forward", minilm_arms(args.dim)), ("gpt2_generate", gpt2_arms(args.dim))):
        report[name] = summarize(_round_robin(arms, args.rounds, args.repeats))
        print(name, json.dumps(report[name], indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Inference cost (d = {args.dim:,}, global hashing; {args.rounds} rounds x {args.repeats} calls, "
             f"{args.threads} threads, torch {torch.__version__})", "",
             "| task | arm | median (s) | x plain |", "|---|---|---:|---:|"]
    for task in ("minilm_eval_forward", "gpt2_generate"):
        for arm, r in report[task].items():
            lines.append(f"| {task} | {arm} | {r['median_s']:.4f} | {r['x_plain']:.2f} |")
    (out / "inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
