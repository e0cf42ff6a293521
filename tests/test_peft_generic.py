"""PEFT's generic adapter tests, run on subspace adapters.

Our own port of the method-agnostic tests of peft's ``tests/test_custom_models.py`` and ``tests/testing_common.py``
(read at peft 0.20/0.21): the same toy models (``MLP``, ``EmbConv1D``, ``Conv1d``, ``Conv2d``, ``Conv3d``, ``MHA``,
``MlpUsingParameters`` with bare ``nn.Parameter`` weights), the same inputs (``arange(90).view(9, 10)``) and the same
assertions, parametrized over ``SubspaceConfig`` cases: every test × all four projection kinds × both modes on the
MLP (plus θ = some modules, and ``modules_to_save``), and every test on each other toy model with one kind and mode
each (the kinds and modes rotate over the models). peft sets ``init_lora_weights=False`` where a test needs an
adapter that changes the output; we draw c at random (:func:`_nonzero`) in the same places.

Run here (peft's test name → what it checks):

* ``attributes_parametrized``, ``adapter_name``: save/load/push attributes; the adapter's name is in its parameters.
* ``save_pretrained`` (safetensors and pickle), ``save_pretrained_selected_adapters``,
  ``save_pretrained_adapter_name_substring``, ``from_pretrained_config_construction``, ``load_multiple_adapters``,
  ``load_model_low_cpu_mem_usage``, ``inference_safetensors``, ``peft_model_device_map``, ``save_load_roundtrip``,
  ``parameters_after_loading_model``.
* ``merge_layers``, ``merge_layers_fp16``, ``merge_layers_nan``, ``merge_layers_multi``, ``merge_layers_is_idempotent``,
  ``safe_merge``, ``unload_adapter``.
* ``training_custom_models``, ``only_params_are_updated``, ``forward_output_finite``, ``forward_float16`` /
  ``forward_bfloat16`` (with and without autocast), ``adapter_dtype_autocast`` (deviation: c stays float32 whatever
  ``autocast_adapter_dtype`` says — in bf16, 0.5 + 1e-3 == 0.5), ``in_features_out_features_exposed``.
* ``disable_adapters``, ``disable_adapters_with_merging``, ``disable_adapters_exiting_context_restores_previous_state``,
  ``disable_adapters_exiting_context_irregular_state``, ``active_adapter``, ``multiple_active_adapters_forward``,
  ``multiple_active_adapters_merge_and_unmerge``.
* ``delete_adapter``, ``delete_inactive_adapter``, ``delete_unknown_adapter_raises``,
  ``delete_merged_adapter_raises_without_mutation``, ``delete_merged_adapter_only_rejects_the_merged_one``,
  ``delete_adapter_properly_cleans_up_after_itself``.
* ``get_base_model_state_dict`` (and ``set_base_model_state_dict``).
* ``mixed_adapter_batches``: refused with a ValueError (a subspace adapter adds one δ per weight for the whole batch;
  LoRA and RoAd alone support it in peft, and peft skips the test for every other method).
* peft's ``TestRequiresGrad`` (LoRA there): ``requires_grad_modules_to_save_default`` / ``_disabling`` /
  ``_multiple_adapters``, ``requires_grad_follows_inference_mode_modules_to_save``,
  ``requires_grad_<method>_different_targets`` / ``_same_targets``, ``loading_model_requires_grad_set_correctly``
  (with and without ``modules_to_save``); c and λ are frozen while every tensor of the adapter's θ is disabled.
* Once, not per case: ``set_requires_grad``, ``add_adapter_rejects_duplicate_name_without_mutation``,
  ``delete_adapter_with_multiple_adapters_works``, ``delete_adapter_multiple_adapters_with_modules_to_save``,
  ``multiple_active_adapters_with_same_modules_to_save_raises``,
  ``multiple_active_adapters_with_different_modules_to_save_works``, ``set_adapter_non_overlapping_modules``,
  ``set_adapter_non_overlapping_modules_to_save``, ``multiple_adapters_automatic_modules_to_save``,
  ``multiple_adapters_mixed_modules_to_save`` (and ``_order_switched``),
  ``multiple_adapters_no_needless_copy_modules_to_save``, ``mha_gradients_set_correctly``,
  ``adapter_name_makes_no_difference``, ``existing_model_card``, ``non_existing_model_card``,
  ``weight_bias_attributes``.

Skipped, with the reason (:data:`SKIPPED`, each one a collected test that reports its reason): the tests of options
other methods have and a subspace adapter does not (LoRA's ``bias`` / ``lora_bias`` / DoRA / ``target_parameters``
/ ``trainable_token_indices`` / weighted adapter combinations / layer reprs / conversion to LoRA / method-specific
GLoRA, MonteCLoRA, PVeRA, GraLoRA tests), and the tests peft itself skips for custom models (``generate*``,
``prepare_for_training``, ``training_layer_indexing``, ``training_gradient_checkpointing``,
``passing_input_embeds_works``: they need a transformers model; ``tests/test_peft_contract.py`` runs them on
GPT-2 / BERT).

Counts (``pytest tests/test_peft_generic.py -q -rs``, ~15 s of CPU on one core): 767 collected, 749 pass, 18 are
skipped, each printing its reason (15 from :data:`SKIPPED`, 3 where peft itself skips the modules_to_save case).
"""
import copy
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel, get_base_model_state_dict, get_peft_model, get_peft_model_state_dict, \
    inject_adapter_in_model, set_base_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_subspace as hs
from hf_subspace.engine import find_engine


# ---------------------------------------------------------------------------------------------------------------
# peft's toy models (same shapes and forwards)
# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.dtype))))))


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class ModelConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype).reshape(-1, 1, 10)
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(X)))))


class ModelConv2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype).reshape(-1, 5, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


class ModelConv3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        if X.dim() == 2:
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(X)))))


class ModelMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X, _ = self.mha(X, X, X)
        return self.sm(self.lin0(X))


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _LinearUsingParameter(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.dtype))))))


class Block(nn.Module):
    def __init__(self, bias=True, size=10):
        super().__init__()
        self.lin0 = nn.Linear(size, size, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size, bias=bias)

    def forward(self, X):
        return self.lin1(self.drop(self.relu(self.lin0(X.float()))))


class DeepMLP(nn.Module):
    """peft's ``DeepMLP`` (``layers.<i>.lin0`` / ``lin1`` blocks), with 3 blocks instead of 12."""

    def __init__(self, bias=True, num_hidden_layers=3, size=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(bias=bias, size=size) for _ in range(num_hidden_layers)])
        self.out = nn.Linear(10, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(X))


