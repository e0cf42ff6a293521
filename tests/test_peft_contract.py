"""The PEFT contract: every verb a PEFT user already uses works on a subspace adapter as it does on LoRA.

First one test per observed break (deepcopy, get_base_model, disable_adapter, dtype, model_init, multi-adapter,
all-linear, unload, meta device, plain saving, inference cache), then PEFT's adapter checklist run over every
projection kind and both modes.
"""
import copy
import gc
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import hf_subspace as hs
from hf_subspace.engine import find_engine

from conftest import bert_batch, gpt2_batch, tiny_bert_cls, tiny_gpt2, logits as _logits, train_steps

KINDS = ["hashing", "fastfood", "sparse", "dense"]




def _train(model, batch, steps=2, lr=5e-2):
    return train_steps(model, batch, steps, lr)


def _bert(kind="hashing", mode="global", dim=300, **kw):
    cfg = hs.SubspaceConfig(dim=dim, projection=kind, mode=mode, task_type="SEQ_CLS", **kw)
    return get_peft_model(tiny_bert_cls(), cfg)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SmoothMLP(MLP):
    """No kinks: a finite difference of its gradient converges (a ReLU kink between c ± eps v would not)."""

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _trained_mlp_adapter(kind="hashing"):
    model = get_peft_model(MLP(), hs.SubspaceConfig(dim=20, projection=kind))
    with torch.no_grad():
        find_engine(model).coeffs["default"].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return model


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))


# ---------------------------------------------------------------------------------------------------------------
# 1. deepcopy
# ---------------------------------------------------------------------------------------------------------------
def test_deepcopy_computes_the_adapted_outputs_and_is_independent():
    model = _train(_bert("fastfood", "said"), bert_batch())
    adapted, base = _logits(model, bert_batch()), _logits(tiny_bert_cls(), bert_batch())
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, bert_batch()), adapted)
    assert not torch.allclose(_logits(twin, bert_batch()), base)
    assert find_engine(twin) is not find_engine(model)
    _train(twin, bert_batch(seed=5))  # training the copy leaves the original alone
    torch.testing.assert_close(_logits(model, bert_batch()), adapted)
    assert not torch.allclose(_logits(twin, bert_batch()), adapted)


def test_merge_and_unload_of_a_copy_leaves_the_original_working():
    model = _train(_bert(), bert_batch())
    adapted = _logits(model, bert_batch())
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(_logits(merged, bert_batch()), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, bert_batch()), adapted)  # used to raise: no attribute 'weight'
    torch.testing.assert_close(_logits(model.merge_and_unload(), bert_batch()), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fastfood", "sparse", "dense"])
def test_deepcopy_after_a_training_forward_with_a_cached_projection(kind):
    model = _bert(kind)
    model.train()
    loss = model(**bert_batch()).loss  # the flat P c (a non-leaf tensor) is cached now
    twin = copy.deepcopy(model)
    loss.backward()
    torch.testing.assert_close(_logits(twin.eval(), bert_batch()), _logits(model.eval(), bert_batch()))


# ---------------------------------------------------------------------------------------------------------------
# 2. the base model outlives its PeftModel
# ---------------------------------------------------------------------------------------------------------------
def test_base_model_keeps_the_adapter_after_the_peft_model_is_deleted():
    model = _train(_bert(), bert_batch())
    adapted = _logits(model, bert_batch())
    base = model.get_base_model()
    del model
    gc.collect()
    torch.testing.assert_close(_logits(base, bert_batch()), adapted)


# ---------------------------------------------------------------------------------------------------------------
# 3. disable_adapter / get_model_status without a modules_to_save wrapper
# ---------------------------------------------------------------------------------------------------------------
def test_disable_adapter_and_model_status_on_an_mlp():
    plain = MLP()(X)
    model = _trained_mlp_adapter()
    adapted = model(X)
    assert not torch.allclose(adapted, plain)
    with model.disable_adapter():
        torch.testing.assert_close(model(X), plain)
    torch.testing.assert_close(model(X), adapted)
    status = model.get_model_status()
    assert status.enabled is True and status.active_adapters == ["default"] and status.merged_adapters == []
    assert status.num_adapter_layers == 4  # fc1/fc2 weight and bias
    layers = model.get_layer_status()
    assert {s.module_type for s in layers} == {"SubspaceLayer"}


def test_disable_adapter_on_a_causal_lm():
    cfg = hs.SubspaceConfig(dim=100, task_type="CAUSAL_LM")
    model = _train(get_peft_model(tiny_gpt2(), cfg), gpt2_batch())
    base = _logits(tiny_gpt2(), gpt2_batch())
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, gpt2_batch()), base)
        assert model.get_model_status().enabled is False
    assert not torch.allclose(_logits(model, gpt2_batch()), base)


