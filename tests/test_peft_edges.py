"""PEFT's verbs at the edges of the stack (issue 20): each test failed on main before its fix.

Merging and disabling, per-layer state, peft's messages and warnings, base-model state dicts, ``peft_type.value``,
transformers' ``tie_weights`` / ``resize_token_embeddings``, offloaded bases, quantized layers (in θ), and that
what the library changes in peft changes nothing for LoRA.
"""
import json
import os
import re
import warnings

import pytest
import torch
from peft import (LoraConfig, PeftConfig, PeftModel, get_base_model_state_dict, get_peft_model,
                  set_base_model_state_dict)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import hf_subspace as hs
from hf_subspace.engine import find_engine
from hf_subspace.errors import CorruptAdapterError

from conftest import tiny_gpt2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, X):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(X.float())))))


X = torch.randn(9, 10, generator=torch.Generator().manual_seed(1))


def _model(dim=30, adapter_name="default", **kw):
    model = get_peft_model(MLP(), hs.SubspaceConfig(dim=dim, **kw), adapter_name=adapter_name)
    _perturb(model, adapter_name)
    return model.eval()


def _perturb(model, name, seed=0):
    engine = find_engine(model)
    with torch.no_grad():
        engine.coeffs[name].normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _out(model):
    with torch.no_grad():
        return model(X)


# -- 1. merge, then disable --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hashing", "dense"])
def test_disable_adapter_after_merge_gives_the_base_outputs(kind):
    base = _out(MLP())
    model = _model(projection=kind)
    adapted = _out(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_out(model), base)
    torch.testing.assert_close(_out(model), adapted)  # enabled again: the adapted model (unmerged, as LoRA)
    assert not find_engine(model).merged_slots


def test_disabling_one_merged_layer_unmerges_it_alone():
    model = _model()
    model.merge_adapter()
    layer = model.base_model.model.lin0.parametrizations.weight[0]
    layer.enable_adapters(False)
    assert layer.merged_adapters == [] and layer.disable_adapters
    others = [m for m in _layers(model) if m is not layer]
    assert all(m.merged_adapters == ["default"] and not m.disable_adapters for m in others)
    torch.testing.assert_close(model.base_model.model.lin0.weight, MLP().lin0.weight)


# -- 2. base-model state dicts with the base's own keys -------------------------------------------------------------
def test_get_and_set_base_model_state_dict_use_the_base_models_keys():
    original = {k: v.clone() for k, v in MLP().state_dict().items()}
    model = _model(modules_to_save=["lin2"])
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(extracted[key], value)
    with torch.no_grad():
        for p in model.get_base_model().parameters():
            p.add_(1.0)
    result = set_base_model_state_dict(model, original)  # strict: raises on any unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, original[key])
    # the adapted model follows the restored θ0 (no stale inference cache)
    fresh = _model(modules_to_save=["lin2"])
    torch.testing.assert_close(_out(model.base_model.model.lin0), _out(fresh.base_model.model.lin0))


# -- 3. merging twice warns as peft does ----------------------------------------------------------------------------
def test_second_merge_warns_all_adapters_already_merged():
    model = _model()
    model.merge_adapter()
    merged = _out(model)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        model.merge_adapter()
    torch.testing.assert_close(_out(model), merged)
    layer = model.base_model.model.lin0.parametrizations.weight[0]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        layer.merge()


def test_merging_another_adapter_warns_which_were_already_merged():
    model = _model()
    model.add_adapter("other", hs.SubspaceConfig(dim=30, seed=1))
    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="Already following adapters were merged default. You are now additionally "
                                         "merging other."):
        model.merge_adapter(["other"])


# -- 4. in_features / out_features ----------------------------------------------------------------------------------
def test_tuner_layers_expose_in_and_out_features_of_their_module():
    model = _model()
    inner = model.base_model.model
    for name, (fin, fout) in {"lin0": (10, 20), "lin1": (20, 20), "lin2": (20, 2)}.items():
        for attr in ("weight", "bias"):
            layer = getattr(inner, name).parametrizations[attr][0]
            assert (layer.in_features, layer.out_features) == (fin, fout)
    conv = get_peft_model(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Embedding(7, 4)), hs.SubspaceConfig(dim=5))
    layers = {m.slot_name: (m.in_features, m.out_features) for m in _layers(conv)}
    assert layers["0.weight"] == (3, 5) and layers["1.weight"] == (7, 4)