MODELS = {"MLP": MLP, "EmbConv1D": ModelEmbConv1D, "Conv1d": ModelConv1D, "Conv2d": ModelConv2D,
          "Conv3d": ModelConv3D, "MHA": ModelMha, "MlpUsingParameters": MlpUsingParameters}


def from_pretrained(model_id, dtype=None):
    """peft's ``MockTransformerWrapper.from_pretrained``: the same weights every time."""
    torch.manual_seed(0)
    model = MODELS[model_id]()
    return model.to(dtype) if dtype is not None else model


def inputs():
    return {"X": torch.arange(90).view(9, 10)}


# ---------------------------------------------------------------------------------------------------------------
# the SubspaceConfig cases
# ---------------------------------------------------------------------------------------------------------------
KINDS = ("hashing", "fastfood", "sparse", "dense")
MODES = ("global", "said")


@dataclass
class Case:
    model_id: str
    kwargs: dict = field(default_factory=dict)

    def config(self, **over):
        return hs.SubspaceConfig(**{"dim": 20, **self.kwargs, **over})

    @property
    def id(self):
        extra = "-".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("projection", "mode"))
        return "-".join(filter(None, [self.model_id, self.kwargs.get("projection", "hashing"),
                                      self.kwargs.get("mode", "global"), extra])).replace(" ", "")


CASES = [Case("MLP", {"projection": k, "mode": m}) for k in KINDS for m in MODES]
CASES += [Case("MLP", {"projection": "hashing", "target_modules": ["lin0"]}),
          Case("MLP", {"projection": "fastfood", "mode": "said", "target_modules": ["lin0"],
                       "modules_to_save": ["lin1"]})]
_OTHERS = ["EmbConv1D", "Conv1d", "Conv2d", "Conv3d", "MHA", "MlpUsingParameters"]
CASES += [Case(m, {"projection": KINDS[i % 4], "mode": MODES[(i // 2) % 2], "dim": 10 if m == "Conv1d" else 20})
          for i, m in enumerate(_OTHERS)]
CASE_IDS = [c.id for c in CASES]
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)


def _nonzero(model, adapter_name="default", seed=0, scale=1.0):
    """A trained-looking adapter: c drawn at random (peft's tests use ``init_lora_weights=False`` for this)."""
    engine = find_engine(model)
    with torch.no_grad():
        engine.coeffs[adapter_name].normal_(0, scale, generator=torch.Generator().manual_seed(seed))
    return model


def _wrap(case, adapter_name="default", nonzero=False, **over):
    model = get_peft_model(from_pretrained(case.model_id), case.config(**over), adapter_name=adapter_name)
    return _nonzero(model, adapter_name) if nonzero else model


def _run(model):
    return model(**inputs())


def _tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _lr(case, default):
    return 1e-3 if case.model_id == "MHA" else default  # peft: exploding gradients with MHA at a high lr


# ---------------------------------------------------------------------------------------------------------------
# attributes, names, saving and loading
# ---------------------------------------------------------------------------------------------------------------
@parametrize_cases
def test_attributes_parametrized(case):
    model = _wrap(case)
    assert all(hasattr(model, a) for a in ("save_pretrained", "from_pretrained", "push_to_hub"))


@parametrize_cases
def test_adapter_name(case):
    model = _wrap(case, adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())


def _check_modelcard(folder, model):
    """peft's ``check_modelcard``: YAML front matter with ``library_name: peft``, no ``base_model`` for a custom
    model (no ``config``), and the method's tag (peft checks ``lora`` for LoRA through ``peft_type.value``)."""
    import yaml

    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", readme, re.DOTALL).group(1))
    assert meta["library_name"] == "peft"
    assert "base_model" not in meta
    assert model.active_peft_config.peft_type.value == "SUBSPACE" and "hf-subspace" in meta["tags"]


def _check_config_json(folder, model):
    import json

    config = json.load(open(os.path.join(folder, "adapter_config.json"), encoding="utf-8"))
    assert config["peft_type"] == "SUBSPACE" and config["base_model_name_or_path"] is None


def _check_save_pretrained(case, safe_serialization):
    model = _wrap(case, nonzero=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=safe_serialization)
        with warnings.catch_warnings(record=True) as recs:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp)
        assert not any("Found missing adapter keys" in str(r.message) for r in recs)
        state, state_loaded = model.state_dict(), loaded.state_dict()
        assert state.keys() == state_loaded.keys()
        for key in state:
            assert torch.allclose(state[key], state_loaded[key])
        files = os.listdir(tmp)
        assert ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin") in files
        assert "adapter_config.json" in files and "model.safetensors" not in files and "config.json" not in files
        _check_modelcard(tmp, model)
        _check_config_json(tmp, model)


@parametrize_cases
def test_save_pretrained(case):
    _check_save_pretrained(case, safe_serialization=True)


@parametrize_cases
def test_save_pretrained_pickle(case):
    _check_save_pretrained(case, safe_serialization=False)


@parametrize_cases
def test_save_pretrained_selected_adapters(case):
    model = _wrap(case, nonzero=True)
    model.add_adapter("new_adapter", case.config(seed=1))
    _nonzero(model, "new_adapter", seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _check_modelcard(tmp, model)
        _check_config_json(tmp, model)
        loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp)
        loaded.load_adapter(os.path.join(tmp, "new_adapter"), "new_adapter")
        state, state_loaded = model.state_dict(), loaded.state_dict()
        assert state.keys() == state_loaded.keys()
        for key in state:
            assert torch.allclose(state[key], state_loaded[key])
        assert os.path.exists(os.path.join(tmp, "new_adapter", "adapter_model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp)
        assert "default" in loaded.peft_config and "new_adapter" not in loaded.peft_config


@parametrize_cases
def test_save_pretrained_adapter_name_substring(case):
    model = _wrap(case)
    expected = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, case.config())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        assert len(load_file(os.path.join(tmp, "adapter_model.safetensors"))) == expected


@parametrize_cases
def test_load_model_low_cpu_mem_usage(case):
    model = _wrap(case)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp, low_cpu_mem_usage=True)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        model.load_adapter(tmp, adapter_name="other", low_cpu_mem_usage=True)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    # peft's second half, inject_adapter_in_model(low_cpu_mem_usage=True): peft refuses it for every method that
    # keeps shared state on the tuner (VeRA, VB-LoRA, ...), and so for this one, with its own message
    with pytest.raises(ValueError, match="`inject_adapter_in_model` does not support SUBSPACE because it uses shared "
                                         "state stored on the tuner"):
        inject_adapter_in_model(case.config(), from_pretrained(case.model_id), low_cpu_mem_usage=True)


@parametrize_cases
def test_from_pretrained_config_construction(case):
    config = case.config()
    model = get_peft_model(from_pretrained(case.model_id), config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp, is_trainable=False, config=config)
        assert loaded.peft_config["default"].inference_mode
        assert loaded.peft_config["default"] is config


@parametrize_cases
def test_load_multiple_adapters(case):
    model = _wrap(case)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp)
        assert model.load_adapter(tmp, adapter_name="other").missing_keys == []
        assert model.load_adapter(tmp, adapter_name="yet-another").missing_keys == []


@parametrize_cases
def test_inference_safetensors(case):
    model = _wrap(case)
    _run(model)[0].sum().backward()
    model.eval()
    logits = _run(model)[0]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        assert "adapter_model.safetensors" in os.listdir(tmp) and "adapter_model.bin" not in os.listdir(tmp)
        loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp)
        assert torch.allclose(logits, _run(loaded)[0], atol=1e-4, rtol=1e-4)