def test_layer_merge_and_unmerge_per_tensor():
    model = _trained_mlp_adapter()
    adapted = model(X).detach()
    layer = model.base_model.model.fc1.parametrizations.weight[0]
    layer.merge()
    assert layer.merged_adapters == ["default"] and model.get_model_status().merged_adapters == "irregular"
    torch.testing.assert_close(model(X), adapted)
    layer.merge()  # again: nothing more is added
    torch.testing.assert_close(model(X), adapted)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(model(X), adapted)


# ---------------------------------------------------------------------------------------------------------------
# 4. the fingerprint accepts the same weights in another dtype
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapter_loads_onto_the_same_weights_in_half_precision(tmp_out, dtype):
    model = _train(_bert(), bert_batch())
    model.save_pretrained(tmp_out)
    loaded = PeftModel.from_pretrained(tiny_bert_cls().to(dtype), tmp_out)
    ref = _logits(model, bert_batch())
    torch.testing.assert_close(_logits(loaded, bert_batch()).float(), ref, rtol=0.1, atol=0.05)
    with pytest.raises(ValueError, match="check_base_fingerprint=False"):  # another checkpoint: still refused
        PeftModel.from_pretrained(tiny_bert_cls(seed=7).to(dtype), tmp_out)


def test_fingerprint_tells_a_slightly_trained_checkpoint_apart_in_fp32():
    from hf_subspace.fingerprint import fingerprint_tensors, fingerprints_match

    ws = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fp = fingerprint_tensors(ws)
    assert fingerprints_match(fp, [w.clone() for w in ws])
    assert fingerprints_match(fp, [w.to(torch.bfloat16) for w in ws])
    assert fingerprints_match(fp, [w.half() for w in ws])
    nudged = [w * (1 + 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))) for w in ws]
    assert not fingerprints_match(fp, nudged)  # 0.1% relative change: another checkpoint at fp32
    assert not fingerprints_match(fp, [torch.randn(64, 64) for _ in ws])


# ---------------------------------------------------------------------------------------------------------------
# 5. dtype casts leave c and λ in float32
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_dtype_casts_keep_c_and_scales_float32(cast):
    model = _bert(mode="said")
    engine = find_engine(model)
    with torch.no_grad():
        engine.coeffs["default"].fill_(0.5 + 1e-3)
    model = model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    assert engine.coeffs["default"].dtype == torch.float32 and engine.scales["default"].dtype == torch.float32
    assert engine.coeffs["default"][0].item() == pytest.approx(0.501, abs=1e-7)
    w = model.base_model.model.bert.encoder.layer[0].attention.self.query.weight
    assert w.dtype == (torch.bfloat16 if cast == "to_bf16" else torch.float16)
    model.train()
    model(**bert_batch()).loss.float().backward()
    assert engine.coeffs["default"].grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 6. model_init is wrapped too
