"""Issue 11: the projection's state is O(d), and no second copy of θ lives from forward to backward."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import hf_subspace as hs
from hf_subspace.projections import HashingProjection, HashingProjectionV1, make_projection

from conftest import bert_batch, tiny_bert_cls

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_0_1_0"


# -- hashing format 2: O(d) state, the same promises as format 1 -----------------------------------------------------
@pytest.mark.parametrize("D,d", [(1000, 10), (5003, 64), (999, 998), (1000, 7), (12345, 1000), (4096, 4096)])
def test_format2_columns_orthonormal_and_balanced(D, d):
    p = make_projection("hashing", D, d, seed=3)
    assert isinstance(p, HashingProjection) and p.format == 2
    M = p.dense_matrix().double()
    assert ((M != 0).sum(1) == 1).all()  # one nonzero per row
    counts = (M != 0).sum(0)
    assert counts.min() >= D // d and counts.max() <= -(-D // d)  # ⌊D/d⌋ or ⌈D/d⌉ rows per column
    torch.testing.assert_close(M.T @ M, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("D,d", [(1000, 10), (5003, 64), (999, 998)])
def test_format2_slices_and_entries_are_the_whole_products_cut(D, d):
    p = make_projection("hashing", D, d, seed=5)
    M = p.dense_matrix()
    g = torch.Generator().manual_seed(0)
    c, v = torch.randn(d, generator=g), torch.randn(D, generator=g)
    for a, b in [(0, D), (3, D - 1), (d - 1, min(D, d + 1)), (5, 6), (D - 1, D), (0, min(D, 3 * d + 2))]:
        torch.testing.assert_close(p.matvec_rows(c, a, b), (M @ c)[a:b])
        torch.testing.assert_close(p.rmatvec_rows(v[a:b], a, b), M[a:b].T @ v[a:b], atol=1e-5, rtol=1e-5)
    pos = torch.randperm(D, generator=g)[:40].view(4, 10)
    torch.testing.assert_close(p.matvec_at(c, pos), (M @ c)[pos])
    w = torch.randn(4, 10, generator=g)
    torch.testing.assert_close(p.rmatvec_at(w, pos), M[pos.reshape(-1)].T @ w.reshape(-1), atol=1e-5, rtol=1e-5)


def test_format2_state_is_O_d_at_gpt2_size():
    """D = 124M, d = 10k: the persistent state is under 1 MB (format 1 holds one int32 per row: 0.5 GB)."""
    p = make_projection("hashing", 124_000_000, 10_000, seed=0)
    held = [t for t in vars(p).values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in held) == p.state_bytes() <= 1_000_000
    # and a slice of it is computed from (seed, position) alone: the same values whatever slice asks
    c = torch.randn(10_000)
    whole = p.matvec_rows(c, 60_000_000, 60_100_000)
    torch.testing.assert_close(p.matvec_rows(c, 60_050_000, 60_060_000), whole[50_000:60_000], rtol=0, atol=0)
    # a step over GPT-2-like tensors keeps each tensor's block offsets: still under 1 MB in all
    bounds = torch.linspace(0, 124_000_000, 150).long().tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        p._block_range(a // p.d, (b - 1) // p.d)
    assert p.state_bytes() <= 1_000_000


def test_format1_is_kept_bit_exactly():
    old = make_projection("hashing", 3000, 30, seed=1, format=1)
    assert isinstance(old, HashingProjectionV1) and old.index.numel() == 3000
    with pytest.raises(ValueError, match="format 7 is unknown.*upgrade hf_subspace"):
        make_projection("hashing", 3000, 30, seed=1, format=7)


def test_new_adapters_record_format2(tmp_path):
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=40, modules_to_save=["classifier"]))
    assert model.peft_config["default"].projection_format == 2
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["projection_format"] == 2
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    assert isinstance(hs.find_engine(loaded).adapters["default"].projection, HashingProjection)


@pytest.mark.parametrize("name", ["hashing_global", "hashing_said", "fastfood_said"])
def test_adapters_saved_by_0_1_0_load_bit_exactly(name, tmp_path):
    """Saved by hf_subspace 0.1.0 (no projection_format in the config): rebuilt in format 1.

    What is promised bit for bit is the adapter itself: P's generated state (random draws from the CPU generator,
    the same on every x86-64 machine) and c. The logits are a product of those with θ0 through the CPU's own
    matmul kernels, whose summation order differs between CPUs (AVX2 / AVX-512): they are compared within float
    tolerance (observed: up to 2.8e-9 apart between two Xeons)."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    assert "projection_format" not in json.loads((folder / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(tiny_bert_cls(), folder)
    assert model.peft_config["default"].projection_format == 1
    engine = hs.find_engine(model)
    assert engine.adapters["default"].projection.format == 1
    expected = json.loads((folder / "expected_projection.json").read_text())
    state = engine.adapters["default"].projection.state_tensors()
    assert sorted(state) == sorted(expected)
    for key, tensor in state.items():
        raw = tensor.detach().cpu().contiguous().numpy().tobytes()
        assert [str(tensor.dtype), list(tensor.shape), hashlib.sha256(raw).hexdigest()] == \
            [expected[key]["dtype"], expected[key]["shape"], expected[key]["sha256"]], f"P's {key} differs"
    saved, loaded = load_file(folder / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(loaded)
    for key, value in saved.items():  # c (and λ, the head) exactly as saved
        assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        logits = model(input_ids=bert_batch()["input_ids"]).logits
    torch.testing.assert_close(logits, torch.load(folder / "expected_logits.pt"), rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "again")  # saved again: still says format 1
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["projection_format"] == 1


# -- no second copy of θ between forward and backward ---------------------------------------------------------------
def _saved_during_forward(model, batch):
    """Shapes of every tensor autograd saves in one training forward (an outer hook, as a user's own would be),
    leaving out views of the flat ``P c`` that kinds without row slices keep for the step anyway (SAID's λ
    gradient reads it): that is the step's one cached delta, not a copy of the weights."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    flat = hs.find_engine(model).adapters["default"].cached_delta
    cached = None if flat is None else flat.untyped_storage().data_ptr()
    return loss, [shape for shape, ptr in saved if ptr != cached]


def _weight_shapes(model):
    engine = hs.find_engine(model)
    return {tuple(engine.original(s.name).shape) for s in engine.adapters["default"].layout.slots
            if engine.original(s.name).dim() == 2}


@pytest.mark.parametrize("kind,mode,dtype", [("hashing", "global", torch.float32), ("fastfood", "global", torch.float32),
                                             ("dense", "global", torch.float32), ("hashing", "said", torch.float32),
                                             ("hashing", "global", torch.bfloat16), ("fastfood", "said", torch.bfloat16)])
def test_no_adapted_weight_is_saved_for_backward(kind, mode, dtype):
    """A global subspace over all of θ: autograd keeps no materialized weight (they are recomputed in the backward),
    and c's gradient is bit for bit the one of keeping them (SAID and bf16 weights too)."""
    grads, saved = {}, {}
    for recompute in (False, True):
        model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=60, projection=kind, mode=mode)).to(dtype)
        model.train()
        engine = hs.find_engine(model)
        engine.recompute_saved_weights = recompute
        with torch.no_grad():
            engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        weights = _weight_shapes(model)
        loss, shapes = _saved_during_forward(model, bert_batch())
        saved[recompute] = [s for s in shapes if s in weights or s[::-1] in weights]
        loss.backward()
        grads[recompute] = engine.coeffs["default"].grad.clone()
    assert saved[False], "the check must see the weights when they are kept"
    assert saved[True] == []
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