@parametrize_cases
def test_peft_model_device_map(case):
    model = _wrap(case)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp, device_map={"": "cpu"})
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}


@parametrize_cases
def test_save_load_roundtrip(case, tmp_path):
    model = from_pretrained(case.model_id)
    with torch.inference_mode():
        output_base = _run(model)
    model = _nonzero(get_peft_model(model, case.config())).eval()
    with torch.inference_mode():
        output_before = _run(model)
    assert not torch.allclose(output_base, output_before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)
    loaded = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp_path)
    with torch.inference_mode():
        assert torch.allclose(output_before, _run(loaded), atol=1e-5, rtol=1e-5)


@parametrize_cases
def test_parameters_after_loading_model(case, tmp_path):
    model = _wrap(case).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=_lr(case, 0.5))
    for _ in range(3):
        optimizer.zero_grad()
        _run(model).sum().backward()
        optimizer.step()
    before = model.state_dict()
    model.save_pretrained(tmp_path)
    after = PeftModel.from_pretrained(from_pretrained(case.model_id), tmp_path).state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# merging and unloading
# ---------------------------------------------------------------------------------------------------------------
@parametrize_cases
def test_merge_layers(case):
    model = _wrap(case, nonzero=True).eval()
    logits = _run(model)[0]
    model.merge_adapter()
    logits_merged = _run(model)[0]
    model.unmerge_adapter()
    logits_unmerged = _run(model)[0]
    model = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    logits_merged_unloaded = _run(model)[0]
    atol, rtol = 1e-4, 1e-4
    assert torch.allclose(logits, logits_merged, atol=atol, rtol=rtol)
    assert torch.allclose(logits, logits_unmerged, atol=atol, rtol=rtol)
    assert torch.allclose(logits, logits_merged_unloaded, atol=atol, rtol=rtol)
    base_logits = _run(from_pretrained(case.model_id).eval())[0]
    assert not torch.allclose(logits_merged, base_logits, atol=1e-10, rtol=1e-10)
    import pickle

    assert torch.allclose(logits_merged, _run(pickle.loads(pickle.dumps(model)))[0], atol=atol, rtol=rtol)


@parametrize_cases
def test_merge_layers_fp16(case):
    model = get_peft_model(from_pretrained(case.model_id, dtype=torch.float16), case.config())
    model = model.to(dtype=torch.float16).eval()
    unloaded = model.merge_and_unload()
    assert all(p.dtype == torch.float16 for p in unloaded.parameters() if p.is_floating_point())


@parametrize_cases
def test_merge_layers_nan(case):
    model = _wrap(case, nonzero=True).eval()
    logits_unmerged = _run(model)[0]
    model = model.merge_and_unload()
    assert torch.allclose(logits_unmerged, _run(model)[0], atol=1e-3, rtol=1e-3)
    model = _wrap(case)
    for name, param in model.named_parameters():
        if model.prefix in name:
            param.data[0] = torch.nan
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    for name, param in model.named_parameters():
        if model.prefix in name:
            param.data[0] = torch.inf
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)


@parametrize_cases
def test_merge_layers_multi(case):
    model = _wrap(case, nonzero=True).eval()
    with torch.inference_mode():
        logits_adapter_1 = _run(model)[0]
    model.add_adapter("adapter-2", case.config(seed=1))
    _nonzero(model, "adapter-2", seed=1)
    model.set_adapter("adapter-2")
    model.eval()
    containers = (nn.ModuleDict, nn.ParameterDict)
    num_default = len([m for m in model.modules() if isinstance(m, containers) and "default" in m])
    num_adapter2 = len([m for m in model.modules() if isinstance(m, containers) and "adapter-2" in m])
    assert num_default > 0 and num_default == num_adapter2
    with torch.inference_mode():
        logits_adapter_2 = _run(model)[0]
    atol, rtol = 1e-3, 1e-3
    assert not torch.allclose(logits_adapter_1, logits_adapter_2, atol=atol, rtol=rtol)
    model.set_adapter("default")
    with torch.inference_mode():
        assert torch.allclose(_run(model)[0], logits_adapter_1, atol=atol, rtol=rtol)
    copy_1, copy_2 = copy.deepcopy(model), copy.deepcopy(model)
    with torch.inference_mode():
        merged_all = _run(model.merge_and_unload(adapter_names=["adapter-2", "default"]))[0]
        assert not torch.allclose(merged_all, logits_adapter_2, atol=atol, rtol=rtol)
        assert not torch.allclose(merged_all, logits_adapter_1, atol=atol, rtol=rtol)
        merged_2 = _run(copy_1.merge_and_unload(adapter_names=["adapter-2"]))[0]
        assert torch.allclose(merged_2, logits_adapter_2, atol=atol, rtol=rtol)
        merged_1 = _run(copy_2.merge_and_unload(adapter_names=["default"]))[0]
        assert torch.allclose(merged_1, logits_adapter_1, atol=atol, rtol=rtol)


@parametrize_cases
def test_merge_layers_is_idempotent(case):
    model = _wrap(case, nonzero=True).eval()
    model.merge_adapter()
    logits_0 = _run(model)[0]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert torch.allclose(logits_0, _run(model)[0], atol=1e-6, rtol=1e-6)


