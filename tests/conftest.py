"""Tiny models built from configs (no downloads) and helpers shared by the tests."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import hf_subspace  # noqa: F401  (registers the method with peft)

# the checkout's root, last on the path (the hf_subspace imported above stays the one tested): the tests import
# benchmark instrumentation from there, e.g. ``from benchmarks._comm import CommCounter``
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.append(REPO)



def load_example(task: str, module_name: str):
    """``examples/<task>/train.py`` imported as a module named ``module_name`` (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, os.path.join(REPO, "examples", task, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert_cls(seed=0, hidden=32, layers=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37, num_labels=3)
    return ViTForImageClassification(cfg).eval()


def tiny_resnet(seed=0):
    """A CNN with BatchNorm (transformers' ResNet)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3)
    return ResNetForImageClassification(cfg).eval()


def bert_batch(n=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 99, (n, length), generator=g),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def gpt2_batch(n=4, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def vit_batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def resnet_batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 1, 16, 16, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


MODELS = {
    "bert": (tiny_bert_cls, bert_batch),
    "gpt2": (tiny_gpt2, gpt2_batch),
    "vit": (tiny_vit, vit_batch),
    "resnet": (tiny_resnet, resnet_batch),
}


def logits(model, batch):
    """The model's logits on ``batch`` (labels dropped), without autograd."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, batch, steps=3, lr=5e-2):
    """A few Adam steps on whatever requires grad, then eval mode; returns the model."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture
def tmp_out(tmp_path):
    return str(tmp_path)