# ---------------------------------------------------------------------------------------------------------------
def test_model_init_is_wrapped(tmp_out):
    from datasets import Dataset

    rows = [{"input_ids": bert_batch(n=1, seed=s)["input_ids"][0].tolist(), "labels": s % 2} for s in range(8)]
    args = hs.SubspaceTrainingArguments(output_dir=tmp_out, subspace_dim=64, max_steps=2,
                                        per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = hs.SubspaceTrainer(model_init=lambda: tiny_bert_cls(), args=args, train_dataset=Dataset.from_list(rows))
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "base_model.subspace.vectors.default.coeffs" in trainable
    assert not any("encoder" in n for n in trainable)  # not the whole model


# ---------------------------------------------------------------------------------------------------------------
# 7. a second adapter with its own, wider θ
# ---------------------------------------------------------------------------------------------------------------
def test_second_adapter_with_wider_target_modules_gets_its_own_theta(tmp_out):
    model = _bert(target_modules=["query"], dim=50)
    model.add_adapter("wide", hs.SubspaceConfig(dim=80, target_modules=["query", "value"], task_type="SEQ_CLS"))
    engine = find_engine(model)
    narrow = {s.name for s in engine.adapters["default"].layout.slots}
    wide = {s.name for s in engine.adapters["wide"].layout.slots}
    assert narrow < wide and any(".value." in n for n in wide)
    model.set_adapter("wide")
    _train(model, bert_batch())
    out = _logits(model, bert_batch())
    model.save_pretrained(tmp_out, selected_adapters=["wide"])
    alone = PeftModel.from_pretrained(tiny_bert_cls(), os.path.join(tmp_out, "wide"), adapter_name="wide")
    torch.testing.assert_close(_logits(alone, bert_batch()), out)


# ---------------------------------------------------------------------------------------------------------------
# 8. all-linear
# ---------------------------------------------------------------------------------------------------------------
def test_all_linear_targets_every_linear_layer_but_the_output():
    model = get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=100, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
    engine = find_engine(model)
    owners = {s.holders[0][0] for s in engine.adapters["default"].layout.slots}
    assert owners and all(o.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc") for o in owners)  # GPT-2's Conv1D
    cfg = model.peft_config["default"]
    assert isinstance(cfg.target_modules, list) and "lm_head" not in cfg.target_modules
    bert = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=100, target_modules="all-linear",
                                                             task_type="SEQ_CLS"))
    names = [s.name for s in find_engine(bert).adapters["default"].layout.slots]
    assert any(n.endswith("query.weight") for n in names) and not any("classifier" in n for n in names)


# ---------------------------------------------------------------------------------------------------------------
# 9. merge_and_unload gives every parameter its requires_grad back
# ---------------------------------------------------------------------------------------------------------------
def test_merge_and_unload_restores_requires_grad_and_tolerates_integer_parameters():
    base = MLP()
    base.fc1.bias.requires_grad_(False)  # the user froze this
    base.register_parameter("steps", nn.Parameter(torch.tensor([3]), requires_grad=False))  # an integer parameter
    model = get_peft_model(base, hs.SubspaceConfig(dim=20))
    plain = model.merge_and_unload()
    grads = {n: p.requires_grad for n, p in plain.named_parameters()}
    assert grads == {"fc1.weight": True, "fc1.bias": False, "fc2.weight": True, "fc2.bias": True, "steps": False}


# ---------------------------------------------------------------------------------------------------------------
# 12. meta device and low_cpu_mem_usage
# ---------------------------------------------------------------------------------------------------------------
def test_wrap_on_the_meta_device_then_to_empty():
    from accelerate import init_empty_weights

    real = MLP()
    with init_empty_weights():
        empty = MLP()
    model = get_peft_model(empty, hs.SubspaceConfig(dim=20, projection="fastfood", mode="said"))
    engine = find_engine(model)
    assert engine.coeffs["default"].is_meta
    model.to_empty(device="cpu")
    assert torch.equal(engine.coeffs["default"], torch.zeros(engine.coeffs["default"].shape))
    assert torch.equal(engine.scales["default"], torch.ones(engine.scales["default"].shape))
    with torch.no_grad():  # load the real base weights into θ0
        for slot in engine.adapters["default"].layout.slots:
            engine.original(slot.name).copy_(real.get_parameter(slot.name))
    torch.testing.assert_close(model(X), real(X))


def test_load_with_low_cpu_mem_usage(tmp_out):
    model = _train(_bert(), bert_batch())
    model.save_pretrained(tmp_out)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_out, low_cpu_mem_usage=True)
    assert not find_engine(loaded).coeffs["default"].is_meta
    torch.testing.assert_close(_logits(loaded, bert_batch()), _logits(model, bert_batch()))