@parametrize_cases
def test_safe_merge(case, tmp_path):
    from safetensors.torch import save_file

    model = from_pretrained(case.model_id).eval()
    logits_base = _run(model)[0]
    model = _nonzero(get_peft_model(model, case.config())).eval()
    logits_peft = _run(model)[0]
    assert not torch.allclose(logits_base, logits_peft, atol=1e-6, rtol=1e-6)
    unloaded = model.merge_and_unload(safe_merge=True)
    assert torch.allclose(logits_peft, _run(unloaded)[0], atol=1e-6, rtol=1e-6)
    torch.save(unloaded.state_dict(), tmp_path / "model.bin")
    save_file({k: v.contiguous() for k, v in unloaded.state_dict().items()}, tmp_path / "model.safetensors")


@parametrize_cases
def test_unload_adapter(case):
    model = from_pretrained(case.model_id).eval()
    num_params_base = len(model.state_dict())
    with torch.inference_mode():
        logits_base = _run(model)[0]
    model = _nonzero(get_peft_model(model, case.config()))
    with torch.inference_mode():
        logits_with_adapter = _run(model)[0]
    model = model.unload()
    with torch.inference_mode():
        logits_unload = _run(model)[0]
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert not torch.allclose(logits_with_adapter, logits_unload, atol=1e-10, rtol=1e-10)
    assert torch.allclose(logits_base, logits_unload, atol=1e-4, rtol=1e-4)
    assert num_params_base == len(model.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# training, forward, dtypes
# ---------------------------------------------------------------------------------------------------------------
@parametrize_cases
def test_training_custom_models(case):
    model = _wrap(case)
    _run(model)[0].sum().backward()
    for n, param in model.named_parameters():
        if model.prefix in n or "modules_to_save" in n:
            assert (param.grad is not None) == param.requires_grad
        else:
            assert param.grad is None


@parametrize_cases
def test_only_params_are_updated(case):
    model = _wrap(case)
    before = copy.deepcopy(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=_lr(case, 0.5))
    for _ in range(3):
        optimizer.zero_grad()
        _run(model).sum().backward()
        optimizer.step()
    params_before, params_after = dict(before.named_parameters()), dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    tol = 1e-4
    for name, p_before in params_before.items():
        p_after = params_after[name]
        if model.prefix in name or "modules_to_save" in name:
            if not p_after.requires_grad:
                assert torch.equal(p_before, p_after)
            else:
                assert not torch.allclose(p_before, p_after, atol=tol, rtol=tol), name
        else:
            assert torch.allclose(p_before, p_after, atol=tol, rtol=tol), name


@parametrize_cases
def test_in_features_out_features_exposed(case):
    model = _wrap(case)
    layers = _tuner_layers(model)
    assert layers
    for module in layers:
        assert hasattr(module, "in_features") and hasattr(module, "out_features")


@parametrize_cases
def test_forward_output_finite(case):
    model = _wrap(case).eval()
    with torch.no_grad():
        assert torch.isfinite(_run(model)).all()


def _check_forward_low_precision(case, dtype, autocast):
    model = from_pretrained(case.model_id, dtype=dtype)
    model.dtype = dtype
    model = get_peft_model(model, case.config()).eval()
    _nonzero(model, scale=0.1)
    context = torch.autocast("cpu", dtype=dtype) if autocast else torch.no_grad()
    with context, torch.no_grad():  # peft checks that none of this raises; we also compare the outputs
        outputs = [_run(model)]
        model.merge_adapter(safe_merge=False)
        outputs.append(_run(model))
        model.unmerge_adapter()
        outputs.append(_run(model))
        model.merge_adapter(safe_merge=True)
        outputs.append(_run(model))
        model.unmerge_adapter()
        outputs.append(_run(model))
        outputs.append(_run(model.merge_and_unload()))
    for out in outputs[1:]:
        assert torch.allclose(out.float(), outputs[0].float(), atol=0.1, rtol=0.05)


@parametrize_cases
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_forward_low_precision(case, dtype, autocast):
    """peft's test_forward_float16 / _bfloat16 / _float16_no_autocast / _bfloat16_no_autocast."""
    _check_forward_low_precision(case, dtype, autocast)


@parametrize_cases
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_adapter_dtype_autocast(case, autocast_adapter_dtype):
    """peft: with ``autocast_adapter_dtype=True`` the adapter weights of a bf16 base are float32, with False they
    take the base's dtype. Deviation: c and λ are float32 either way (a bf16 c cannot take small steps)."""
    model = from_pretrained(case.model_id, dtype=torch.bfloat16)
    model = get_peft_model(model, case.config(), autocast_adapter_dtype=autocast_adapter_dtype)
    engine = find_engine(model)
    assert all(p.dtype == torch.float32 for p in engine.parameters())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters()
               if model.prefix not in n and "modules_to_save" not in n)


# ---------------------------------------------------------------------------------------------------------------
# disabling and switching adapters
# ---------------------------------------------------------------------------------------------------------------
def _train_nll(model, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        y_pred = _run(model)
        y = torch.arange(len(y_pred)) % 2
        if y_pred.dim() == 3:  # MHA: (9, 2) per "sequence" of length 1
            y_pred = y_pred.reshape(len(y_pred), -1)[:, :2]
        nn.functional.nll_loss(y_pred, y).backward()
        optimizer.step()


@parametrize_cases
def test_disable_adapters(case):
    model = from_pretrained(case.model_id).eval()
    outputs_base = _run(model)
    model = get_peft_model(model, case.config()).eval()
    outputs_before = _run(model)
    assert torch.allclose(outputs_base, outputs_before)
    model.train()
    lr = 1.0 if case.model_id == "EmbConv1D" else 0.01
    _train_nll(model, torch.optim.SGD(model.parameters(), lr=lr))
    model.eval()
    outputs_after = _run(model)
    with model.disable_adapter():
        outputs_disabled = _run(model)
    outputs_enabled_after_disable = _run(model)
    assert not torch.allclose(outputs_before, outputs_after, rtol=1e-8, atol=1e-8)
    assert torch.allclose(outputs_before, outputs_disabled)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable)