def test_recompute_keeps_the_user_saved_tensor_hooks():
    """save_on_cpu (or any hooks a user enters around the forward) still packs every other tensor."""
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=60)).train()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or ("mine", t), lambda p: p[1]):
        loss = model(**bert_batch()).loss
    assert len(packed) > 10
    loss.backward()
    assert hs.find_engine(model).coeffs["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", ["none", "reentrant", "non-reentrant"])
def test_gradient_checkpointing_and_accumulation_give_the_same_c_gradient(checkpointing):
    def grad(accumulate, ckpt):
        model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=60, modules_to_save=["classifier"])).train()
        for m in model.modules():  # training mode (checkpointing needs it) without dropout's randomness
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if ckpt != "none":
            model.gradient_checkpointing_enable({"use_reentrant": ckpt == "reentrant"})
            model.enable_input_require_grads()
        engine = hs.find_engine(model)
        with torch.no_grad():
            engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        batch = bert_batch(n=4)
        if accumulate:
            for half in (slice(0, 2), slice(2, 4)):
                (model(**{k: v[half] for k, v in batch.items()}).loss / 2).backward()
        else:
            model(**batch).loss.backward()
        return engine.coeffs["default"].grad.clone()

    reference = grad(False, "none")
    torch.testing.assert_close(grad(False, checkpointing), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad(True, checkpointing), reference, rtol=1e-5, atol=1e-7)