# -- 5. set_requires_grad reaches modules_to_save -------------------------------------------------------------------
def test_set_requires_grad_turns_on_the_other_adapters_modules_to_save():
    model = _model(target_modules=["lin0"])
    model.add_adapter("other", hs.SubspaceConfig(dim=30, target_modules=["lin0", "lin1"], modules_to_save=["lin2"]))
    copy = model.base_model.model.lin2.modules_to_save["other"]
    assert not any(p.requires_grad for p in copy.parameters())
    model.set_requires_grad("other")
    assert all(p.requires_grad for p in copy.parameters())
    assert find_engine(model).coeffs["other"].requires_grad and find_engine(model).coeffs["default"].requires_grad
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert not any(p.requires_grad for p in copy.parameters())
    assert not find_engine(model).coeffs["default"].requires_grad


# -- 6 and 9. deleting adapters -----------------------------------------------------------------------------------
def test_deleting_an_unmerged_adapter_keeps_the_merged_one_merged():
    model = _model(adapter_name="adapter0")
    model.add_adapter("adapter1", hs.SubspaceConfig(dim=30, seed=1))
    _perturb(model, "adapter1", seed=1)
    model.set_adapter("adapter1")
    model.merge_adapter()
    merged = [m.merged_adapters[:] for m in _layers(model)]
    out = _out(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Unmerging the model first"
        model.delete_adapter("adapter0")
    assert [m.merged_adapters[:] for m in _layers(model)] == merged
    torch.testing.assert_close(_out(model), out)
    assert set(model.peft_config) == {"adapter1"} and model.active_adapters == ["adapter1"]


def test_deleting_a_merged_adapter_is_refused_with_peft_wording_and_changes_nothing():
    model = _model()
    model.merge_adapter()
    before = [m.merged_adapters[:] for m in _layers(model)]
    msg = "Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError, match=re.escape(msg)):
        model.delete_adapter("default")
    assert "default" in model.peft_config and [m.merged_adapters[:] for m in _layers(model)] == before
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert "default" not in model.peft_config


def test_deleting_the_active_adapter_activates_and_trains_the_remaining_one():
    model = _model(adapter_name="one")
    model.add_adapter("two", hs.SubspaceConfig(dim=30, seed=1))
    assert not find_engine(model).coeffs["two"].requires_grad
    with pytest.warns(UserWarning, match="Adapter one was active which is now deleted. Setting active adapter to two."):
        model.delete_adapter("one")
    assert model.active_adapters == ["two"] and find_engine(model).coeffs["two"].requires_grad


# -- 7. peft_type reads like a PeftType ------------------------------------------------------------------------------
def test_peft_type_has_a_value_and_mixed_models_get_peft_own_error(tmp_path):
    config = hs.SubspaceConfig(dim=30)
    assert config.peft_type.value == "SUBSPACE" and config.peft_type == "SUBSPACE"
    with pytest.raises(ValueError, match="The provided `peft_type` 'SUBSPACE' is not compatible with the "
                                         "`PeftMixedModel`"):
        get_peft_model(MLP(), config, mixed=True)
    model = _model()
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["peft_type"] == "SUBSPACE"
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    assert loaded.peft_config["default"].peft_type.value == "SUBSPACE"


# -- 8. per-layer enable/disable ------------------------------------------------------------------------------------
def test_enable_adapters_on_one_layer_disables_that_layer_alone():
    model = _model()
    layers = _layers(model)
    layers[0].enable_adapters(False)
    assert {m.disable_adapters for m in layers} == {True, False}
    assert model.get_model_status().enabled == "irregular"
    # the disabled tensor reads θ0, the others θ0 + δ
    lin0 = model.base_model.model.lin0
    torch.testing.assert_close(getattr(lin0, layers[0].slot_name.split(".")[-1]),
                               lin0.parametrizations[layers[0].slot_name.split(".")[-1]].original)
    other = layers[1]
    holder = model.base_model.model.get_submodule(other.slot_name.rsplit(".", 1)[0])
    attr = other.slot_name.rsplit(".", 1)[1]
    assert not torch.equal(getattr(holder, attr), holder.parametrizations[attr].original)
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        torch.testing.assert_close(_out(model), _out(MLP()))
    assert all(not m.disable_adapters for m in layers)  # peft enables every layer after an irregular state


def test_disable_adapter_context_restores_a_fully_disabled_model():
    model = _model()
    model.base_model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in _layers(model))
    torch.testing.assert_close(_out(model), _out(MLP()))
    model.base_model.enable_adapter_layers()
    assert not torch.allclose(_out(model), _out(MLP()))