@parametrize_cases
def test_disable_adapters_with_merging(case):
    model = get_peft_model(from_pretrained(case.model_id), case.config()).eval()
    outputs_before = _run(model)
    model.train()
    _train_nll(model, torch.optim.Adam(model.parameters(), lr=0.01))
    model.eval()
    outputs_unmerged = _run(model)
    model.merge_adapter()
    outputs_after = _run(model)
    with model.disable_adapter():
        outputs_disabled = _run(model)
    outputs_enabled_after_disable = _run(model)
    atol, rtol = 1e-5, 1e-5
    assert not torch.allclose(outputs_before, outputs_after, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_unmerged, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_before, outputs_disabled, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable, atol=atol, rtol=rtol)


@parametrize_cases
def test_disable_adapters_exiting_context_restores_previous_state(case):
    model = _wrap(case)
    layers = _tuner_layers(model)
    assert all(not m.disable_adapters for m in layers)
    with model.disable_adapter():
        pass
    assert all(not m.disable_adapters for m in layers)
    model.disable_adapter_layers()
    assert all(m.disable_adapters for m in layers)
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)


@parametrize_cases
def test_disable_adapters_exiting_context_irregular_state(case):
    model = _wrap(case)
    layers = _tuner_layers(model)
    assert len(layers) >= 2  # every toy model has at least two tensors in θ
    layers[0].enable_adapters(False)
    assert {m.disable_adapters for m in layers} == {True, False}
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        pass
    assert all(not m.disable_adapters for m in layers)


@parametrize_cases
def test_active_adapter(case):
    if case.kwargs.get("modules_to_save"):
        pytest.skip("peft: multiple active adapters with modules_to_save is not supported (peft skips this case)")
    model = _wrap(case)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", case.config())
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]


@parametrize_cases
def test_multiple_active_adapters_forward(case):
    """peft's TestMultipleActiveAdapters.test_multiple_active_adapters_forward (two adapters of the same kind)."""
    if case.kwargs.get("modules_to_save"):
        pytest.skip("peft: multiple active adapters with modules_to_save is not supported (peft skips this case)")
    model = _wrap(case, adapter_name="adapter_1", nonzero=True).eval()
    model.add_adapter("adapter_2", case.config(seed=1))
    _nonzero(model, "adapter_2", seed=1)
    model.set_adapter("adapter_1")
    out_1 = _run(model)
    model.set_adapter("adapter_2")
    out_2 = _run(model)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    out_both = _run(model)
    assert not torch.allclose(out_1, out_2, atol=1e-5)
    assert not torch.allclose(out_1, out_both, atol=1e-5) and not torch.allclose(out_2, out_both, atol=1e-5)
    # θ = θ0 + δ1 + δ2: merging both gives the same model
    model.merge_adapter()
    assert torch.allclose(_run(model), out_both, atol=1e-5)


@parametrize_cases
def test_multiple_active_adapters_merge_and_unmerge(case):
    if case.kwargs.get("modules_to_save"):
        pytest.skip("peft: multiple active adapters with modules_to_save is not supported (peft skips this case)")
    base_out = _run(from_pretrained(case.model_id).eval())
    model = _wrap(case, adapter_name="adapter_1", nonzero=True).eval()
    model.add_adapter("adapter_2", case.config(seed=1))
    _nonzero(model, "adapter_2", seed=1)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    out_both = _run(model)
    model.merge_adapter()
    assert torch.allclose(_run(model), out_both, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(_run(model), out_both, atol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(_run(model), base_out, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# deleting adapters
# ---------------------------------------------------------------------------------------------------------------
def _check_deleted(model, name, active):
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()) + getattr(module, "other_param_names", ()):
            assert name not in getattr(module, attr)
        if isinstance(module, AuxiliaryTrainingWrapper):
            assert name not in module._adapters and module.active_adapters == active
        if isinstance(module, ModulesToSaveWrapper):
            assert name not in module.modules_to_save


@parametrize_cases
@pytest.mark.parametrize("active", [True, False], ids=["delete_adapter", "delete_inactive_adapter"])
def test_delete_adapter(case, active):
    """peft's test_delete_adapter and test_delete_inactive_adapter."""
    model = _wrap(case)
    model.add_adapter("delete_me", case.config())
    if active:
        model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    _check_deleted(model, "delete_me", ["default"])
    assert "delete_me" not in find_engine(model).adapters
    model.delete_adapter("default")
    assert "default" not in model.peft_config and model.active_adapters == []
    _check_deleted(model, "default", [])
    model.base_model(**inputs())  # should not raise


@parametrize_cases
def test_delete_unknown_adapter_raises(case):
    model = _wrap(case)
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


@parametrize_cases
def test_delete_merged_adapter_raises_without_mutation(case):
    model = _wrap(case, nonzero=True)
    layers = _tuner_layers(model)
    model.merge_adapter()
    merged_before = [m.merged_adapters[:] for m in layers]
    available_before = [set(m._all_available_adapter_names()) for m in layers]
    msg = "Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError, match=re.escape(msg)):
        model.delete_adapter("default")
    assert "default" in model.peft_config
    assert [m.merged_adapters[:] for m in layers] == merged_before
    assert [set(m._all_available_adapter_names()) for m in layers] == available_before
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    model.delete_adapter("default")
    assert "default" not in model.peft_config


@parametrize_cases
def test_delete_merged_adapter_only_rejects_the_merged_one(case):
    model = _wrap(case, adapter_name="adapter0", nonzero=True)
    model.add_adapter("adapter1", case.config(seed=1))
    _nonzero(model, "adapter1", seed=1)
    model.set_adapter("adapter1")
    layers = _tuner_layers(model)
    model.merge_adapter()
    merged_after_merge = [m.merged_adapters[:] for m in layers]
    msg = "Cannot delete adapter(s) ['adapter1'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError, match=re.escape(msg)):
        model.delete_adapter("adapter1")
    assert set(model.peft_config) == {"adapter0", "adapter1"}
    model.delete_adapter("adapter0")
    assert set(model.peft_config) == {"adapter1"}
    assert [m.merged_adapters[:] for m in layers] == merged_after_merge
    model.unmerge_adapter()
    model.delete_adapter("adapter1")
    assert not model.peft_config


@parametrize_cases
def test_delete_adapter_properly_cleans_up_after_itself(case):
    model = get_peft_model(from_pretrained(case.model_id), case.config(), adapter_name="foobar")

    def dict_like_holding_foobar(obj):
        for attr_name in dir(obj):
            if attr_name.startswith("_"):
                continue
            try:
                attr = getattr(obj, attr_name)
            except AttributeError:
                continue
            if callable(getattr(attr, "keys", None)) and hasattr(attr, "__getitem__") and hasattr(attr, "__contains__") \
                    and "foobar" in attr:
                yield attr_name, attr

    found = list(dict_like_holding_foobar(model))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) or module is find_engine(model):
            found.extend(dict_like_holding_foobar(module))
    assert found
    model.delete_adapter(adapter_name="foobar")
    assert not [name for name, attr in found if "foobar" in attr]


# ---------------------------------------------------------------------------------------------------------------
# state dicts and mixed batches
# ---------------------------------------------------------------------------------------------------------------
@parametrize_cases
def test_get_base_model_state_dict(case):
    model = from_pretrained(case.model_id)
    base_keys = set(model.state_dict())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, case.config())
    extracted = get_base_model_state_dict(peft_model)
    assert set(extracted) == base_keys
    for key in original:
        assert torch.allclose(original[key], extracted[key]), key
    with torch.no_grad():
        for param in peft_model.get_base_model().parameters():
            if param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    result = set_base_model_state_dict(peft_model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    restored = get_base_model_state_dict(peft_model)
    for key in original:
        assert torch.allclose(original[key], restored[key]), key


@parametrize_cases
def test_mixed_adapter_batches(case):
    """peft runs this for LoRA and RoAd only and skips every other method; a subspace adapter refuses the argument
    (one δ per weight for the whole batch) instead of ignoring it."""
    model = _wrap(case, adapter_name="adapter0", nonzero=True).eval()
    model.add_adapter("adapter1", case.config(seed=1))
    batch = {k: torch.cat([v for _ in range(3)]) for k, v in inputs().items()}
    batch["adapter_names"] = [["__base__", "adapter0", "adapter1"][i % 3] for i in range(len(batch["X"]))]
    with pytest.raises(ValueError, match="does not support mixed adapter batches"):
        model(**batch)


# ---------------------------------------------------------------------------------------------------------------
# once, not per case (peft runs these on fixed models)
# ---------------------------------------------------------------------------------------------------------------
def _check_requires_grad(model, adapter_name, requires_grad, modules_to_save=()):
    engine = find_engine(model)
    assert engine.coeffs[adapter_name].requires_grad == requires_grad
    for name in modules_to_save:
        wrapper = model.base_model.model.get_submodule(name)
        assert all(p.requires_grad == requires_grad for p in wrapper.modules_to_save[adapter_name].parameters())


def test_set_requires_grad():
    model = get_peft_model(DeepMLP(), hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0"]),
                           adapter_name="adapter0").eval()
    _check_requires_grad(model, "adapter0", True)
    model.add_adapter("adapter1", hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0", "layers.1.lin0"],
                                                    modules_to_save=["layers.2.lin0"]))
    _check_requires_grad(model, "adapter0", True)
    _check_requires_grad(model, "adapter1", False, modules_to_save=["layers.2.lin0"])
    model.set_requires_grad(adapter_names="adapter1")
    _check_requires_grad(model, "adapter0", True)
    _check_requires_grad(model, "adapter1", True, modules_to_save=["layers.2.lin0"])
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    _check_requires_grad(model, "adapter0", False)
    _check_requires_grad(model, "adapter1", False, modules_to_save=["layers.2.lin0"])