# -- a huge linear layer (a tied LM head) a block of rows at a time --------------------------------------------------
@pytest.mark.parametrize("mode", ["global", "said"])
def test_huge_tied_lm_head_runs_in_row_blocks_with_the_same_values_and_gradients(monkeypatch, mode):
    from hf_subspace import blocked

    from conftest import gpt2_batch, tiny_gpt2

    monkeypatch.setattr(blocked, "MIN_ELEMENTS", 97 * 32)  # tiny GPT-2's tied 97 x 32 head counts as huge
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 10 * 32)  # 10 rows per block: 10 blocks, the last partial
    calls = []
    monkeypatch.setattr(blocked, "_block_weight", lambda *a, f=blocked._block_weight: calls.append(a[-2:]) or f(*a))
    results = {}
    for on in (False, True):
        model = get_peft_model(tiny_gpt2(), hs.SubspaceConfig(dim=50, mode=mode)).train()
        engine = hs.find_engine(model)
        engine.blocked_linears = on
        with torch.no_grad():
            engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        calls.clear()
        loss = model(**gpt2_batch()).loss
        loss.backward()
        results[on] = (loss.detach(), [p.grad.clone() for p in engine.parameters()])
        if on:
            assert (0, 10) in calls and (90, 97) in calls  # forward and backward went block by block
            assert isinstance(model.base_model.model.lm_head.forward.__func__, type(blocked.blocked_linear_forward))
        else:
            assert calls == []
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_interrupted_forward_leaves_no_hooks_and_no_stale_c():
    """KeyboardInterrupt skips torch's always_call forward hooks: the next forward must still start clean."""
    def fresh():
        model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=20)).train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model, hs.find_engine(model)

    model, engine = fresh()
    layer = model.base_model.model.bert.encoder.layer[1]

    def interrupt(*args):
        raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(**bert_batch())
    handle.remove()
    with torch.no_grad():
        engine.coeffs["default"].add_(0.5 * torch.randn(20, generator=torch.Generator().manual_seed(0)))
    model(**bert_batch()).loss.backward()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    reference, ref_engine = fresh()
    with torch.no_grad():
        ref_engine.coeffs["default"].copy_(engine.coeffs["default"])
    reference(**bert_batch()).loss.backward()
    torch.testing.assert_close(engine.coeffs["default"].grad, ref_engine.coeffs["default"].grad, rtol=0, atol=0)


def test_a_graph_building_backward_uses_the_c_of_its_forward():
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=20)).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    c = hs.find_engine(model).coeffs["default"]
    loss = model(**bert_batch()).loss
    (g1,) = torch.autograd.grad(loss, c, retain_graph=True)
    with torch.no_grad():
        c.add_(torch.randn(20, generator=torch.Generator().manual_seed(1)))
    (g2,) = torch.autograd.grad(loss, c, create_graph=True)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_projections_ignore_the_default_dtype():
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        for kind in ("hashing", "fastfood", "sparse", "dense"):
            p = make_projection(kind, 10_003, 257, seed=2)
            assert p.matvec(torch.ones(257)).dtype == torch.float32
            assert p.rmatvec(torch.ones(10_003)).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("d", [256, 1024, 255])
def test_hashing_block_signs_do_not_follow_their_offsets(d):
    """u_b comes from a stream of its own: with 2^k dividing d it once was a bit of r_b (a periodic θ then met
    the same sign in every block of a column). A d-periodic vector keeps its norm on average (≈1, not ≫1)."""
    n = 512
    p = make_projection("hashing", n * d, d, seed=0)
    r, neg = p.shifts_signs(torch.arange(n))
    agree = ((r >> 7) & 1 == 1) == neg
    assert 0.35 < agree.float().mean() < 0.65
    ratios = []
    for s in range(5):
        f = torch.randn(d, generator=torch.Generator().manual_seed(s))
        x = f.repeat(n)
        ratios.append(float(n * p.rmatvec(x).pow(2).sum() / x.pow(2).sum()))
    assert 0.3 < sorted(ratios)[2] < 3.0


def test_any_seed_fits_the_block_hash():
    p = make_projection("hashing", 100, 7, seed=2**62)
    assert p.matvec(torch.ones(7)).shape == (100,)
