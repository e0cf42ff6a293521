"""The engine at GPU scale, counted on the CPU (issue 21; issue 20 items 13–14).

* A training step (forward + backward) of a tiny Llama with tied embeddings, every tensor in θ (embeddings and the
  tied head included, the head forced onto the blocked path), reads nothing back from the device and runs no
  data-dependent-shape op, for hashing and fastfood, global and SAID; its loss is bit-for-bit today's and its
  gradients today's up to float rounding (hashing's Pᵀg and the embedding rows now sum in another order: rtol
  1e-5; fastfood is bit-for-bit). "Today" is a reference written by tests/fixtures/make_engine_step_reference.py
  on main at d1913b5.
* Under ``torch.autocast(bfloat16)`` no adapted weight of any dtype is saved for the backward, δ is float32 for
  every kind, the backward's recompute equals the forward's weight bit for bit (gradients equal those of keeping
  the weights), and the blocked head runs.
* The inference cache sees θ0 changed through ``.data``; the backward refuses a θ0 changed since the forward.
"""
import os

import pytest
import torch

import hf_subspace as hs
from hf_subspace import blocked
from hf_subspace.opcount import OpCounter

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "engine_step_reference_main_d1913b5.pt")
CONFIGS = [("hashing", "global"), ("hashing", "said"), ("fastfood", "global"), ("fastfood", "said")]


@pytest.fixture
def small_blocks(monkeypatch):
    """The tied 128 x 32 head takes the blocked path (in blocks of 16 rows), as a 50k-row head does."""
    monkeypatch.setattr(blocked, "MIN_ELEMENTS", 1 << 10)
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1 << 9)


def tiny_llama(kind, mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    engine = hs.reparameterize(model, 300 if mode == "said" else 200, kind, mode=mode)
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        if mode == "said":
            engine.scales["default"].uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    return model.train(), engine


def batch():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = ids[1, :3]  # repeated tokens (and the padding id 0 may occur)
    return ids


def _grads(engine):
    lam = engine.scales["default"].grad if "default" in engine.scales else None
    return engine.coeffs["default"].grad.clone(), None if lam is None else lam.clone()


@pytest.mark.parametrize("kind,mode", CONFIGS)
def test_a_training_step_reads_nothing_back_and_matches_today(kind, mode, small_blocks):
    model, engine = tiny_llama(kind, mode)
    ids = batch()
    calls = []
    original_apply = blocked.BlockedLinear.apply
    blocked.BlockedLinear.apply = lambda *a: calls.append(1) or original_apply(*a)
    try:
        with OpCounter() as n:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    finally:
        blocked.BlockedLinear.apply = original_apply
    assert calls  # the tied head took the blocked path
    assert n.host_reads == 0, n.by_name
    assert n.data_dependent == 0, n.by_name
    ref = torch.load(REFERENCE)[f"{kind}-{mode}"]
    assert torch.equal(loss.detach(), ref["loss"])
    c_grad, lam_grad = _grads(engine)
    assert c_grad.abs().max() > 0
    torch.testing.assert_close(c_grad, ref["c_grad"], rtol=1e-5, atol=1e-8)
    if mode == "said":
        torch.testing.assert_close(lam_grad, ref["lam_grad"], rtol=1e-5, atol=1e-8)


def test_an_eval_forward_with_the_cache_reads_nothing_back():
    model, engine = tiny_llama("hashing", "global")
    model.eval()
    with torch.no_grad():
        first = model(input_ids=batch()).logits
        with OpCounter() as n:
            second = model(input_ids=batch()).logits
    assert engine.scratch.cache
    assert n.host_reads == 0 and n.data_dependent == 0, n.by_name
    assert torch.equal(first, second)


WEIGHT_SHAPES = {(128, 32), (32, 32), (16, 32), (64, 32), (32, 64)}  # no activation of this batch has these shapes


@pytest.mark.parametrize("kind", ["hashing", "fastfood", "dense"])
def test_autocast_saves_no_adapted_weight_and_recomputes_it_exactly(kind, small_blocks):
    model, engine = tiny_llama(kind, "global")
    shapes = {tuple(s.shape) for s in engine.adapters["default"].layout.slots if len(s.shape) == 2}
    assert shapes <= WEIGHT_SHAPES
    ids = batch()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    weights = [(s, dt) for s, dt in saved if s in shapes or s[::-1] in shapes]
    assert not weights, weights  # every adapted weight (and autocast's bf16 copy of it) is recomputed instead
    loss.backward()
    recomputed = _grads(engine)[0]
    # the same step keeping the weights from the forward: the recompute must give the very same gradient
    kept, kept_engine = tiny_llama(kind, "global")
    kept_engine.recompute_saved_weights = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept_loss = kept(input_ids=ids, labels=ids).loss
    kept_loss.backward()
    assert torch.equal(loss, kept_loss)
    assert torch.equal(recomputed, _grads(kept_engine)[0])


@pytest.mark.parametrize("kind", ["hashing", "fastfood", "sparse", "dense"])
def test_delta_is_float32_under_autocast(kind):
    model, engine = tiny_llama(kind, "global")
    proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        plain = proj.weight.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = proj.weight  # with autograd: computed on the fly (row kinds) or from the cached flat P c
        with torch.no_grad():
            w_nograd = proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w.detach(), plain)
    assert torch.equal(w_nograd, plain)


