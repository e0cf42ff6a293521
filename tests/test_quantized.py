"""θ over bitsandbytes 4-bit (NF4, FP4) and 8-bit linear layers (issue 23), on CPU with a tiny Llama.

The reference for every number is the same model dequantized explicitly (``model.dequantize()``: plain
``nn.Linear`` layers holding the dequantized weights) with the same adapter: the subspace over a quantized base must
compute exactly what it computes over those float weights.
"""
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

import hf_subspace as hs
from hf_subspace.engine import find_engine
from hf_subspace.errors import AdapterMismatchError

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
N_TENSORS, N_QUANTIZED = 21, 14  # a 2-layer Llama: 7 linear layers a block; embeddings, norms, untied head


def _save_llama(folder, seed=0, hidden=32):
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama"))


def _load(folder, quant=None, prepare=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quant is None:
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu",
                                                         quantization_config=BitsAndBytesConfig(**QUANT[quant]))
        if prepare:
            model = prepare_model_for_kbit_training(model)
    return model


def _dequantized(folder, quant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load(folder, quant).dequantize()


def _wrap(model, **kw):
    kw = {"dim": 200, "seed": 3, **kw}
    return get_peft_model(model, hs.SubspaceConfig(**kw))


def _perturb(model, scale=0.2):
    c = find_engine(model).coeffs["default"]
    with torch.no_grad():
        c.copy_(torch.randn(c.shape, generator=torch.Generator().manual_seed(5)) * scale)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _qlayer(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_every_weight_is_in_theta_after_prepare_model_for_kbit_training(folder, quant):
    model = _wrap(_load(folder, quant, prepare=True))
    layout = find_engine(model).adapters["default"].layout
    assert len(layout.slots) == N_TENSORS and sum(s.quantized for s in layout.slots) == N_QUANTIZED
    plain = _wrap(_load(folder))  # the same checkpoint unquantized: the same θ (names, shapes, D)
    assert layout.layout_hash() == find_engine(plain).adapters["default"].layout.layout_hash()
    assert layout.D == sum(p.numel() for p in _load(folder).parameters())
    # the other order (wrap first, as a base fresh from from_pretrained) gives the same θ
    assert find_engine(_wrap(_load(folder, quant))).adapters["default"].layout.layout_hash() == layout.layout_hash()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.subspace.vectors.default.coeffs"]
    assert find_engine(model).coeffs["default"].dtype == torch.float32


@pytest.mark.parametrize("quant,projection,mode", [("nf4", "hashing", "global"), ("fp4", "fastfood", "said"),
                                                   ("int8", "hashing", "global"), ("nf4", "dense", "said")])
def test_gradient_of_c_equals_the_gradient_through_the_dequantized_float_model(folder, quant, projection, mode):
    model = _wrap(_load(folder, quant, prepare=True), projection=projection, mode=mode)
    reference = _wrap(_dequantized(folder, quant), projection=projection, mode=mode)
    _perturb(model)
    _perturb(reference)
    model.train()
    reference.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    ref_loss = reference(input_ids=IDS, labels=IDS).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    engine, ref_engine = find_engine(model), find_engine(reference)
    g, ref_g = engine.coeffs["default"].grad, ref_engine.coeffs["default"].grad
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-6)
    if mode == "said":
        torch.testing.assert_close(engine.scales["default"].grad, ref_engine.scales["default"].grad, rtol=1e-4,
                                   atol=1e-6)
    # the quantized layers' own share of it: c moves the dequantized weights
    assert not torch.allclose(_logits(model), _logits(_wrap(_load(folder, quant), projection=projection, mode=mode)))


def test_no_tensor_of_a_quantized_layers_size_is_kept_from_forward_to_backward(folder):
    model = _wrap(_load(folder, "nf4", prepare=True))
    model.get_base_model().gradient_checkpointing_disable()
    _perturb(model)
    shapes = {tuple(s.shape) for s in find_engine(model).adapters["default"].layout.slots if s.quantized}
    shapes |= {t[::-1] for t in shapes}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=IDS, labels=IDS).loss
    assert saved and not shapes & set(saved), sorted(shapes & set(saved))
    loss.backward()
    assert find_engine(model).coeffs["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_a_short_training_run_lowers_the_loss(folder, quant):
    model = _wrap(_load(folder, quant, prepare=True), dim=500)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_save_and_load_onto_the_same_quantized_model_gives_the_same_logits(folder, tmp_path, quant):
    model = _wrap(_load(folder, quant, prepare=True))
    _perturb(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    config = hs.SubspaceConfig.from_pretrained(tmp_path)
    bits = 4 if quant != "int8" else 8
    assert [(g["bits"], len(g["slots"])) for g in config.base_quantization] == [(bits, N_QUANTIZED)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same base: no warning
        loaded = PeftModel.from_pretrained(_load(folder, quant), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    # and onto the base dequantized: exactly the trained values in float, no warning either
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        on_floats = PeftModel.from_pretrained(_dequantized(folder, quant), tmp_path)
    torch.testing.assert_close(_logits(on_floats), expected, rtol=1e-5, atol=1e-5)


def test_loading_onto_the_unquantized_checkpoint_warns_with_the_difference(folder, tmp_path):
    model = _wrap(_load(folder, "nf4"))
    _perturb(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"trained on a quantized base \(14 tensor\(s\) of θ quantized 4-bit NF4 "
                                         r"\(bitsandbytes\)\) and is being loaded onto the unquantized weights of the "
                                         r"same checkpoint.*relative RMS \d+\.\d+%"):
        loaded = PeftModel.from_pretrained(_load(folder), tmp_path)
    got = _logits(loaded)
    assert not torch.allclose(got, expected, atol=1e-4)  # the quantization error is there
    assert (got - expected).abs().max() < 0.5 * expected.abs().max()  # but it is the adapter of this checkpoint


def test_loading_onto_another_unquantized_checkpoint_is_refused(tmp_path_factory, folder, tmp_path):
    other = _save_llama(tmp_path_factory.mktemp("other"), seed=1)
    model = _wrap(_load(folder, "nf4"))
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match=r"trained on a quantized base.*this base is unquantized, and its "
                                                   r"weights quantized the same way do not give the base fingerprint"):
        PeftModel.from_pretrained(_load(other), tmp_path)


def test_loading_an_unquantized_adapter_onto_a_quantized_base_is_refused_with_the_opt_out(folder, tmp_path):
    model = _wrap(_load(folder))
    _perturb(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match=r"trained on a base that was unquantized, and this base is 14 "
                                                   r"tensor\(s\) of θ quantized 8-bit.*check_base_fingerprint=False"):
        PeftModel.from_pretrained(_load(folder, "int8"), tmp_path)
    loaded = PeftModel.from_pretrained(_load(folder, "int8"), tmp_path, check_base_fingerprint=False)
    assert (_logits(loaded) - _logits(model)).abs().max() < 0.1 * _logits(model).abs().max()


def test_merging_into_quantized_weights_is_refused_and_dequantize_then_merge_ships_the_trained_model(folder,
                                                                                                      tmp_path):
    model = _wrap(_load(folder, "nf4", prepare=True))
    _perturb(model)
    expected = _logits(model)
    q_proj = _qlayer(model)
    with pytest.raises(ValueError, match=r"cannot merge adapter 'default' into 14 quantized weight\(s\) \('model."
                                         r"layers.0.self_attn.q_proj.weight'.*base.dequantize\(\)"):
        model.merge_and_unload()
    assert not find_engine(model).merged_slots
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)  # nothing changed
    with pytest.raises(ValueError, match=r"cannot write the adapted weights of 14 quantized layer"):
        model.get_base_model().save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path)
    # the documented way to ship: dequantize the base, load the adapter, merge into floats
    merged = PeftModel.from_pretrained(_dequantized(folder, "nf4"), tmp_path).merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    # in bf16 too (within bf16's rounding)
    bf16 = PeftModel.from_pretrained(_dequantized(folder, "nf4").to(torch.bfloat16), tmp_path).merge_and_unload()
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(bf16).float(), expected, rtol=0.05, atol=0.05)
    assert type(q_proj).__name__ == "Linear4bit"