@pytest.mark.parametrize("mixed", [False, True])
def test_add_adapter_rejects_duplicate_name_without_mutation(mixed):
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20), adapter_name="existing")
    _nonzero(model, "existing")
    config_before = model.peft_config["existing"]
    state_before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="existing"):
        model.add_adapter("existing", hs.SubspaceConfig(dim=30))
    assert model.peft_config["existing"] is config_before
    state_after = model.state_dict()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    if mixed:  # peft's mixed model takes only LoRA-family configs: refused with peft's message
        with pytest.raises(ValueError, match="is not compatible with the `PeftMixedModel`"):
            get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20), mixed=True)


def test_delete_adapter_with_multiple_adapters_works():
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]),
                           adapter_name="adapter0")
    model.add_adapter("adapter1", hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    model.add_adapter("adapter2", hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    model.delete_adapter("adapter0")
    assert model.active_adapters == ["adapter1"] and set(model.peft_config) == {"adapter1", "adapter2"}
    model.delete_adapter("adapter2")
    assert model.active_adapters == ["adapter1"] and set(model.peft_config) == {"adapter1"}


def test_delete_adapter_multiple_adapters_with_modules_to_save():
    config = dict(dim=20, target_modules=["lin0"], modules_to_save=["lin1"])
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(**config), adapter_name="adapter0")
    model.add_adapter("adapter1", hs.SubspaceConfig(**config))
    model.add_adapter("adapter2", hs.SubspaceConfig(**config))
    wrapper = model.base_model.model.lin1
    assert set(wrapper.modules_to_save) == {"adapter0", "adapter1", "adapter2"}
    model.delete_adapter("adapter0")
    assert set(wrapper.modules_to_save) == {"adapter1", "adapter2"} and wrapper.active_adapters == ["adapter1"]
    model.delete_adapter("adapter2")
    assert set(wrapper.modules_to_save) == {"adapter1"} and wrapper.active_adapters == ["adapter1"]


def test_multiple_active_adapters_with_same_modules_to_save_raises():
    config = dict(dim=20, target_modules=["lin0"], modules_to_save=["lin1"])
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(**config))
    model.add_adapter("other", hs.SubspaceConfig(**config))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]  # refused: nothing changed


def test_multiple_active_adapters_with_different_modules_to_save_works():
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    model.add_adapter("other", hs.SubspaceConfig(dim=20, target_modules=["lin0"], modules_to_save=["lin1"]))
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    _run(model)


def _layer(model, i, name):
    """The tuner layer of ``layers.<i>.<name>.weight`` (peft's tests read ``layers[i].<name>``, LoRA's layer)."""
    return model.base_model.model.layers[i].get_submodule(name).parametrizations.weight[0]


def test_set_adapter_non_overlapping_modules():
    config0 = hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0", "layers.1.lin0"])
    config1 = hs.SubspaceConfig(dim=20, target_modules=["layers.1.lin0", "layers.2.lin0"])
    model = get_peft_model(DeepMLP(), config0, adapter_name="default")
    model.add_adapter("other", config1)
    layers = [(0, "lin0"), (1, "lin0"), (2, "lin0")]
    for switch in (model.set_adapter, lambda n: model.base_model.set_adapter([n])):
        for name in ("other", "default"):
            switch(name)
            assert model.base_model.active_adapters == [name]
            assert all(_layer(model, i, m).active_adapters == [name] for i, m in layers)
    assert _layer(model, 0, "lin0")._all_available_adapter_names() == ["default"]
    assert _layer(model, 2, "lin0")._all_available_adapter_names() == ["other"]


