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
    python benchmarks/bench_inference.py --quick        # smoke run: tiny models, 1 round of 1 call (~10 s)
"""
from __future__ import annotations

import argparse
import json

import _models  # noqa: F401  (offline defaults, checkout on sys.path)
from _harness import benchmark_parser, interleaved, medians, write_report  # noqa: E402

import torch  # noqa: E402

WARMUP = 2  # untimed calls of each arm before the rounds


def minilm_arms(dim: int, quick: bool = False):
    def build():
        if not quick:
            return _models.minilm_classifier()
        from transformers import BertConfig, BertForSequenceClassification  # MiniLM's architecture, tiny

        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=37, num_labels=2))

    plain = build().eval()
    wrapped = _models.subspace(build(), dim, "SEQ_CLS", projection="hashing").eval()
    engine = _models.perturb_coefficients(wrapped, 0.01, torch.Generator().manual_seed(0))
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


def gpt2_arms(dim: int, quick: bool = False):
    def build():
        size = dict(n_embd=32, n_layer=2, n_head=2) if quick else dict(n_embd=256, n_layer=4, n_head=4)
        return _models.gpt2(vocab_size=5000, n_positions=128, **size).eval()

    plain = build()
    wrapped = _models.subspace(build(), dim, "CAUSAL_LM").eval()
    engine = _models.perturb_coefficients(wrapped, 0.01, torch.Generator().manual_seed(0))
    prompt = torch.randint(0, 5000, (1, 8), generator=torch.Generator().manual_seed(2))

    def run(model, cache=True):
        def call():
            engine.inference_cache = cache
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                           do_sample=False, pad_token_id=0)
        return call

    return {"plain": run(plain), "adapter, cached": run(wrapped, True), "adapter, uncached": run(wrapped, False)}


def summarize(times: dict[str, list[float]]) -> dict:
    med = medians(times)
    return {k: {"median_s": med[k], "x_plain": med[k] / med["plain"], "n": len(times[k])} for k in times}


def markdown_report(report: dict) -> str:
    a = report["settings"]
    lines = [f"# Inference cost (d = {a['dim']:,}, global hashing; {a['rounds']} rounds x {a['repeats']} calls, "
             f"{a['threads']} threads, torch {report['torch']})", "",
             "| task | arm | median (s) | x plain |", "|---|---|---:|---:|"]
    for task in ("minilm_eval_forward", "gpt2_generate"):
        for arm, r in report[task].items():
            lines.append(f"| {task} | {arm} | {r['median_s']:.4f} | {r['x_plain']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = benchmark_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, out=True, threads=2,
                         rounds=3)
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="smoke run: d = 100, 2-layer 32-wide models from configs "
                                                        "in place of MiniLM and GPT-2, 1 round of 1 call; writes "
                                                        "nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.rounds, args.repeats = 100, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("dim", "rounds", "repeats", "threads", "out")}
    report = {"settings": settings, "torch": torch.__version__}
    for name, arms in (("minilm_eval_forward", minilm_arms(args.dim, args.quick)),
                       ("gpt2_generate", gpt2_arms(args.dim, args.quick))):
        report[name] = summarize(interleaved(arms, args.rounds, args.repeats, warmup=WARMUP))
        print(name, json.dumps(report[name], indent=1))
    if args.quick:
        print(markdown_report(report))
        return report
    write_report(args.out, "inference", report, markdown_report(report))
    return report


if __name__ == "__main__":
    main()
