"""One command for a machine with a CUDA device: the engine at ~1B scale in bf16 (issue 21).

    python benchmarks/gpu_check.py                 # CUDA: a ~1.1B Llama (TinyLlama-1.1B shapes) from its config
    python benchmarks/gpu_check.py --cpu           # smoke test of this script on the CPU at a tiny size

For full fine-tuning, PEFT LoRA r=8 (q,v) and global hashing d = 10k over every weight (embeddings and head
included), each in a fresh model: ``--warmup`` then ``--steps`` training steps (forward + backward + fused AdamW
step) under ``torch.autocast(bfloat16)`` with float32 weights (what ``Trainer(bf16=True)`` does), reporting the
median step time, its ratio to full fine-tuning and to LoRA, and the peak device memory. Then one more step of
each under ``torch.cuda.set_sync_debug_mode("error")``: any device→host synchronization in the step raises, and
is reported as the first failing op. On the CPU (``--cpu``) there is no sync debug mode; the same step is counted
with :class:`hf_subspace.opcount.OpCounter` instead (host-scalar reads and data-dependent ops must be 0).

Prints a JSON object (one line) and a small table; ``--out FILE`` also writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback

import _models  # noqa: F401  (checkout on sys.path, offline defaults)
from _harness import add_ratios, timed

import torch

from hf_subspace.opcount import OpCounter


def build(args, method: str, device):
    if args.cpu:
        cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    else:  # TinyLlama-1.1B's shapes: 1.1B weights
        cfg = dict(vocab_size=32_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    model = _models.llama(device=device, **cfg)
    if method == "lora":
        model = _models.lora(model, ["q_proj", "v_proj"], "CAUSAL_LM")
    elif method == "hashing":
        model = _models.subspace(model, args.dim if not args.cpu else 200, "CAUSAL_LM")
    model.train()
    opt = _models.adamw(model, lr=1e-5, fused=device.type == "cuda")
    return model, opt, cfg["vocab_size"]


def step(model, opt, ids, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def check_method(args, method: str, device) -> dict:
    model, opt, vocab = build(args, method, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(model, opt, ids, device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(lambda m=model, o=opt: (step(m, o, ids, device), sync()), args.steps)  # synced: device time
    out = {"step_s": statistics.median(times), "step_s_all": times, "trainable": _models.trainable(model),
           "weights": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(model, opt, ids, device)
            sync_ok, error = True, None
        except RuntimeError as e:  # "called a synchronizing CUDA operation"
            sync_ok, error = False, "".join(traceback.format_exception_only(e)).strip()[-2000:]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out.update({"sync_free_step": sync_ok, "sync_error": error})
    else:
        with OpCounter() as n:
            step(model, opt, ids, device)
        # AdamW on the CPU reads its step count (a CPU scalar, no device involved): counted for the model alone
        with OpCounter() as m:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        out.update({"step_counts": n.summary(), "forward_backward_counts": m.summary(),
                    "sync_free_step": m.host_reads == 0 and m.data_dependent == 0})
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU at a tiny size")
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["full", "lora", "hashing"])
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        args.batch, args.seq = args.batch or 2, args.seq or 32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu for the smoke test", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        args.batch, args.seq = args.batch or 4, args.seq or 1024
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "batch": args.batch, "seq": args.seq, "methods": {}}
    for method in args.methods:
        results["methods"][method] = check_method(args, method, device)
    r = results["methods"]
    add_ratios(r, refs=("full", "lora"), keys=(("step_s", "x"),), name="{what}_{ref}")  # x_full, x_lora
    print(json.dumps(results, default=str))
    print(f"\n{'method':<10} {'step s':>9} {'x full':>7} {'x LoRA':>7} {'peak GB':>8}  sync-free step")
    for name, row in r.items():
        print(f"{name:<10} {row['step_s']:9.4f} {row.get('x_full', float('nan')):7.2f} "
              f"{row.get('x_lora', float('nan')):7.2f} {row.get('peak_mem_gb', float('nan')):8.2f}  "
              f"{row['sync_free_step']}" + (f"  ({row['sync_error'][:200]})" if row.get("sync_error") else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0 if all(row["sync_free_step"] for name, row in r.items() if name == "hashing") else 1


if __name__ == "__main__":
    sys.exit(main())