def test_set_adapter_non_overlapping_modules_to_save():
    config0 = hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0"])
    config1 = hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"])
    model = get_peft_model(DeepMLP(), config0, adapter_name="default")
    model.add_adapter("other", config1)
    lin1 = model.base_model.model.layers[0].lin1

    def check(name):
        assert model.base_model.active_adapters == [name]
        assert _layer(model, 0, "lin0").active_adapters == [name]
        assert lin1.active_adapters == ([] if name == "default" else ["other"])
        assert lin1.modules_to_save.other.weight.requires_grad is (name == "other")

    check("default")
    for switch in (model.set_adapter, lambda n: model.base_model.set_adapter([n])):
        for name in ("other", "default"):
            switch(name)
            check(name)


def test_multiple_adapters_automatic_modules_to_save():
    """peft: with task_type SEQ_CLS a 'classifier' is added to modules_to_save for every adapter."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.classifier = nn.Linear(10, 20), nn.Linear(20, 2)

        def forward(self, X):
            return self.classifier(self.lin0(X.float()))

    model = get_peft_model(Classifier(), hs.SubspaceConfig(dim=20, target_modules=["lin0"], task_type="SEQ_CLS"))
    model.add_adapter("other", hs.SubspaceConfig(dim=20, target_modules=["lin0"], task_type="SEQ_CLS"))
    assert isinstance(model.base_model.model.classifier, ModulesToSaveWrapper)
    assert set(model.base_model.model.classifier.modules_to_save) == {"default", "other"}


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_name_makes_no_difference(kind):
    output_base = _run(from_pretrained("MLP").eval())
    outputs, states = [], []
    names = ("default", "adapter", "other-name")
    for name in names:
        model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, projection=kind),
                               adapter_name=name)
        outputs.append(_run(_nonzero(model, name).eval()))
        states.append(model.state_dict())
    assert len(states[0]) == len(states[1]) == len(states[2])
    for key in states[0]:
        for name, state in zip(names[1:], states[1:]):
            assert torch.allclose(states[0][key], state[key.replace("default", name)])
    assert not any(torch.allclose(output_base, out) for out in outputs)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("order", ["first_has_modules_to_save", "second_has_modules_to_save"])
def test_multiple_adapters_mixed_modules_to_save(order):
    """peft's test_multiple_adapters_mixed_modules_to_save and ..._order_switched."""
    with_copy = dict(dim=20, target_modules=["lin0"], modules_to_save=["lin1"])
    without = dict(dim=20, target_modules=["lin0"])
    first, second = (with_copy, without) if order == "first_has_modules_to_save" else (without, with_copy)
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(**first)).eval()
    model.add_adapter("other", hs.SubspaceConfig(**second))
    has_copy = "default" if order == "first_has_modules_to_save" else "other"
    assert set(model.base_model.model.lin1.modules_to_save) == {has_copy}
    out_default = _run(_nonzero(model, "default"))
    model.set_adapter("other")
    _nonzero(model, "other", seed=1)
    with torch.no_grad():  # the copy trained: only the adapter that has it sees it
        model.base_model.model.lin1.modules_to_save[has_copy].weight[0].add_(1.0)  # one logit (LogSoftmax)
    out_other = _run(model)
    model.set_adapter("default")
    assert not torch.allclose(out_default, out_other)
    # back on "default": its outputs changed only if its own copy was the one changed
    assert torch.allclose(_run(model), out_default) == (has_copy == "other")


def test_multiple_adapters_no_needless_copy_modules_to_save():
    class TwoEnds(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.mid, self.lm_head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, X):
            return self.lm_head(self.mid(self.embed_tokens(X)))

    model = get_peft_model(TwoEnds(), hs.SubspaceConfig(dim=20, target_modules=["mid"],
                                                        modules_to_save=["embed_tokens"]))
    model.add_adapter("other", hs.SubspaceConfig(dim=20, target_modules=["mid"], modules_to_save=["lm_head"]))
    assert list(model.base_model.model.lm_head.modules_to_save.keys()) == ["other"]
    assert list(model.base_model.model.embed_tokens.modules_to_save.keys()) == ["default"]


@pytest.mark.parametrize("with_forward_call", [False, True])
def test_mha_gradients_set_correctly(with_forward_call):
    """peft's test: θ0 of a MultiheadAttention stays frozen (after a forward too) and a user's change sticks."""
    model = get_peft_model(ModelMha(), hs.SubspaceConfig(dim=20, target_modules=["mha"]))
    mha = model.base_model.model.mha
    if with_forward_call:
        _run(model).sum().backward()
    in_proj = mha.parametrizations.in_proj_weight.original
    assert in_proj.requires_grad is False and in_proj.grad is None
    assert find_engine(model).coeffs["default"].requires_grad
    in_proj.requires_grad = True
    _run(model)
    assert in_proj.requires_grad is True


def test_existing_model_card(tmp_path):
    """peft: an existing model card is not overwritten (ours joins it, and is replaced there on the next save)."""
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "meta: hello" in card and "This is a model card" in card
    assert "Subspace adapter" in card
    model.save_pretrained(tmp_path)
    again = (tmp_path / "README.md").read_text()
    assert again == card and again.count("# Subspace adapter") == 1


def test_non_existing_model_card(tmp_path):
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and len(card) > 1000


def test_weight_bias_attributes():
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    assert hasattr(model.base_model.model.lin0, "weight") and hasattr(model.base_model.model.lin0, "bias")


