"""The models, adapters and batches several benchmark scripts build alike (each script keeps its own sizes).

* :func:`minilm_classifier`: the pretrained MiniLM-L6 with a new 2-class head (speed, memory, inference).
* :func:`llama` / :func:`gpt2`: causal LMs from configs, seeded (memory, engine, comm, gpu_check, inference).
* :func:`lora` / :func:`subspace`: PEFT LoRA (r=8, alpha 16 unless told) and an hf_subspace adapter through
  ``get_peft_model``; :func:`perturb_coefficients` moves c off zero so an adapter changes the model.
* :func:`trainable` / :func:`adamw`: what is trained and its optimizer.
* :func:`random_tokens`: a batch of random token ids with LM or class labels.
"""
from __future__ import annotations

import _setup  # noqa: F401  (checkout on sys.path, offline defaults)

import torch


def minilm_classifier(num_labels: int = 2):
    """MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, shipped on PyPI) for sequence classification."""
    from transformers import AutoModelForSequenceClassification

    from hf_subspace.demo.data import minilm_path

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


def llama(seed: int | None = 0, device=None, **config):
    """``LlamaForCausalLM(LlamaConfig(**config))``, after ``torch.manual_seed(seed)`` (None: not seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(**config)
    if device is None:
        return LlamaForCausalLM(cfg)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def gpt2(seed: int | None = 0, **config):
    """``GPT2LMHeadModel(GPT2Config(**config))`` (no arguments: GPT-2 124M), after ``torch.manual_seed(seed)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**config))


def lora(model, target_modules, task_type: str | None = None, r: int = 8, alpha: int | None = 16, **kw):
    """PEFT LoRA (dropout 0) on ``target_modules``; ``alpha=None`` leaves peft's default."""
    from peft import LoraConfig, get_peft_model

    if alpha is not None:
        kw["lora_alpha"] = alpha
    if task_type is not None:
        kw["task_type"] = task_type
    return get_peft_model(model, LoraConfig(r=r, target_modules=target_modules, **kw))


def subspace(model, dim: int, task_type: str | None = None, **config):
    """An hf_subspace adapter of dimension ``dim`` (``SubspaceConfig(**config)``) through ``get_peft_model``."""
    from peft import get_peft_model

    import hf_subspace

    return get_peft_model(model, hf_subspace.SubspaceConfig(dim=dim, task_type=task_type, **config))


def perturb_coefficients(model, std: float, generator: torch.Generator | None = None):
    """Draw the adapter's coefficients c from N(0, std²) (the adapter then changes the model); returns its engine."""
    from hf_subspace.engine import find_engine

    engine = find_engine(model)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, std, generator=generator)
    return engine


def trainable(model) -> int:
    """Number of trainable weights."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adamw(model, lr: float, **kw) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def random_tokens(vocab: int, shape: tuple, generator: torch.Generator, causal: bool = True,
                  num_labels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``: ids uniform in ``[0, vocab)`` of ``shape`` (..., sequence); labels the ids for a
    causal LM, else classes in ``[0, num_labels)`` of ``shape[:-1]`` (drawn after the ids, from ``generator``)."""
    ids = torch.randint(0, vocab, shape, generator=generator)
    labels = ids if causal else torch.randint(0, num_labels, shape[:-1], generator=generator)
    return ids, labels
