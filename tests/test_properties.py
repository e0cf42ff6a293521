"""Property-based tests (hypothesis) of every projection kind and format, over drawn ``D``, ``d`` and seeds.

Sizes stay small (``D <= 5000``) but are drawn to include the awkward cases: ``D`` not a power of two, ``d`` at or
next to a power of two (fastfood's block size is ``2^ceil(log2 d)``), ``d = D``, ``D - 1``, ..., ``d = 1``.
Only what a kind's docstring promises is asserted; every tolerance says where it comes from. Runs are
reproducible (``derandomize=True``, no example database), so CI sees the same examples every time.
"""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_subspace.projections import (
    PROJECTION_FORMATS,
    PROJECTION_KINDS,
    STORED_KINDS,
    TrajectoryProjection,
    make_projection,
)
from hf_subspace.projections import dense as dense_mod

U = 2.0 ** -24  # unit roundoff of float32: every product is computed in float32


def props(max_examples: int):
    """Reproducible settings: the same examples on every run, no deadline (CI machines are slow and shared)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- what is built -----------------------------------------------------------------------------------------------
# name -> (kind, make_projection options, largest D, largest D*d): the caps keep one example at a few milliseconds
# (dense regenerates D*d Gaussians per product; trajectory builds its basis by a QR; sparse holds d*sqrt(D) entries)
VARIANTS = {
    "hashing-f2": ("hashing", {"format": 2}, 5000, 25_000_000),
    "hashing-f1": ("hashing", {"format": 1}, 5000, 25_000_000),
    "fastfood-f2": ("fastfood", {"format": 2}, 5000, 25_000_000),
    "fastfood-f1": ("fastfood", {"format": 1}, 5000, 25_000_000),
    "fastfood-f2-global": ("fastfood", {"format": 2, "block": "global"}, 5000, 25_000_000),
    "fastfood-f1-global": ("fastfood", {"format": 1, "block": "global"}, 5000, 25_000_000),
    "sparse": ("sparse", {}, 5000, 1_000_000),
    "sparse-density": ("sparse", {"density": 0.3}, 2000, 200_000),
    "dense": ("dense", {}, 5000, 1_000_000),
    "dense-chunked": ("dense", {"_chunk": 997}, 2000, 40_000),  # many row chunks, each from its own seed
    "trajectory": ("trajectory", {"dtype": torch.float32}, 2000, 100_000),
    "trajectory-f64": ("trajectory", {"dtype": torch.float64}, 2000, 100_000),
}
NAMES = sorted(VARIANTS)
#: kinds whose docstrings promise exactly orthonormal columns (PᵀP = I)
ORTHONORMAL = {"hashing-f2", "hashing-f1", "trajectory", "trajectory-f64"}


def build(name: str, D: int, d: int, seed: int):
    kind, options, _, _ = VARIANTS[name]
    options = dict(options)
    if kind == "trajectory":  # stored data, not a seed: a random orthonormal basis (k, D), k = d
        z = torch.randn(D, d, generator=torch.Generator().manual_seed(seed % 2**63), dtype=torch.float64)
        return TrajectoryProjection(torch.linalg.qr(z)[0].T.to(options["dtype"]))
    chunk = options.pop("_chunk", None)
    patch = mock.patch.object(dense_mod, "CHUNK_ELEMENTS", chunk) if chunk else contextlib.nullcontext()
    with patch:  # CHUNK_ELEMENTS is read once, when the projection is built
        p = make_projection(kind, D, d, seed=seed, **options)
    if chunk:
        assert len(list(p._chunks())) == -(-D // max(1, chunk // d))
    return p


# -- what is drawn -----------------------------------------------------------------------------------------------
_AWKWARD = [1, 2, 3, 5, 7, 31, 63, 64, 65, 127, 128, 129, 500, 511, 512, 513, 1000, 1023, 1024, 1025, 2047, 2048,
            2049, 4093, 4095, 4096, 4097, 4999, 5000]


def _dims(hi: int):
    """An integer in ``[1, hi]``, often one next to a power of two or a prime."""
    return st.one_of(st.integers(1, hi), st.sampled_from([n for n in _AWKWARD if n <= hi] or [1]))


@st.composite
def shapes(draw, name: str):
    """``(D, d)`` with ``1 <= d <= D``, within the variant's caps; ``d`` near ``D``, small, anything, or near 2^k."""
    _, _, D_max, area_max = VARIANTS[name]
    mode = draw(st.sampled_from(["near", "small", "any", "pow2"]))
    if mode == "near":  # d = D, D - 1, D - 2, D - 3
        D = draw(_dims(min(D_max, math.isqrt(area_max))))
        return D, max(1, D - draw(st.integers(0, 3)))
    if mode == "pow2":  # d at or next to a power of two, D anything from d up
        top = min(D_max, math.isqrt(area_max))
        d = min(top, max(1, 2 ** draw(st.integers(0, top.bit_length() - 1)) + draw(st.integers(-1, 1))))
        return draw(st.integers(d, max(d, min(D_max, area_max // d)))), d
    D = draw(_dims(D_max))
    d_max = max(1, min(D, area_max // D, 32 if mode == "small" else D))
    return D, draw(st.integers(1, d_max))


SEEDS = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**62])  # 2^31 - 1: block_hash's modulus
COEFS = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32) | st.sampled_from([0.0, 1.0, -1.0])


def vectors(key: int, *sizes: int) -> list[torch.Tensor]:
    """Gaussian float32 vectors from a drawn key (drawing thousands of floats through hypothesis is slow)."""
    g = torch.Generator().manual_seed(key)
    return [torch.randn(n, generator=g) for n in sizes]


def norm(x: torch.Tensor) -> float:
    return float(x.double().norm())


def assert_small(diff: torch.Tensor, bound: float, what: str):
    err = norm(diff)
    assert err <= bound, f"{what}: |error| = {err:.3e} > {bound:.3e}"


# Every product is float32. Rounding per entry is at most (number of summands)·u relative to the sum of the
# magnitudes, and in practice ~sqrt(summands)·u: at these sizes (<= 5000 summands per entry for dense; two
# Walsh–Hadamard transforms with factors of <= 128 terms for fastfood) a sweep of the largest shapes measured
# errors <= 8e-7 relative to the inputs' norms (dense at d = 5000; hashing ~5e-8), with ‖P‖₂ a small constant for
# every kind. RTOL = 2e-5 (~340 u) is 25x that, and still catches any real error (a wrong sign, index or scale
# moves a result by O(1) of its norm).
RTOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Products here take milliseconds: on a shared or small machine, intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- linearity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@props(12)
@given(data=st.data(), seed=SEEDS, key=st.integers(0, 2**32), a=COEFS, b=COEFS)
def test_matvec_and_rmatvec_are_linear(name, data, seed, key, a, b):
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    x, y, g, h = vectors(key, d, d, D, D)
    inputs = [t.clone() for t in (x, y, g, h)]
    lhs = p.matvec(a * x + b * y).double()
    rhs = a * p.matvec(x).double() + b * p.matvec(y).double()
    assert_small(lhs - rhs, RTOL * (abs(a) * norm(x) + abs(b) * norm(y)) + 1e-30, "P(ax+by) - aPx - bPy")
    lhs = p.rmatvec(a * g + b * h).double()
    rhs = a * p.rmatvec(g).double() + b * p.rmatvec(h).double()
    assert_small(lhs - rhs, RTOL * (abs(a) * norm(g) + abs(b) * norm(h)) + 1e-30, "Pᵀ(ag+bh) - aPᵀg - bPᵀh")
    assert all(torch.equal(t, t0) for t, t0 in zip((x, y, g, h), inputs))  # the inputs are left as they were


# -- adjoint -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@props(12)
@given(data=st.data(), seed=SEEDS, key=st.integers(0, 2**32))
def test_rmatvec_is_the_adjoint(name, data, seed, key):
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    c, noise = vectors(key, d, D)
    pc = p.matvec(c)
    # a random g finds a wrong index or sign; for it <P c, g> is only ~‖c‖‖g‖/√D, so a P and a Pᵀ that differ by a
    # scale would pass: g half along P c makes <P c, g> ~ ‖c‖‖g‖ and exposes that too
    for g in (noise, pc + noise * (norm(pc) / max(norm(noise), 1e-30))):
        lhs = torch.dot(pc.double(), g.double())
        rhs = torch.dot(c.double(), p.rmatvec(g).double())
        # both sides are <c, Pᵀg> up to the float32 rounding of one product: |error| <= RTOL·‖P‖‖c‖‖g‖
        assert abs(float(lhs - rhs)) <= RTOL * norm(c) * norm(g), (float(lhs), float(rhs))


# -- column lengths and orthonormality ---------------------------------------------------------------------------
def _columns(p, idx: list[int]) -> torch.Tensor:
    """``P e_i`` for ``i`` in ``idx`` as a float64 ``(D, len(idx))`` matrix."""
    eye = torch.zeros(p.d)
    cols = []
    for i in idx:
        eye.zero_()
        eye[i] = 1.0
        cols.append(p.matvec(eye).double())
    return torch.stack(cols, 1)


COLUMN_SAMPLE = st.lists(st.integers(0, 2**31), min_size=1, max_size=12)


@pytest.mark.parametrize("name", sorted(ORTHONORMAL))
@props(15)
@given(data=st.data(), seed=SEEDS, key=st.integers(0, 2**32), picks=COLUMN_SAMPLE)
def test_columns_are_orthonormal_where_promised(name, data, seed, key, picks):
    """hashing (both formats: "PᵀP = I") and trajectory ("PᵀP = I" for an orthonormal basis)."""
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    idx = sorted({i % d for i in picks})
    M = _columns(p, idx)
    # hashing: each entry of P e_i is one float32 product (± 1/√n, 1/√n from rsqrt: 1 ulp), so the Gram matrix
    # (summed in float64) is I to a few u; trajectory: P e_i is a row of the float64 QR factor rounded to float32
    # (by the basis, or by matvec's float32 output: <= u per entry), so its Gram matrix is I to ~2u (Cauchy–Schwarz)
    torch.testing.assert_close(M.T @ M, torch.eye(len(idx), dtype=torch.float64), atol=8 * U, rtol=0)
    c, = vectors(key, d)
    pc = p.matvec(c)
    assert abs(norm(pc) - norm(c)) <= 8 * U * norm(c) + 1e-30  # ‖P c‖ = ‖c‖
    if name.startswith("hashing"):
        # (PᵀP c)_j sums n_j <= ⌈D/d⌉ float32 terms, each c_j/n_j to 2u: |error_j| <= (⌈D/d⌉ + 4)·u·|c_j|
        n_max = -(-D // d)
        err = (p.rmatvec(pc).double() - c.double()).abs()
        assert (err <= 2 * (n_max + 4) * U * c.double().abs() + 1e-30).all(), float(err.max())
    else:
        # Pᵀ(P c) sums d, then D float32 terms; errors grow like sqrt(D)·u (measured <= 4e-7 here): RTOL bounds them
        assert_small(p.rmatvec(pc).double() - c.double(), RTOL * norm(c), "PᵀP c - c")


@pytest.mark.parametrize("name", ["dense", "dense-chunked", "sparse", "sparse-density"])
@props(12)
@given(data=st.data(), seed=SEEDS, picks=COLUMN_SAMPLE)
def test_dense_and_sparse_columns_have_unit_length(name, data, seed, picks):
    """dense: ``P[:, j] = z_:j / ‖z_:j‖``; sparse: "columns are then scaled to unit length exactly"."""
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    idx = sorted({i % d for i in picks})
    norms = _columns(p, idx).norm(dim=0)
    # the norm is summed in float64 (dense) or from small integer counts (sparse), then one float32 rounding
    # of 1/‖z‖ (<= u), and P e_j is one float32 product per entry (<= u): ‖P e_j‖ = 1 to a few u
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=8 * U, rtol=0)


@pytest.mark.parametrize("name", ["fastfood-f1", "fastfood-f2", "fastfood-f1-global", "fastfood-f2-global"])
@props(15)
@given(data=st.data(), seed=SEEDS, picks=COLUMN_SAMPLE)
def test_fastfood_column_lengths(name, data, seed, picks):
    """The docstrings: with orthonormal ``H``, column ``i`` of block ``b`` has squared length ``‖G_b‖²/B``, and
    ``P`` is scaled by ``1/√(Σ_b ‖G_b‖²/B)`` with the partial last block counted by the fraction ``f`` of its
    rows kept. So ``‖P e_i‖ = 1`` exactly when every block is whole (``B`` divides ``D``); otherwise the last
    block adds between 0 and its whole ``‖G_last‖²/B`` (its kept rows are some of the block's), which bounds
    ``‖P e_i‖²`` in ``[Σ_full / (Σ_full + f·s_last), (Σ_full + s_last) / (Σ_full + f·s_last)]``."""
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    sq = p.state_tensors()["gauss"].double().pow(2).sum(-1).expand(p.n_blocks) / p.B  # ‖G_b‖²/B per block
    kept = (D - (p.n_blocks - 1) * p.B) / p.B
    full, last = float(sq[:-1].sum()), float(sq[-1])
    if kept == 1:  # B divides D: every block whole
        lo = hi = 1.0
    else:
        lo, hi = full / (full + kept * last), (full + last) / (full + kept * last)
    sq_norms = _columns(p, sorted({i % d for i in picks})).pow(2).sum(0)
    # two float32 Walsh–Hadamard transforms (factors of <= 128 terms) and a product: the squared length is off
    # by rounding only (measured <= 1.2e-7 at D, d <= 5000); 2e-6 is ~16x that
    slack = 2e-6
    assert (sq_norms >= lo - slack).all() and (sq_norms <= hi + slack).all(), (lo, hi, sq_norms.tolist())


@props(20)
@given(D=_dims(600), data=st.data(), seed=SEEDS, fmt=st.sampled_from([1, 2]))
def test_hashing_has_one_nonzero_per_row_and_balanced_columns(D, data, seed, fmt):
    """Both formats' docstrings: one nonzero per row, ``⌊D/d⌋`` or ``⌈D/d⌉`` rows per column, ``PᵀP = I``."""
    d = data.draw(st.integers(1, D) | st.sampled_from([D, max(1, D - 1)]), label="d")
    M = make_projection("hashing", D, d, seed=seed, format=fmt).dense_matrix().double()
    assert ((M != 0).sum(1) == 1).all()
    counts = (M != 0).sum(0)
    assert counts.min() >= D // d and counts.max() <= -(-D // d)
    torch.testing.assert_close(M.T @ M, torch.eye(d, dtype=torch.float64), atol=8 * U, rtol=0)


# -- determinism -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@props(10)
@given(data=st.data(), seed=SEEDS, other=SEEDS, key=st.integers(0, 2**32))
def test_same_inputs_same_P_bit_for_bit_and_another_seed_another_P(name, data, seed, other, key):
    D, d = data.draw(shapes(name), label="D, d")
    p, q = build(name, D, d, seed), build(name, D, d, seed)
    c, g = vectors(key, d, D)
    assert torch.equal(p.matvec(c), q.matvec(c))
    assert torch.equal(p.rmatvec(g), q.rmatvec(g))
    ps, qs = p.state_tensors(), q.state_tensors()
    assert ps.keys() == qs.keys() and all(torch.equal(ps[k], qs[k]) for k in ps)
    if name.startswith("trajectory") or other == seed or D < 64:
        return  # trajectory is data, not a seed; tiny P (e.g. hashing D = d = 1: ±1) can coincide by chance
    if name == "fastfood-f2" and d == 1:
        # format 2 at d = 1 has blocks of B = 1 row, all the same transform (a rotation of a length-1 vector is
        # itself): P is a constant column ±1/√D whatever the seed (a known limit of the format, in the README)
        assert torch.allclose(p.matvec(c).abs(), torch.full((D,), float(c.abs()) / D ** 0.5), rtol=1e-5)
        return
    # D >= 64: two seeds give the same P with probability <= 2^-60 for every kind (hashing alone has >= 64
    # independent random signs; the others draw Gaussians or >= 64 random rows)
    r = build(name, D, d, other)
    assert not torch.equal(r.matvec(c), p.matvec(c))


# -- row slices and entries --------------------------------------------------------------------------------------
@st.composite
def row_ranges(draw, D: int):
    a = draw(st.integers(0, D - 1) | st.sampled_from([0, D - 1]))
    return a, draw(st.integers(a + 1, D) | st.just(D))


@pytest.mark.parametrize("name", NAMES)
@props(10)
@given(data=st.data(), seed=SEEDS, key=st.integers(0, 2**32))
def test_row_slices_and_entries_are_the_whole_products_cut(name, data, seed, key):
    D, d = data.draw(shapes(name), label="D, d")
    p = build(name, D, d, seed)
    c, g = vectors(key, d, D)
    whole = p.matvec(c)
    # hashing's rows are each one product, computed the same whatever slice asks: equal bit for bit; the other
    # kinds may batch their sums differently per slice: equal to rounding (RTOL, as above)
    exact = name.startswith("hashing")

    def same(part, ref, scale, what):
        if exact:
            assert torch.equal(part, ref), what
        else:
            assert_small(part.double() - ref.double(), RTOL * scale + 1e-30, what)

    for _ in range(3):
        a, b = data.draw(row_ranges(D), label="rows")
        same(p.matvec_rows(c, a, b), whole[a:b], norm(c), f"matvec_rows {a}:{b}")
        padded = torch.zeros(D)
        padded[a:b] = g[a:b]
        assert_small(p.rmatvec_rows(g[a:b], a, b).double() - p.rmatvec(padded).double(), RTOL * norm(g[a:b]) + 1e-30,
                     f"rmatvec_rows {a}:{b}")
    # the engine's use: Pᵀ g summed tensor by tensor over a partition of θ is Pᵀ g
    cuts = sorted(set(data.draw(st.lists(st.integers(1, D - 1), max_size=6), label="cuts") if D > 1 else []))
    bounds = [0, *cuts, D]
    total = sum(p.rmatvec_rows(g[a:b], a, b).double() for a, b in zip(bounds[:-1], bounds[1:]))
    assert_small(total - p.rmatvec(g).double(), RTOL * norm(g) * len(bounds), "Σ rmatvec_rows over a partition")
    # entries: any shape, repeats allowed for P c; distinct for Pᵀ (as documented)
    n = data.draw(st.integers(1, min(D, 40)), label="entries")
    gen = torch.Generator().manual_seed(key)
    pos = torch.randint(0, D, (2, n), generator=gen)
    same(p.matvec_at(c, pos), whole[pos], norm(c), "matvec_at")
    distinct = torch.randperm(D, generator=gen)[:n].view(1, n)
    w = torch.randn(1, n, generator=gen)
    padded = torch.zeros(D)
    padded[distinct.reshape(-1)] = w.reshape(-1)
    assert_small(p.rmatvec_at(w, distinct).double() - p.rmatvec(padded).double(), RTOL * norm(w) + 1e-30,
                 "rmatvec_at")


# An empty row slice (start == stop) or no positions: what a zero-element tensor of θ (e.g. nn.Linear(0, 4).weight)
# asks for through project_rows. Format 2 of hashing and fastfood once raised here (IndexError, ZeroDivisionError).
@pytest.mark.parametrize("name", NAMES)
def test_empty_slices_and_entries_are_empty(name):
    p = build(name, 100, 10, seed=1)
    c = torch.randn(10)
    none = torch.zeros(0, dtype=torch.int64)
    for start in (0, 10, 16, 50, 100):
        assert p.matvec_rows(c, start, start).shape == (0,)
        assert torch.equal(p.rmatvec_rows(torch.zeros(0), start, start), torch.zeros(10))
    assert p.matvec_at(c, none).shape == (0,)
    assert torch.equal(p.rmatvec_at(torch.zeros(0), none), torch.zeros(10))


# -- trajectory: shards sum to the whole; the stored placeholder ---------------------------------------------------
@props(15)
@given(data=st.data(), key=st.integers(0, 2**32), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_trajectory_row_shards_sum_to_the_whole(data, key, dtype):
    """The docstring: with ``row_range`` each shard's products are partial sums; summed over shards, the whole."""
    D, d = data.draw(shapes("trajectory"), label="D, d")
    full = build("trajectory", D, d, key)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, d - 1), max_size=4), label="cuts") if d > 1 else []))
    bounds = [0, *cuts, d]
    basis = full.basis.to(dtype)
    full = TrajectoryProjection(basis)
    shards = [TrajectoryProjection(basis[a:b], row_range=(a, b), total_rows=d) for a, b in zip(bounds[:-1], bounds[1:])]
    c, g = vectors(key, d, D)
    assert_small(sum(s.matvec(c).double() for s in shards) - full.matvec(c).double(), RTOL * norm(c), "Σ P_s c")
    parts = [s.rmatvec(g) for s in shards]
    for (a, b), part in zip(zip(bounds[:-1], bounds[1:]), parts):
        assert not part[:a].any() and not part[b:].any()  # zero outside the shard's rows
    assert_small(sum(part.double() for part in parts) - full.rmatvec(g).double(), RTOL * norm(g), "Σ P_sᵀ g")


