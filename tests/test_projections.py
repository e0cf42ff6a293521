import subprocess
import sys

import pytest
import torch

from hf_subspace.projections import PROJECTION_KINDS, TrajectoryProjection, make_projection
from hf_subspace.projections import dense as dense_mod
from hf_subspace.projections import hadamard as hadamard_mod
from hf_subspace.projections.hadamard import _hadamard_cpu, factor_bits, fwht, hadamard_factors

KINDS = sorted(PROJECTION_KINDS)
SIZES = [(1000, 10), (5003, 64), (20000, 300)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", SIZES)
def test_adjoint_identity(kind, D, d):
    p = make_projection(kind, D, d, seed=3)
    g = torch.Generator().manual_seed(0)
    c, v = torch.randn(d, generator=g), torch.randn(D, generator=g)
    lhs = torch.dot(p.matvec(c).double(), v.double())
    rhs = torch.dot(c.double(), p.rmatvec(v).double())
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_explicit_matrix(kind):
    p = make_projection(kind, 3000, 40, seed=1)
    M = p.dense_matrix()
    c, v = torch.randn(40), torch.randn(3000)
    torch.testing.assert_close(p.matvec(c), M @ c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p.rmatvec(v), M.T @ v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,tol", [("hashing", 1e-5), ("sparse", 1e-5), ("dense", 1e-5), ("fastfood", 0.02)])
def test_column_norms_are_one_over_all_of_theta(kind, tol):
    p = make_projection(kind, 20000, 300, seed=0)
    norms = p.dense_matrix().norm(dim=0)
    assert (norms - 1).abs().max() <= tol


def test_hashing_columns_are_orthonormal():
    M = make_projection("hashing", 5000, 70, seed=0).dense_matrix()
    torch.testing.assert_close(M.T @ M, torch.eye(70), atol=1e-5, rtol=0)


def test_fastfood_block_state_is_O_d():
    p = make_projection("fastfood", 1_000_000, 1000, seed=0)
    assert p.B == 1024 and p.n_blocks == 977
    assert p.gauss.numel() == p.signs.numel() == 1024  # format 1 held two floats per row: 2M numbers here
    assert make_projection("fastfood", 124_000_000, 10_000).state_bytes() <= 1_000_000
    old = make_projection("fastfood", 1_000_000, 1000, seed=0, format=1)
    assert old.gauss.numel() == 977 * 1024


def test_dense_is_chunked_and_reproducible(monkeypatch):
    # D*d above one chunk: the product must still equal the explicit matrix built chunk by chunk
    D, d = 70_000, 80
    assert D * d > dense_mod.CHUNK_ELEMENTS
    p = make_projection("dense", D, d, seed=5)
    assert p.chunk_rows * d <= dense_mod.CHUNK_ELEMENTS
    chunks = list(p._chunks())
    assert len(chunks) >= 2
    c = torch.randn(d)
    torch.testing.assert_close(p.matvec(c), p.dense_matrix() @ c, rtol=1e-4, atol=1e-5)


_FINGERPRINT_CODE = (
    "import torch, hashlib, json;"
    "from hf_subspace.projections import PROJECTION_KINDS, make_projection;"
    "c = torch.linspace(-1, 1, 50);"
    "print(json.dumps({k: hashlib.sha256(make_projection(k, 4096, 50, seed=7).matvec(c).numpy().tobytes())"
    ".hexdigest() for k in sorted(PROJECTION_KINDS)}))"
)


def test_same_seed_same_P_across_processes():
    import hashlib
    import json

    runs = [json.loads(subprocess.run([sys.executable, "-c", _FINGERPRINT_CODE], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1]
    c = torch.linspace(-1, 1, 50)
    for kind in KINDS:
        here = make_projection(kind, 4096, 50, seed=7).matvec(c)
        assert runs[0][kind] == hashlib.sha256(here.numpy().tobytes()).hexdigest(), kind
        other = make_projection(kind, 4096, 50, seed=8).matvec(c)
        assert not torch.allclose(here, other), kind


@pytest.mark.parametrize("n", [1, 2, 16, 256, 2048])
def test_fwht_matches_hadamard_matrix_and_is_involution(n):
    x = torch.randn(3, n)
    H = _hadamard_cpu(n.bit_length() - 1)
    torch.testing.assert_close(fwht(x), x @ H.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwht(fwht(x)), x, atol=1e-5, rtol=1e-5)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(12))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_bad_dimension(bad):
    with pytest.raises(ValueError, match="d"):
        make_projection("hashing", 100, bad)


def test_bad_kind_and_sizes():
    with pytest.raises(ValueError, match="unknown projection kind 'gauss'"):
        make_projection("gauss", 100, 10)
    with pytest.raises(ValueError, match="larger than the number of weights"):
        make_projection("fastfood", 10, 100)
    p = make_projection("hashing", 100, 10)
    with pytest.raises(ValueError, match="shape"):
        p.matvec(torch.zeros(11))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_state_round_trip(kind):
    p = make_projection(kind, 3000, 30, seed=1)
    q = make_projection(kind, 3000, 30, seed=2)
    q.load_state_tensors({k: v.clone() for k, v in p.state_tensors().items()})
    c = torch.randn(30)
    torch.testing.assert_close(q.matvec(c), p.matvec(c))


# -- generated values are pinned ---------------------------------------------------------------------------------
# Computed with the code as it was before dense chunks were always drawn from a CPU generator (they then came from
# a generator on the device P was first built on, the CPU here): adapters built on a CPU so far must regenerate the
# same P.
def test_dense_entries_are_pinned():
    M = make_projection("dense", 50, 7, seed=3).dense_matrix()
    pinned = {(0, 0): 0.05723174661397934, (0, 6): -0.10393670201301575, (17, 3): 0.057274993509054184,
              (49, 6): -0.011884106323122978}
    for (i, j), value in pinned.items():
        assert M[i, j].item() == pytest.approx(value, rel=1e-6, abs=0), (i, j)


def test_dense_entries_past_the_first_chunk_are_pinned():
    D = (1 << 21) + 5  # d = 2: chunks of 2^21 rows, so rows from D - 5 on come from chunk 1 (its own seed)
    p = make_projection("dense", D, 2, seed=11)
    assert [k for k, _, _ in p._chunks()] == [0, 1]
    M = p.dense_matrix()
    pinned = {(0, 0): 7.788905350025743e-05, (1, 1): 0.0006501282332465053, (D - 6, 0): -0.0002131944493157789,
              (D - 5, 0): 0.00021863517758902162, (D - 1, 1): -0.00010511107393540442}
    for (i, j), value in pinned.items():
        assert M[i, j].item() == pytest.approx(value, rel=1e-6, abs=0), (i, j)
    torch.testing.assert_close(p.inv_norms(), torch.tensor([0.0006906880880706012, 0.0006908129435032606]),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,options,weighted,abs_sum", [
    ("dense", {}, 0.48173363407097575, 111.33865402165065),
    ("fastfood", {"format": 1}, 2.239321514585888, 109.56590184219567),  # format 1 as hf_subspace 0.1.0 built it
    ("fastfood", {"format": 1, "block": "global"}, -3.4811660486584994, 109.90644701723068),
    ("fastfood", {}, -1.8581136297084737, 118.2281247889623),
    ("fastfood", {"block": "global"}, -1.2240794662793202, 110.37738814942713),
    ("hashing", {"format": 1}, 1.073807391337732, 48.98870486021042),  # format 1 as hf_subspace 0.1.0 built it
    ("hashing", {}, -0.41472546455130516, 48.98870486021042),
    ("sparse", {}, 1.6995993563526728, 31.36380209028721),
])
def test_generated_P_is_pinned(kind, options, weighted, abs_sum):
    D, d = 300, 8
    M = make_projection(kind, D, d, seed=4, **options).dense_matrix().double()
    W = torch.arange(D * d, dtype=torch.float64).reshape(D, d).sin()
    assert (M * W).sum().item() == pytest.approx(weighted, rel=1e-6)
    assert M.abs().sum().item() == pytest.approx(abs_sum, rel=1e-6)


# -- the same P on every device ------------------------------------------------------------------------------------
ALL_KINDS = KINDS + ["trajectory"]
_DEV_D, _DEV_d = 2000, 24


def _build(kind, device):
    if kind == "trajectory":  # data, not random: a fixed orthonormal basis
        z = torch.randn(_DEV_D, _DEV_d, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        device="cpu")
        return TrajectoryProjection(torch.linalg.qr(z)[0].T.float(), device=device)
    return make_projection(kind, _DEV_D, _DEV_d, seed=2, device=device)


def _assert_same_state(p, q):
    ps, qs = p.state_tensors(), q.state_tensors()
    assert ps.keys() == qs.keys()
    for name in ps:
        assert torch.equal(ps[name].cpu(), qs[name].cpu()), name


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generation_ignores_the_default_device(kind):
    # all random state is made on the CPU explicitly, whatever device factory functions default to
    ref = _build(kind, "cpu")
    with torch.device("meta"):
        p = _build(kind, "cpu")
    _assert_same_state(p, ref)
    assert torch.equal(p.dense_matrix(), ref.dense_matrix())


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_built_then_moved_equals_built_in_place(kind):
    ref = _build(kind, "cpu").dense_matrix()
    moved = _build(kind, "cpu").to("meta").to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.dense_matrix(), ref)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_meta_device_builds_on_cpu(kind):
    # a model under init_empty_weights lives on the meta device; its projection is built (and kept) on the CPU
    p = _build(kind, "meta")
    assert p.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in p.state_tensors().values())
    assert p.to("meta") is p and p.device == torch.device("cpu")
    ref = _build(kind, "cpu")
    _assert_same_state(p, ref)
    c = torch.linspace(-1, 1, _DEV_d)
    torch.testing.assert_close(p.matvec(c), ref.matvec(c), rtol=0, atol=0)