# ---------------------------------------------------------------------------------------------------------------
# 13. saving a wrapped transformers model writes a plain checkpoint
# ---------------------------------------------------------------------------------------------------------------
def _saved_keys(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_reparameterized_model_saves_plain_names_with_the_adapted_weights(tmp_out):
    from transformers import BertForSequenceClassification

    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 64, "hashing")
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_out)
    keys = _saved_keys(tmp_out)
    assert not any("parametrizations" in k or "subspace" in k for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights not initialized" warning
        reloaded = BertForSequenceClassification.from_pretrained(tmp_out).eval()
    torch.testing.assert_close(_logits(reloaded, bert_batch()), _logits(model, bert_batch()))


def test_the_users_own_variable_saves_the_trained_plain_model(tmp_out):
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2()
    model = _train(get_peft_model(base, hs.SubspaceConfig(dim=100, task_type="CAUSAL_LM")), gpt2_batch())
    base.save_pretrained(tmp_out)  # the variable the user passed in
    keys = _saved_keys(tmp_out)
    assert not any("parametrizations" in k for k in keys) and "transformer.wte.weight" in keys
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_out).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    torch.testing.assert_close(_logits(reloaded, gpt2_batch()), _logits(model, gpt2_batch()))
    unloaded = model.merge_and_unload()
    assert "save_pretrained" not in vars(unloaded)  # a plain model again


def test_plain_state_dict_takes_the_active_modules_to_save_copy():
    model = _train(_bert(), bert_batch())
    sd = hs.plain_state_dict(model.get_base_model())
    assert "classifier.weight" in sd and not any("modules_to_save" in k or "original_module" in k for k in sd)
    trained = model.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(sd["classifier.weight"], trained.detach())


# ---------------------------------------------------------------------------------------------------------------
# 15. the inference cache follows every change
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hashing", "fastfood"])
def test_inference_cache_follows_c_the_active_adapter_and_training(kind):
    model = _bert(kind, "said")
    engine = find_engine(model)
    base = _logits(model, bert_batch())
    assert engine.scratch.cache  # eval without autograd filled the cache
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model.train()
    model(**bert_batch()).loss.backward()
    assert not getattr(engine.scratch, "cache", None)  # a training forward drops it
    opt.step()  # fused: c changes without a version bump
    after = _logits(model.eval(), bert_batch())
    assert not torch.allclose(after, base)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, bert_batch()), _logits(tiny_bert_cls(), bert_batch()))
    torch.testing.assert_close(_logits(model, bert_batch()), after)
    with torch.no_grad():
        engine.coeffs["default"].mul_(0.5)
    uncached = copy.deepcopy(model)
    find_engine(uncached).inference_cache = False
    torch.testing.assert_close(_logits(model, bert_batch()), _logits(uncached, bert_batch()))


def test_generate_with_the_inference_cache_matches_without():
    model = _train(get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=100, task_type="CAUSAL_LM")), gpt2_batch())
    prompt = gpt2_batch()["input_ids"][:1, :4]
    fast = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    find_engine(model).inference_cache = False
    slow = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast, slow)