@props(10)
@given(data=st.data(), key=st.integers(0, 2**32))
def test_trajectory_placeholder_loads_its_basis(data, key):
    D, d = data.draw(shapes("trajectory"), label="D, d")
    p = make_projection("trajectory", D, d, seed=key)  # a stored kind: zeros, to be filled from the adapter file
    assert (p.D, p.d) == (D, d) and not p.basis.any()
    ref = build("trajectory", D, d, key)
    p.load_state_tensors(ref.state_tensors())
    c, = vectors(key, d)
    assert torch.equal(p.matvec(c), ref.matvec(c))


# -- bad input is refused ----------------------------------------------------------------------------------------
BUILDABLE = [(kind, fmt) for kind in sorted(PROJECTION_FORMATS) for fmt in sorted(PROJECTION_FORMATS[kind])]


@st.composite
def bad_sizes(draw, bools: bool = True):
    """``(D, d)`` that no projection accepts: ``D <= 0``, ``d <= 0`` or ``d > D``, or not an ``int``."""
    why = draw(st.sampled_from(["d<=0", "D<=0", "d>D", "type"]))
    if why == "d<=0":
        return draw(st.integers(1, 5000)), draw(st.integers(-10**6, 0))
    if why == "D<=0":
        return draw(st.integers(-10**6, 0)), draw(st.integers(-5, 5000))
    if why == "d>D":
        D = draw(st.integers(1, 5000))
        return D, draw(st.integers(D + 1, D + 10**9))
    good = draw(st.integers(1, 100))
    bad = draw(st.sampled_from([float(good), str(good), None, good + 0.5] + [True, False] * bools))
    return (good + 100, bad) if draw(st.booleans()) else (bad, good)