def test_dense_rng_device_is_accepted_and_ignored():
    # older configs may carry rng_device; P is drawn on the CPU regardless, so "cuda" needs no GPU
    ref = make_projection("dense", 300, 8, seed=4).dense_matrix()
    for rng_device in ("cpu", "cuda"):
        p = make_projection("dense", 300, 8, seed=4, rng_device=rng_device)
        assert torch.equal(p.dense_matrix(), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_cuda_built_equals_cpu_built(kind):
    on_cpu, on_gpu = _build(kind, "cpu"), _build(kind, "cuda")
    assert all(t.device.type == "cuda" for t in on_gpu.state_tensors().values())
    _assert_same_state(on_gpu, on_cpu)  # the generated state is bit-identical
    ref = on_cpu.dense_matrix()
    torch.testing.assert_close(on_gpu.dense_matrix().cpu(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(on_gpu.to("cpu").dense_matrix(), ref)
    moved = _build(kind, "cpu").to("cuda")
    if kind == "fastfood":
        assert all(h.device.type == "cuda" for h in moved.hadamard)
    torch.testing.assert_close(moved.dense_matrix().cpu(), ref, rtol=1e-5, atol=1e-6)


# -- fwht gets its factors from the caller ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 256, 2048, 1 << 15])
def test_fwht_with_given_factors_matches_fwht_without(n):
    x = torch.randn(2, n)
    factors = hadamard_factors(n)
    assert [tuple(h.shape) for h in factors] == [(1 << b, 1 << b) for b in factor_bits(n.bit_length() - 1)]
    torch.testing.assert_close(fwht(x, factors), fwht(x), rtol=0, atol=0)


def test_fwht_rejects_factors_of_another_length():
    with pytest.raises(ValueError, match="Hadamard factors"):
        fwht(torch.randn(2, 256), hadamard_factors(128))


def test_fwht_keeps_no_module_state():
    # nothing global is filled on use (a cache filled while tracing broke torch.compile in a fresh process)
    def snapshot():
        return {k: (id(v), len(v) if isinstance(v, (dict, list, set)) else None)
                for k, v in vars(hadamard_mod).items()}

    before = snapshot()
    fwht(torch.randn(3, 4096))
    make_projection("fastfood", 5000, 300).matvec(torch.randn(300))
    assert snapshot() == before


@pytest.mark.parametrize("block,B", [("d", 512), ("global", 8192)])
def test_fastfood_holds_its_hadamard_factors(block, B):
    p = make_projection("fastfood", 5000, 300, seed=0, block=block)
    assert p.B == B
    bits = factor_bits(B.bit_length() - 1)
    assert [tuple(h.shape) for h in p.hadamard] == [(1 << b, 1 << b) for b in bits]
    assert all(h.device == p.device and h.dtype == torch.float32 for h in p.hadamard)
    assert "hadamard" not in p.state_tensors()  # deterministic, not saved with the adapter
    x = torch.randn(3, B)
    torch.testing.assert_close(fwht(x, p.hadamard), fwht(x), rtol=0, atol=0)