# ---------------------------------------------------------------------------------------------------------------
# skipped as specific to other methods (or to transformers models), each with its reason
# ---------------------------------------------------------------------------------------------------------------
SKIPPED = {
    "test_disable_adapter_with_bias_warns": "LoRA/BOFT's `bias` option (training base biases outside the adapter); "
                                            "a subspace adapter has none: biases are tensors of θ and disabling "
                                            "removes their δ too",
    "test_adding_multiple_adapters_with_bias_raises": "LoRA's `bias` option; SubspaceConfig has no such option",
    "test_merge_with_lora_bias_when_base_layer_has_no_bias_warns_and_raises": "LoRA's `lora_bias` option",
    "test_glora_safe_merge_does_not_corrupt_base_layer_on_non_finite_adapter": "GLoRA-specific (our safe merge is "
                                                                               "covered by test_merge_layers_nan)",
    "test_add_weighted_adapter": "add_weighted_adapter combines LoRA/IA3 factors; two subspace adapters have "
                                 "different P, so a weighted sum of their c is not defined (the tuner has no such "
                                 "method)",
    "test_set_adapter_non_overlapping_trainable_token_indices": "trainable_token_indices is LoRA's option (and peft's "
                                                                "TrainableTokens method)",
    "test_multiple_active_adapters_with_trainable_token_indices": "trainable_token_indices is LoRA's option",
    "test_delete_adapter_multiple_adapters_with_trainable_token_indices": "trainable_token_indices is LoRA's option",
    "test_set_requires_grad_trainable_tokens": "TrainableTokens-specific",
    "test_save_pretrained_targeting_lora_to_embedding_layer": "LoRA's save_embedding_layers",
    "test_load_resized_embedding_ignore_mismatched_sizes": "LoRA's save_embedding_layers",
    "target_parameters tests": "LoRA's target_parameters; a subspace adapter takes bare nn.Parameters as they are "
                               "(MlpUsingParameters runs every test above)",
    "DoRA / MonteCLoRA / PVeRA / GraLoRA / multirank / TestLayerRepr / lora_conversion": "method-specific (LoRA "
                                                                                       "variants and their reprs)",
    "generate / generate_pos_args / generate_half_prec / mixed batches with beam search": "need a transformers model "
                                                                                           "(peft skips them for "
                                                                                           "custom models too); "
                                                                                           "generate is covered in "
                                                                                           "test_peft_contract.py",
    "prepare_for_training / training_layer_indexing / training_gradient_checkpointing / passing_input_embeds_works":
        "need a transformers model (peft skips them for custom models too); covered on GPT-2/BERT in "
        "test_peft_contract.py and test_trainer.py",
}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped_as_specific_to_other_methods(name):
    pytest.skip(f"{name}: {SKIPPED[name]}")


# ---------------------------------------------------------------------------------------------------------------
# peft's TestRequiresGrad (LoRA there; the same checks with subspace adapters)
# ---------------------------------------------------------------------------------------------------------------
def _trainable(model, *adapters, modules_to_save=()):
    """The parameter names that should require grad: the c (and λ) of ``adapters`` and their copies of
    ``modules_to_save``."""
    engine = find_engine(model)
    vectors = {id(engine.coeffs[a]) for a in adapters} | {id(engine.scales[a]) for a in adapters if a in engine.scales}
    names = {n for n, p in model.named_parameters() if id(p) in vectors}
    for module_name in modules_to_save:
        for a in adapters:
            names |= {n for n, _ in model.named_parameters() if f"{module_name}.modules_to_save.{a}." in n}
    return names


def _check_trainable(model, expected):
    actual = {n for n, p in model.named_parameters() if p.requires_grad}
    assert actual == expected, f"expected {sorted(expected)} to require gradients, got {sorted(actual)}"


@pytest.mark.parametrize("mode", MODES)
def test_requires_grad_modules_to_save_default_and_disabling(mode):
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, mode=mode, target_modules=["lin0"],
                                                                     modules_to_save=["lin1"]))
    trained = _trainable(model, "default", modules_to_save=["lin1"])
    assert len(trained) == (4 if mode == "said" else 3)  # c (+ λ), the copy's weight and bias
    _check_trainable(model, trained)
    model.disable_adapter_layers()
    _check_trainable(model, set())
    model.enable_adapter_layers()
    _check_trainable(model, trained)
    with model.disable_adapter():
        _check_trainable(model, set())
    _check_trainable(model, trained)


def test_requires_grad_modules_to_save_multiple_adapters_and_inference_mode():
    config = dict(dim=20, target_modules=["lin0"], modules_to_save=["lin1"])
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(**config))
    model.add_adapter("adapter1", hs.SubspaceConfig(**config))
    _check_trainable(model, _trainable(model, "default", modules_to_save=["lin1"]))
    model.set_adapter("default")
    _check_trainable(model, _trainable(model, "default", modules_to_save=["lin1"]))
    model.set_adapter("adapter1")
    _check_trainable(model, _trainable(model, "adapter1", modules_to_save=["lin1"]))
    model.set_adapter("default", inference_mode=True)
    _check_trainable(model, set())
    model.set_adapter("adapter1", inference_mode=True)
    _check_trainable(model, set())


@pytest.mark.parametrize("targets", [(["lin0"], ["lin1"]), (["lin0"], ["lin0"])], ids=["different", "same"])
def test_requires_grad_different_and_same_targets(targets):
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=targets[0]))
    model.add_adapter("adapter1", hs.SubspaceConfig(dim=20, target_modules=targets[1]))
    _check_trainable(model, _trainable(model, "default"))
    model.set_adapter("default")
    _check_trainable(model, _trainable(model, "default"))
    model.set_adapter("adapter1")
    _check_trainable(model, _trainable(model, "adapter1"))
    with model.disable_adapter():
        _check_trainable(model, set())
    _check_trainable(model, _trainable(model, "adapter1"))


def test_requires_grad_per_layer_disabling_freezes_c_only_when_all_its_tensors_are_disabled():
    model = get_peft_model(from_pretrained("MLP"), hs.SubspaceConfig(dim=20, target_modules=["lin0"]))
    layers = _tuner_layers(model)
    assert len(layers) == 2  # lin0.weight, lin0.bias
    layers[0].enable_adapters(False)
    _check_trainable(model, _trainable(model, "default"))  # lin0.bias still uses c
    layers[1].enable_adapters(False)
    _check_trainable(model, set())
    layers[0].enable_adapters(True)
    _check_trainable(model, _trainable(model, "default"))


@pytest.mark.parametrize("modules_to_save", [None, ["layers.0.lin1"]], ids=["plain", "modules_to_save"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_model_requires_grad_set_correctly(is_trainable, modules_to_save, tmp_path):
    config = hs.SubspaceConfig(dim=20, target_modules=["layers.0.lin0"], modules_to_save=modules_to_save)
    torch.manual_seed(0)
    get_peft_model(DeepMLP(), config).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(DeepMLP(), tmp_path, is_trainable=is_trainable)

    def check(*adapters):
        if is_trainable:
            for name, param in model.named_parameters():
                assert param.requires_grad == any(f".{a}" in name for a in adapters), name
        else:
            assert all(not p.requires_grad for p in model.parameters())

    check("default")
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    # peft 0.21: load_adapter(is_trainable=True) makes the loaded (inactive) adapter trainable too (LoRA's the same)
    check("default", "other")