# ---------------------------------------------------------------------------------------------------------------
# PEFT's adapter checklist, over every projection kind and both modes
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[(k, m) for k in KINDS for m in ("global", "said")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def trained_once(request):
    kind, mode = request.param
    model = _train(_bert(kind, mode), bert_batch())
    return kind, mode, model, _logits(model, bert_batch())


@pytest.fixture
def trained(trained_once):
    """A fresh copy of the trained adapter for each check (training once per kind and mode)."""
    kind, mode, model, out = trained_once
    return kind, mode, copy.deepcopy(model), out


class TestAdapterChecklist:
    def test_save_load_equality_without_key_warnings(self, trained, tmp_out):
        kind, mode, model, out = trained
        model.save_pretrained(tmp_out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_out)
        assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message)]
        torch.testing.assert_close(_logits(loaded, bert_batch()), out)

    def test_merge_unmerge_idempotent(self, trained):
        kind, mode, model, out = trained
        w = model.base_model.model.bert.encoder.layer[0].attention.self.query.parametrizations.weight.original
        before = w.detach().clone()
        for _ in range(2):
            model.merge_adapter()
            torch.testing.assert_close(_logits(model, bert_batch()), out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(w.detach(), before, rtol=0, atol=1e-6)
        torch.testing.assert_close(_logits(model, bert_batch()), out, rtol=1e-5, atol=1e-5)

    def test_disable_adapter(self, trained):
        kind, mode, model, out = trained
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, bert_batch()), _logits(tiny_bert_cls(), bert_batch()))
        torch.testing.assert_close(_logits(model, bert_batch()), out)

    def test_multi_adapter(self, trained):
        kind, mode, model, out = trained
        model.add_adapter("other", hs.SubspaceConfig(dim=120, projection=kind, mode=mode, seed=3,
                                                     task_type="SEQ_CLS"))
        model.set_adapter("other")
        _train(model, bert_batch(seed=2))
        other = _logits(model, bert_batch())
        assert not torch.allclose(other, out)
        model.set_adapter("default")
        torch.testing.assert_close(_logits(model, bert_batch()), out)
        model.delete_adapter("other")
        torch.testing.assert_close(_logits(model, bert_batch()), out)

    def test_deepcopy(self, trained):
        kind, mode, model, out = trained
        torch.testing.assert_close(_logits(copy.deepcopy(model), bert_batch()), out)

    def test_dtype_cast(self, trained):
        kind, mode, model, out = trained
        model.to(torch.bfloat16)
        engine = find_engine(model)
        assert all(p.dtype == torch.float32 for p in engine.parameters())
        torch.testing.assert_close(_logits(model, bert_batch()).float(), out, rtol=0.1, atol=0.05)

    def test_merge_and_unload(self, trained):
        kind, mode, model, out = trained
        plain = model.merge_and_unload()
        assert type(plain).__name__ == "BertForSequenceClassification"
        assert not any("parametrizations" in k for k in plain.state_dict())
        torch.testing.assert_close(_logits(plain, bert_batch()), out, rtol=1e-5, atol=1e-5)


def test_inference_cache_outside_the_models_own_forward_still_follows_c():
    # calling a submodule directly skips the model's forward hooks: every read then checks c itself
    model = _bert()
    engine = find_engine(model)
    encoder = model.base_model.model.bert
    ids = bert_batch()["input_ids"]
    with torch.no_grad():
        first = encoder(input_ids=ids).last_hidden_state
        engine.coeffs["default"].fill_(0.05)
        second = encoder(input_ids=ids).last_hidden_state
        engine.inference_cache = False
        third = encoder(input_ids=ids).last_hidden_state
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, third)
    model.merge_and_unload()
    assert not model.base_model.model._forward_pre_hooks  # unloading removes the engine's hooks


# ---------------------------------------------------------------------------------------------------------------
# found in review
# ---------------------------------------------------------------------------------------------------------------
def test_inference_cache_sees_theta0_cast_or_replaced_from_outside_the_engine():
    model = _bert()
    with torch.no_grad():
        find_engine(model).coeffs["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    _logits(model, bert_batch())  # fills the cache
    model.get_base_model().bert.encoder.to(torch.bfloat16)  # a submodule cast: the engine is not inside it
    q = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        assert q.weight.dtype == torch.bfloat16
        original = q.parametrizations.weight.original
        original.data = torch.zeros_like(original.data)  # replaced through .data: no version bump
        w = q.weight
    assert torch.equal(w.float(), (w - original).float())  # θ0 = 0: the weight is the delta alone


def test_a_tied_weight_targeted_on_one_side_is_adapted_on_both():
    cfg = hs.SubspaceConfig(dim=50, target_modules=["lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_gpt2(), cfg)
    with torch.no_grad():
        find_engine(model).coeffs["default"].normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    inner = model.base_model.model
    torch.testing.assert_close(inner.transformer.wte.weight, inner.lm_head.weight)
    out = _logits(model, gpt2_batch())
    torch.testing.assert_close(_logits(copy.deepcopy(model).merge_and_unload(), gpt2_batch()), out,
                               rtol=1e-5, atol=1e-4)


def test_fingerprint_ignores_what_another_adapter_merged(tmp_out):
    first = _train(get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=60, task_type="CAUSAL_LM")), gpt2_batch())
    second = _train(get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=40, seed=4, task_type="CAUSAL_LM")),
                    gpt2_batch(seed=3))
    first.save_pretrained(os.path.join(tmp_out, "one"))
    second.save_pretrained(os.path.join(tmp_out, "two"))
    model = PeftModel.from_pretrained(tiny_gpt2(), os.path.join(tmp_out, "one"), adapter_name="one")
    model.merge_adapter()
    model.load_adapter(os.path.join(tmp_out, "two"), adapter_name="two")  # used to be refused: θ0 had one merged
    model.add_adapter("three", hs.SubspaceConfig(dim=30, task_type="CAUSAL_LM"))
    model.save_pretrained(os.path.join(tmp_out, "all"), selected_adapters=["three"])
    PeftModel.from_pretrained(tiny_gpt2(), os.path.join(tmp_out, "all", "three"))  # its true base accepts it