def test_disabled_and_unloaded_layers_run_bitsandbytes_own_forward(folder):
    base_out = _logits(_load(folder, "int8"))
    model = _wrap(_load(folder, "int8"))
    _perturb(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_out, rtol=0, atol=0)
    assert type(_qlayer(model).subspace_layer).__name__ == "SubspaceLayer"
    plain = model.unload()
    q = plain.model.layers[0].self_attn.q_proj
    assert "subspace_layer" not in q._modules and "forward" not in vars(q)
    torch.testing.assert_close(_logits(plain), base_out, rtol=0, atol=0)


def test_bnb_layers_built_directly_and_all_linear():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin0 = bnb.nn.Linear8bitLt(10, 20, has_fp16_weights=False, bias=True).to("cpu")
            self.lin1 = bnb.nn.Linear4bit(20, 20, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
            self.out = nn.Linear(20, 2)

        def forward(self, X):
            return self.out(self.lin1(self.lin0(X)))

    X = torch.randn(3, 10)
    model = get_peft_model(Model(), hs.SubspaceConfig(dim=20, target_modules="all-linear"))
    assert model.peft_config["default"].target_modules == ["lin0", "lin1", "out"]
    slots = find_engine(model).adapters["default"].layout.slots
    assert [(s.name, s.shape, s.quantized) for s in slots] == [
        ("lin0.weight", (20, 10), True), ("lin0.bias", (20,), False), ("lin1.weight", (20, 20), True),
        ("lin1.bias", (20,), False), ("out.weight", (2, 20), False), ("out.bias", (2,), False)]
    model(X).sum().backward()
    assert find_engine(model).coeffs["default"].grad.abs().sum() > 0
    named = get_peft_model(Model(), hs.SubspaceConfig(dim=20, target_modules=["lin1"]))
    assert [s.name for s in find_engine(named).adapters["default"].layout.slots] == ["lin1.weight", "lin1.bias"]


class _FakeAOTensor(torch.Tensor):
    """Stands for a torchao quantized tensor subclass (torchao is not installed here): only its module is read."""


_FakeAOTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"


class QuantLinear(nn.Module):
    """Stands for a GPTQ-style layer: an integer weight and float scales."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(4))


@pytest.mark.parametrize("kind", ["torchao", "integer"])
def test_an_unsupported_quantizer_is_refused_naming_itself(kind):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(8, 4))
    if kind == "torchao":
        model[1].weight = nn.Parameter(torch.randn(4, 8).as_subclass(_FakeAOTensor), requires_grad=False)
        match = r"θ would include 1 layer\(s\) with quantized weights of an unsupported kind \('1': Linear \(torchao"
    else:
        model[1] = QuantLinear()
        match = r"'1': QuantLinear \(weight of dtype int8\)\).*bitsandbytes Linear4bit"
    with pytest.raises(hs.SubspaceConfigError, match=match):
        get_peft_model(model, hs.SubspaceConfig(dim=4))
    with pytest.raises(hs.SubspaceConfigError, match=r"the target_modules entry '1' matches 1 layer\(s\) with "
                                                     r"quantized"):
        get_peft_model(model, hs.SubspaceConfig(dim=4, target_modules=["1"]))
    # left out by name, the rest trains
    assert len(find_engine(get_peft_model(model, hs.SubspaceConfig(dim=4, exclude_modules=["1"]))
                           ).adapters["default"].layout.slots) == 2


def test_subspace_trainer_trains_a_base_loaded_with_a_bitsandbytes_config(folder, tmp_path):
    base = _load(folder, "nf4")
    assert base.is_quantized  # transformers' Trainer refuses a quantized model unless it carries an adapter
    data = [{"input_ids": IDS[0], "labels": IDS[0]}] * 8
    args = hs.SubspaceTrainingArguments(output_dir=str(tmp_path), subspace_dim=100, max_steps=3, report_to="none",
                                        per_device_train_batch_size=2, learning_rate=0.05, save_strategy="no")
    trainer = hs.SubspaceTrainer(model=base, args=args, train_dataset=data)
    trainer.train()
    engine = find_engine(trainer.model)
    assert sum(s.quantized for s in engine.adapters["default"].layout.slots) == N_QUANTIZED
    assert engine.coeffs["default"].abs().sum() > 0


def test_deepcopy_is_an_independent_adapted_model(folder):
    import copy

    model = _wrap(_load(folder, "nf4"))
    _perturb(model)
    expected = _logits(model)
    clone = copy.deepcopy(model)  # TRL reference models, EMA copies
    torch.testing.assert_close(_logits(clone), expected, rtol=0, atol=0)
    q = _qlayer(clone)
    assert q.forward.__self__ is q and q.subspace_layer.engine is find_engine(clone)
    with torch.no_grad():
        find_engine(clone).coeffs["default"].zero_()
    assert not torch.allclose(_logits(clone), expected)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("evaluate_before_wrapping", [True, False])
def test_evaluation_does_not_cut_the_gradient_of_later_training(tmp_path, evaluate_before_wrapping):
    """bitsandbytes repacks a 4-bit weight in eval mode on AVX512-BF16 CPUs (this one included) for a kernel that
    autograd cannot differentiate; every gradient through o_proj was zero after one evaluation. (Hidden size 64:
    bitsandbytes' packing fails on 32-wide layers.)"""
    base = _load(_save_llama(tmp_path, hidden=64), "nf4")
    if evaluate_before_wrapping:
        _logits(base)
    model = _wrap(base, target_modules=["q_proj", "v_proj"])
    model.eval()
    _logits(model)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert find_engine(model).coeffs["default"].grad.abs().sum() > 0


def test_real_torchao_weights_are_refused_naming_torchao():
    """With torchao installed (0.18 checked; not in the dev extra): its int8 weight-only tensors are refused."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    quantize_(model, Int8WeightOnlyConfig())
    with pytest.raises(hs.SubspaceConfigError, match=r"'0': Linear \(torchao \w+ weight\), '1': Linear \(torchao"):
        get_peft_model(model, hs.SubspaceConfig(dim=4))


def test_bf16_compute_dtype_keeps_c_float32_and_the_gradient_within_bf16_rounding(folder):
    """QLoRA's usual setting: NF4 storage, bf16 compute. δ (float32) is cast to bf16 where it is added; c's gradient
    stays float32 and within bf16 rounding of the float32 dequantized model's (the same config dequantized: with a
    bf16 compute dtype transformers quantizes other values than with the default one)."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=config)

    model = _wrap(load())
    assert _qlayer(model).compute_dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _wrap(load().dequantize())
    for m in (model, reference):
        _perturb(m)
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    g, ref_g = find_engine(model).coeffs["default"].grad, find_engine(reference).coeffs["default"].grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    assert (g - ref_g).norm() < 2e-2 * ref_g.norm()