# -- 16. what the library changes in peft changes nothing for LoRA --------------------------------------------------
def _lora():
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()


def test_a_lora_users_json_error_is_still_caught_with_its_fields(tmp_path):
    _lora().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(json.JSONDecodeError) as info:
        PeftConfig.from_pretrained(tmp_path)
    e = info.value
    with pytest.raises(json.JSONDecodeError) as plain:
        json.loads(path.read_text())
    assert (e.msg, e.pos, e.lineno, e.colno, e.doc) == (plain.value.msg, plain.value.pos, plain.value.lineno,
                                                         plain.value.colno, plain.value.doc)
    assert str(path) in str(e)  # the message also names the file
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UnicodeDecodeError) as info:
        PeftModel.from_pretrained(MLP(), tmp_path)
    assert info.value.start == 0 and info.value.encoding == "utf-8"


def test_lora_save_load_card_and_base_state_dict_are_peft_own(tmp_path):
    model = _lora()
    out = _out(model)
    model.save_pretrained(tmp_path)
    assert "SUBSPACE" not in (tmp_path / "README.md").read_text()
    assert "hf_subspace" not in (tmp_path / "README.md").read_text()
    loaded = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    torch.testing.assert_close(_out(loaded), out)
    from peft.utils import save_and_load

    from hf_subspace._registry import ORIGINALS

    sd = get_base_model_state_dict(model)
    assert set(sd) == set(MLP().state_dict())
    for key in model.base_model.model.state_dict():
        assert save_and_load._peft_key_to_original_key(model, key) == ORIGINALS["_peft_key_to_original_key"](model, key)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        set_base_model_state_dict(model, {**sd, "nope.weight": torch.zeros(1)})


def test_lora_load_of_a_corrupt_weights_file_raises_peft_own_error(tmp_path):
    _lora().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(Exception) as info:
        PeftModel.from_pretrained(MLP(), tmp_path)
    assert not isinstance(info.value, CorruptAdapterError)


# -- 11. transformers' tie_weights / resize_token_embeddings on a wrapped model -------------------------------------
def _gpt2_adapter(**kw):
    model = get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=50, **kw))
    _perturb(model, "default")
    return model


def _gpt2_logits(model):
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tie_weights_on_a_wrapped_model_with_tied_embeddings_keeps_the_adapted_model():
    model = _gpt2_adapter()
    before = _gpt2_logits(model)
    model.tie_weights()
    model.get_base_model().tie_weights(recompute_mapping=False)
    inner = model.get_base_model()
    assert inner.lm_head.parametrizations.weight.original is inner.transformer.wte.parametrizations.weight.original
    torch.testing.assert_close(_gpt2_logits(model), before)
    assert inner.get_parameter_or_buffer("transformer.wte.weight") is inner.transformer.wte.parametrizations.weight.original


def test_resize_token_embeddings_keeping_the_size_works_and_changing_a_tensor_of_theta_is_refused():
    model = _gpt2_adapter()
    before = _gpt2_logits(model)
    assert model.resize_token_embeddings(97).weight.shape[0] == 97
    torch.testing.assert_close(_gpt2_logits(model), before)
    with pytest.raises(hs.SubspaceConfigError, match=r"would change the embedding matrix from 97 rows to 128, but it "
                                                     r"is a tensor of the subspace adapter's θ.*Resize the base"):
        model.resize_token_embeddings(100, pad_to_multiple_of=64)
    assert model.get_base_model().transformer.wte.weight.shape[0] == 97
    torch.testing.assert_close(_gpt2_logits(model), before)


def test_resize_token_embeddings_outside_theta_resizes_and_keeps_the_tie():
    model = _gpt2_adapter(target_modules=["c_attn"])
    model.resize_token_embeddings(100)
    inner = model.get_base_model()
    assert inner.lm_head.weight.shape[0] == 100 and inner.lm_head.weight is inner.transformer.wte.weight
    assert _gpt2_logits(model).shape[-1] == 100