@pytest.mark.parametrize("kind,fmt", BUILDABLE + [("trajectory", None)])
@props(25)
@given(data=st.data(), seed=SEEDS)
def test_bad_sizes_are_refused(kind, fmt, data, seed):
    D, d = data.draw(bad_sizes(bools=True), label="D, d")
    with pytest.raises(ValueError, match=r"\b[Dd]\b|larger than|positive integer"):
        make_projection(kind, D, d, seed=seed, format=fmt)


# The stored kind's placeholder (TrajectoryProjection.empty, what make_projection returns for "trajectory") once
# admitted bools as sizes (isinstance(True, int)).
@pytest.mark.parametrize("D,d", [(True, 1), (5, True)])
def test_trajectory_placeholder_refuses_bool_sizes(D, d):
    with pytest.raises(ValueError):
        make_projection("trajectory", D, d)


@props(20)
@given(D=st.integers(1, 200), extra=st.integers(1, 50))
def test_trajectory_basis_with_more_rows_than_columns_is_refused(D, extra):
    with pytest.raises(ValueError, match="larger than the number of weights"):
        TrajectoryProjection(torch.zeros(D + extra, D))


@props(25)
@given(density=st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0.0 < x <= 1.0),
       block=st.text(max_size=8).filter(lambda s: s not in ("d", "global")),
       fmt=st.integers(-5, 50).filter(lambda f: f not in (1, 2)))
