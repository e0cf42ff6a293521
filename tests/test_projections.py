import subprocess
import sys

import pytest
import torch

from hf_subspace.projections import PROJECTION_KINDS, make_projection
from hf_subspace.projections import dense as dense_mod
from hf_subspace.projections.hadamard import _hadamard_cpu, fwht

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


def test_fastfood_block_memory_is_linear_in_D():
    p = make_projection("fastfood", 1_000_000, 1000, seed=0)
    assert p.B == 1024 and p.n_blocks == 977
    assert p.gauss.numel() < 1_001_000 + 1024


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