# -- 12. a base whose θ0 accelerate offloads -----------------------------------------------------------------------
def test_cpu_offloaded_base_is_refused_naming_the_offloaded_tensors():
    from accelerate import cpu_offload

    base = tiny_gpt2()
    cpu_offload(base, execution_device=torch.device("cpu"))
    with pytest.raises(hs.SubspaceConfigError, match=r"tensors of θ \('transformer.wte.weight', .* are offloaded by "
                                                     r"accelerate .* load the base without offload"):
        get_peft_model(base, hs.SubspaceConfig(dim=50))


def test_disk_offloaded_layers_are_refused_and_the_rest_can_be_theta(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path / "base")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
                  "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                offload_folder=str(tmp_path / "offload"))
    with pytest.raises(hs.SubspaceConfigError, match=r"'transformer.h.1.ln_1.weight'.* are offloaded"):
        get_peft_model(base, hs.SubspaceConfig(dim=50))
    model = get_peft_model(base, hs.SubspaceConfig(dim=50, target_modules=["h.0.attn.c_attn"]))
    _perturb(model, "default")
    assert not find_engine(model).coeffs["default"].is_meta
    out = _gpt2_logits(model)
    assert torch.isfinite(out).all()
    with model.disable_adapter():
        assert not torch.allclose(_gpt2_logits(model), out)


# -- 15. quantized layers: in θ (issue 23; the rest of their behaviour: tests/test_quantized.py) ---------------
@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)).save_pretrained(folder)

    def load(skip=None):
        quantization = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip)
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=quantization)
    return load


def test_quantized_layers_are_in_theta_with_no_warning(llama_4bit):
    base = llama_4bit()
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*quantized.*")
        model = get_peft_model(base, hs.SubspaceConfig(dim=50))
    slots = find_engine(model).adapters["default"].layout.slots
    assert len(slots) == 21 and [s.name for s in slots if s.quantized][0] == "model.layers.0.self_attn.q_proj.weight"
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert find_engine(model).coeffs["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("targets,n", [(["q_proj"], 2), ("model.*proj", 14), (["q_proj", "lm_head"], 3)])
def test_targeting_quantized_layers_puts_their_dequantized_weights_in_theta(llama_4bit, targets, n):
    model = get_peft_model(llama_4bit(), hs.SubspaceConfig(dim=20, target_modules=targets))
    slots = find_engine(model).adapters["default"].layout.slots
    assert len(slots) == n and all(s.quantized == (s.name != "lm_head.weight") for s in slots)
    assert slots[0].shape == (32, 32)  # the dequantized (out_features, in_features), not the packed storage


# -- mixed adapter batches and safe merging: refused, in peft's words where peft has them ---------------------------
def test_mixed_adapter_batch_is_refused_not_silently_run_through_the_active_adapter():
    model = _model(adapter_name="adapter0")
    model.add_adapter("adapter1", hs.SubspaceConfig(dim=30, seed=1))
    with pytest.raises(ValueError, match=r"does not support mixed adapter batches \(adapter_names=\['__base__', "
                                         r"'adapter0', 'adapter1', '__base__', \.\.\.\]\)"):
        model(X=X, adapter_names=["__base__", "adapter0", "adapter1"] * 3)
    torch.testing.assert_close(model(X=X), _out(model))  # without it, the forward runs as before


def test_safe_merge_of_a_broken_adapter_raises_peft_message_and_changes_nothing():
    model = _model()
    with torch.no_grad():
        find_engine(model).coeffs["default"][0] = float("nan")
    before = {k: v.clone() for k, v in get_base_model_state_dict(model).items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    for key, value in get_base_model_state_dict(model).items():
        assert torch.equal(value, before[key])
    assert not find_engine(model).merged_slots


def test_all_linear_on_a_partly_quantized_model_takes_every_linear_layer(llama_4bit):
    base = llama_4bit(skip=["q_proj", "lm_head"])  # q_proj kept in float by bitsandbytes, k_proj etc. quantized
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*quantized.*")
        model = get_peft_model(base, hs.SubspaceConfig(dim=20, target_modules="all-linear"))
    slots = find_engine(model).adapters["default"].layout.slots
    assert len(slots) == 14 and sum(s.quantized for s in slots) == 12
    assert [s.name for s in slots if not s.quantized] == ["model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.1.self_attn.q_proj.weight"]


def test_reparameterize_refuses_an_offloaded_base_too():
    from accelerate import cpu_offload

    base = tiny_gpt2()
    cpu_offload(base, execution_device=torch.device("cpu"))
    with pytest.raises(hs.SubspaceConfigError, match="are offloaded by accelerate"):
        hs.reparameterize(base, dim=50)