def test_blocked_head_under_autocast_matches_the_plain_path(small_blocks):
    ids = batch()
    out = {}
    for on in (True, False):
        model, engine = tiny_llama("hashing", "global")
        engine.blocked_linears = on
        calls = []
        original_apply = blocked.BlockedLinear.apply
        blocked.BlockedLinear.apply = lambda *a: calls.append(1) or original_apply(*a)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits
            loss = logits.float().logsumexp(-1).mean()
            loss.backward()
        finally:
            blocked.BlockedLinear.apply = original_apply
        assert bool(calls) == on
        out[on] = (logits, _grads(engine)[0])
    assert out[True][0].dtype == out[False][0].dtype == torch.bfloat16
    assert torch.equal(out[True][0], out[False][0])  # each block's bf16 product is the plain product's rows
    # ∂L/∂x sums bf16 products over blocks in float32 (the plain path: one bf16 product): bf16 tolerance
    torch.testing.assert_close(out[True][1], out[False][1], rtol=2e-2, atol=1e-4)


# -- issue 20, items 13 and 14 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hashing", "dense"])
def test_inference_cache_sees_theta0_changed_in_place_through_data(kind):
    model, engine = tiny_llama(kind, "global")
    model.eval()
    ids = batch()
    with torch.no_grad():
        model(input_ids=ids)  # fills the cache
        assert engine.scratch.cache
        model.model.layers[0].mlp.down_proj.parametrizations.weight.original.data.mul_(5)  # no version bump
        cached = model(input_ids=ids).logits
        engine.inference_cache = False
        fresh = model(input_ids=ids).logits
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("how", ["in_place", "through_data"])
def test_backward_refuses_theta0_changed_since_the_forward(how):
    model, engine = tiny_llama("hashing", "global")
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    original = model.model.layers[0].self_attn.o_proj.parametrizations.weight.original
    with torch.no_grad():
        if how == "in_place":
            original.mul_(5)
        else:
            original.data.mul_(5)
    with pytest.raises(RuntimeError, match="modified between the forward and the backward"):
        loss.backward()


def test_nonfinite_guard_reads_no_loss_back_per_micro_batch():
    from hf_subspace.nonfinite import NonFiniteGuard

    class _Trainer:
        accelerator = None
        model = None

    guard = NonFiniteGuard(_Trainer())
    with OpCounter() as n:
        for value in (1.0, float("nan"), 2.0):
            guard.observe_loss(torch.tensor(value))
    assert n.host_reads == 0, n.by_name
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)

    class _Args:
        output_dir = None

    class _State:
        global_step = 0

    guard.on_pre_optimizer_step(_Args(), _State(), None, model=torch.nn.ParameterList([p]))
    assert p.grad is None and guard.skipped == 1  # the NaN micro-batch still skips the step


def test_gpu_check_script_runs_on_the_cpu():
    """benchmarks/gpu_check.py is meant for a CUDA machine; its --cpu smoke path runs the same three methods at a
    tiny size and counts the step's host reads instead of the sync debug mode."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["--cpu", "--warmup", "1", "--steps", "1"]) == 0


@pytest.mark.parametrize("window_adds", [True, False])
@pytest.mark.parametrize("start,stop", [(0, 1000), (37, 963), (250, 251), (0, 2 ** 12 + 5)])
def test_hashing_adjoint_of_a_slice_both_ways(monkeypatch, window_adds, start, stop):
    """Pᵀg of a slice adds each block's row into 4d bins through an overlapping windows view (one index_add_); where
    that is not trusted (a self-check per device, CUDA's deterministic mode) it rolls each row onto the columns
    instead. Both are the adjoint of P c over the slice (with chunks: CHUNK_ROWS forced small)."""
    from hf_subspace.projections import hashing

    monkeypatch.setattr(hashing, "CHUNK_ROWS", 200)
    monkeypatch.setattr(hashing, "_window_adds_ok", lambda device: window_adds)
    D, d = 5000, 50
    p = hashing.HashingProjection(D, d, seed=3)
    M = p.dense_matrix()
    g = torch.randn(stop - start, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    torch.testing.assert_close(p.rmatvec_rows(g, start, stop), M[start:stop].T @ g, rtol=1e-5, atol=1e-5)
    with OpCounter() as n:
        p.rmatvec_rows(g, start, stop)
    assert n.host_reads == 0 and n.data_dependent == 0


def test_window_adds_self_check_passes_on_the_cpu():
    from hf_subspace.projections.hashing import _window_adds_ok

    assert _window_adds_ok(torch.device("cpu"))  # else the CPU would silently take the slower roll