def test_set_adapter_that_fails_changes_nothing():
    model = _bert()
    model.add_adapter("b", hs.SubspaceConfig(dim=50, task_type="SEQ_CLS", seed=1))
    model.set_adapter("b")
    with torch.no_grad():
        find_engine(model).coeffs["b"].fill_(0.05)
    before = _logits(model, bert_batch())
    with pytest.raises(ValueError):
        model.base_model.set_adapter(["default", "b"])  # the SEQ_CLS head wrapper takes one adapter only
    assert find_engine(model).active == ["b"]
    torch.testing.assert_close(_logits(model, bert_batch()), before)


def test_reentrant_checkpointing_keeps_no_copy_of_theta():
    model = get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=100, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    engine = find_engine(model)
    seen = []
    layer = model.base_model.model.transformer.h[1].attn.c_attn.parametrizations.weight[0]
    layer.register_forward_hook(lambda *a: seen.append(len(getattr(engine.scratch, "cache", {}) or {})))
    _logits(model.eval(), gpt2_batch())  # an evaluation first fills the cache; training must drop it and keep none
    assert engine.scratch.cache
    seen.clear()
    model.train()
    model(**gpt2_batch()).loss.backward()
    assert seen and max(seen) == 0  # the no_grad forward inside checkpointing materialized nothing to keep
    assert engine.coeffs["default"].grad.abs().sum() > 0


def test_adapter_wrapped_on_meta_gets_its_fingerprint_when_saved(tmp_out):
    from accelerate import init_empty_weights

    real = tiny_bert_cls()
    with init_empty_weights():
        empty = tiny_bert_cls()
    model = get_peft_model(empty, hs.SubspaceConfig(dim=300, task_type="SEQ_CLS"))
    model.to_empty(device="cpu")
    engine = find_engine(model)
    with torch.no_grad():
        real_params = dict(real.named_parameters())
        for slot in engine.adapters["default"].layout.slots:
            engine.original(slot.name).copy_(real_params[slot.name])
    assert model.peft_config["default"].base_fingerprint is None
    model.save_pretrained(tmp_out)
    assert model.peft_config["default"].base_fingerprint is not None
    with pytest.raises(ValueError, match="check_base_fingerprint=False"):
        PeftModel.from_pretrained(tiny_bert_cls(seed=5), tmp_out)


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_vector_products_in_c_are_exact(kind):
    """Hv by double backward equals the finite difference of the gradient (the adjoint products are differentiable)."""
    model = get_peft_model(SmoothMLP(), hs.SubspaceConfig(dim=20, projection=kind, mode="said")).double()
    engine = find_engine(model)
    c = engine.coeffs["default"]
    with torch.no_grad():
        c.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(c.shape, generator=torch.Generator().manual_seed(1))
    x = X.double()

    def loss():
        return torch.tanh(model(x)).pow(2).sum()

    def grad_at(point):
        with torch.no_grad():
            c.copy_(point)
        return torch.autograd.grad(loss(), c)[0].double()

    c0 = c.detach().clone()
    (g,) = torch.autograd.grad(loss(), c, create_graph=True)
    (hv,) = torch.autograd.grad(g, c, grad_outputs=v)
    eps = 1e-3
    fd = (grad_at(c0 + eps * v) - grad_at(c0 - eps * v)) / (2 * eps)
    assert fd.norm() > 0
    torch.testing.assert_close(hv.double(), fd, rtol=1e-3, atol=1e-4 * float(fd.norm()))


@pytest.mark.parametrize("kind", ["fastfood", "dense"])
def test_projection_arithmetic_stays_float32_under_autocast(kind):
    model = _bert(kind)
    engine = find_engine(model)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    state = engine.adapters["default"]
    exact = state.projection.matvec(engine.coeffs["default"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = state.projection.matvec(engine.coeffs["default"])
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact)