def test_bad_options_are_refused(density, block, fmt):
    with pytest.raises(ValueError, match="density"):
        make_projection("sparse", 100, 10, density=density)
    for fastfood_format in (1, 2):
        with pytest.raises(ValueError, match="block"):
            make_projection("fastfood", 100, 10, format=fastfood_format, block=block)
    for kind in PROJECTION_KINDS:
        if fmt not in PROJECTION_FORMATS[kind]:
            with pytest.raises(ValueError, match="format"):
                make_projection(kind, 100, 10, format=fmt)


# -- every kind and format is covered ------------------------------------------------------------------------------
def test_every_kind_and_format_is_covered():
    covered = {(kind, options.get("format", 1)) for kind, options, _, _ in VARIANTS.values()}
    assert {(k, f) for k in PROJECTION_FORMATS for f in PROJECTION_FORMATS[k]} <= covered
    assert set(PROJECTION_KINDS) | set(STORED_KINDS) == {kind for kind, *_ in VARIANTS.values()}
    for name in NAMES:  # a variant's explicit format is the class it claims to build
        kind, options, _, _ = VARIANTS[name]
        if "format" in options:
            assert type(build(name, 50, 5, 0)) is PROJECTION_FORMATS[kind][options["format"]]


@pytest.mark.parametrize("projection,fmt", [("hashing", 2), ("fastfood", 2), ("hashing", 1), ("dense", None)])
def test_a_zero_element_parameter_in_theta_trains(projection, fmt):
    """A model holding a zero-element weight (nn.Linear(0, 4)) in θ: forward and backward run and c gets a
    gradient (format 2 of hashing and fastfood once raised on the empty row slice)."""
    from peft import get_peft_model

    import hf_subspace as hs

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.empty = torch.nn.Linear(0, 4)
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x + self.empty(x[:, :0]))

    torch.manual_seed(0)
    model = get_peft_model(Net(), hs.SubspaceConfig(dim=5, projection=projection, projection_format=fmt,
                                                    target_modules=["empty", "lin"]))
    model(torch.randn(2, 4)).sum().backward()
    c = model.base_model.subspace.coeffs["default"]
    assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
