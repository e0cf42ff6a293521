"""TWA building blocks: trajectory basis, TrajectoryProjection, snapshots, BatchNorm recalibration."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_subspace.projections.trajectory import TrajectoryProjection
from hf_subspace.twa import (
    SnapshotCallback,
    SnapshotStore,
    build_trajectory_basis,
    effective_rank,
    flatten_snapshot,
    load_checkpoint_snapshots,
    recalibrate_batchnorm,
    trainable_state,
    unflatten,
)

SHAPES = {"layer.weight": (500, 300), "layer.bias": (300,), "head.weight": (49_700, 1)}  # D = 200,000


def random_snapshots(n=8, shapes=SHAPES, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return [{k: base[k] + spread * torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


def flat(snaps, names):
    return torch.stack([flatten_snapshot(s, names, torch.float64) for s in snaps])


# ----------------------------------------------------------------------------------------------------------------
# the basis
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twa_result():
    snaps = random_snapshots()
    return snaps, build_trajectory_basis(snaps, chunk_size=1 << 16)  # several chunks per tensor


def test_basis_is_orthonormal(twa_result):
    _, res = twa_result
    Q = res.projection.basis
    assert Q.dtype == torch.float32 and Q.shape == (7, 200_000)  # 8 centered snapshots have rank 7
    Qd = Q.double()
    err = (Qd @ Qd.T - torch.eye(7, dtype=torch.float64)).abs().max().item()
    assert err <= 1e-6
    assert res.orthonormality_error == pytest.approx(err, abs=1e-12)
    assert res.projection.orthonormality_error() == pytest.approx(err, abs=1e-12)


def test_mean_is_arithmetic_mean(twa_result):
    snaps, res = twa_result
    assert res.names == list(SHAPES)
    for name in SHAPES:
        expected = torch.stack([s[name].double() for s in snaps]).mean(0)
        assert res.mean[name].dtype == torch.float32 and res.mean[name].shape == SHAPES[name]
        torch.testing.assert_close(res.mean[name].double(), expected, rtol=0, atol=1e-6)


def test_basis_spans_every_snapshot(twa_result):
    snaps, res = twa_result
    Q = res.projection.basis.double()
    X = flat(snaps, res.names) - flatten_snapshot(res.mean, res.names, torch.float64)
    recon = (X @ Q.T) @ Q
    rel = (recon - X).norm(dim=1) / X.norm(dim=1)
    assert rel.max().item() <= 1e-5
    assert res.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_uncentered_basis_spans_the_snapshots_themselves():
    snaps = random_snapshots()
    res = build_trajectory_basis(snaps, chunk_size=1 << 16, center=False)
    assert res.k == 8 and res.orthonormality_error <= 1e-6  # one more direction than the centered basis: the mean's
    Q = res.projection.basis.double()
    W = flat(snaps, res.names)
    rel = ((W @ Q.T) @ Q - W).norm(dim=1) / W.norm(dim=1)
    assert rel.max().item() <= 1e-5
    mean = flatten_snapshot(res.mean, res.names, torch.float64)
    assert ((Q @ mean) @ Q - mean).norm() / mean.norm() <= 1e-5
    centered = build_trajectory_basis(snaps, chunk_size=1 << 16)
    assert ((Q @ mean) @ Q - mean).norm() < (((centered.projection.basis.double() @ mean) @
                                              centered.projection.basis.double()) - mean).norm()


def test_pca_orders_by_variance_and_keeps_top_k(twa_result):
    snaps, full = twa_result
    res = build_trajectory_basis(snaps, method="pca", k=3)
    assert res.k == 3 and res.method == "pca"
    sv = res.singular_values
    assert (sv[:-1] >= sv[1:]).all()
    torch.testing.assert_close(sv, full.singular_values[:3])
    # rows are the leading principal directions: they match an SVD of the centered data up to sign
    X = flat(snaps, res.names)
    X = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(sv, S[:3])
    overlap = (res.projection.basis.double() @ Vh[:3].T).abs()
    torch.testing.assert_close(overlap, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k=9 components.*only 7"):
        build_trajectory_basis(snaps, method="pca", k=9)


def test_twa_k_caps_the_directions(twa_result):
    snaps, _ = twa_result
    assert build_trajectory_basis(snaps, k=4).k == 4
    assert build_trajectory_basis(snaps, k=100).k == 7


def test_duplicate_snapshots_drop_directions():
    a, b, c = random_snapshots(3, {"w": (1000,)})
    res = build_trajectory_basis([a, a, b, b, a])  # two distinct points: one direction
    assert res.k == 1
    res = build_trajectory_basis([a, b, c, a, b, c])  # three distinct points: two directions
    assert res.k == 2
    Q = res.projection.basis.double()
    assert (Q @ Q.T - torch.eye(2, dtype=torch.float64)).abs().max() <= 1e-6


def test_graded_scales_stay_orthonormal():
    """Large common part, snapshot differences spanning 4 orders of magnitude: CholeskyQR2 keeps Q orthonormal."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50_000, generator=g)
    snaps = [{"w": base + 1e-2 * 10 ** (-i / 2) * torch.randn(50_000, generator=g)} for i in range(9)]
    res = build_trajectory_basis(snaps)
    assert res.k == 8
    assert res.orthonormality_error <= 1e-6


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s: s[:1], "at least 2 snapshots"),
        (lambda s: [s[0], {**s[1], "extra": torch.zeros(2)}], "has an extra tensor 'extra'"),
        (lambda s: [s[0], {"a": s[1]["a"], "c": s[1]["b"]}], "lacks tensor 'b'"),
        (lambda s: [s[0], {"a": s[1]["a"], "b": torch.zeros(5)}], r"'b' has shape \(4,\) in snapshot 0 but \(5,\)"),
        (lambda s: [s[0], s[0], s[0]], "identical"),
        (lambda s: [{**x, "b": torch.ones(4, dtype=torch.long)} for x in s], "'b' has non-floating dtype"),
        (lambda s: [s[0], {**s[1], "a": torch.full((3, 2), float("nan"))}, s[2]], "'a' holds NaN or inf"),
    ],
)
def test_bad_inputs_raise(make, message):
    snaps = [{"a": torch.randn(3, 2), "b": torch.randn(4)} for _ in range(3)]
    with pytest.raises(ValueError, match=message):
        build_trajectory_basis(make(snaps))


def test_names_select_and_must_exist():
    snaps = [{"a": torch.randn(3), "b": torch.randn(4)} for _ in range(3)]
    res = build_trajectory_basis(snaps, names=["b"])
    assert res.names == ["b"] and res.projection.D == 4
    with pytest.raises(ValueError, match="no tensor named 'zz'"):
        build_trajectory_basis(snaps, names=["a", "zz"])
    with pytest.raises(ValueError, match="unknown method"):
        build_trajectory_basis(snaps, method="svd")


def test_flatten_unflatten_round_trip():
    snap = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    v = flatten_snapshot(snap, ["b", "a"])
    assert v.shape == (10,) and torch.equal(v[:4], snap["b"])
    back = unflatten(v, ["b", "a"], {"a": (2, 3), "b": (4,)})
    assert all(torch.equal(back[k], snap[k]) for k in snap)
    with pytest.raises(ValueError, match="does not hold 11"):
        unflatten(v, ["b", "a"], [(4,), (7,)])


def test_effective_rank():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# the projection
# ----------------------------------------------------------------------------------------------------------------
def test_trajectory_projection_adjoint_and_state():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(1000, 6, generator=g, dtype=torch.float64))
    proj = TrajectoryProjection(Q.T.float())
    assert (proj.kind, proj.D, proj.d, proj.seed) == ("trajectory", 1000, 6, 0)
    c, v = torch.randn(6, generator=g), torch.randn(1000, generator=g)
    lhs = torch.dot(proj.matvec(c).double(), v.double())
    rhs = torch.dot(c.double(), proj.rmatvec(v).double())
    assert abs(lhs - rhs) <= 1e-5 * (1 + abs(lhs))
    P = proj.dense_matrix()
    torch.testing.assert_close(P.T @ P, torch.eye(6), atol=1e-6, rtol=0)

    empty = TrajectoryProjection.empty(1000, 6)
    assert torch.count_nonzero(empty.basis) == 0
    empty.load_state_tensors(proj.state_tensors())
    torch.testing.assert_close(empty.matvec(c), proj.matvec(c))
    with pytest.raises(ValueError, match="shape"):
        TrajectoryProjection.empty(999, 6).load_state_tensors(proj.state_tensors())


def test_trajectory_projection_row_shards_sum_to_full():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(300, 5, generator=g, dtype=torch.float64))
    full = TrajectoryProjection(Q.T.float())
    shards = [TrajectoryProjection(Q.T[a:b].float(), row_range=(a, b), total_rows=5) for a, b in [(0, 2), (2, 5)]]
    c, v = torch.randn(5, generator=g), torch.randn(300, generator=g)
    torch.testing.assert_close(sum(s.matvec(c) for s in shards), full.matvec(c))
    torch.testing.assert_close(sum(s.rmatvec(v) for s in shards), full.rmatvec(v))
    with pytest.raises(ValueError, match="row_range"):
        TrajectoryProjection(Q.T[:2].float(), row_range=(0, 3))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_basis_drives_the_subspace_engine():
    """θ = mean + basisᵀ c: c = 0 is the SWA point, c = Q (w - mean) gives back a snapshot."""
    from hf_subspace.reparam import reparameterize

    model = TinyMLP()
    snaps = []
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        snaps.append(trainable_state(model))
    res = build_trajectory_basis(snaps)
    model.load_state_dict(res.mean)
    engine = reparameterize(model, dim=res.k, projection=res.projection)
    x = torch.randn(3, 6)
    target = TinyMLP()
    target.load_state_dict(snaps[-1])
    with torch.no_grad():
        w = flatten_snapshot(snaps[-1], res.names) - flatten_snapshot(res.mean, res.names)
        engine.coeffs["default"].copy_(res.projection.rmatvec(w))
        engine.invalidate()
        torch.testing.assert_close(model(x), target(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# snapshots
# ----------------------------------------------------------------------------------------------------------------
def test_snapshot_store_disk_round_trip_bf16(tmp_path):
    snaps = random_snapshots(3, {"a": (4, 5), "b": (7,)})
    store = SnapshotStore(storage="disk", directory=tmp_path / "snaps", dtype=torch.bfloat16)
    for step, s in zip([10, 20, 30], snaps):
        store.add(s, step)
    assert len(store) == 3 and store.steps == [10, 20, 30] and store.names == ["a", "b"]
    assert store.shapes == {"a": (4, 5), "b": (7,)}
    for s, back in zip(snaps, store):
        for k in s:
            assert back[k].dtype == torch.float32
            torch.testing.assert_close(back[k], s[k].bfloat16().float(), rtol=0, atol=0)
    reopened = SnapshotStore.open(tmp_path / "snaps")
    assert reopened.steps == [10, 20, 30] and reopened.dtype == torch.bfloat16
    torch.testing.assert_close(reopened[2]["b"], store[2]["b"])
    res = build_trajectory_basis(reopened)  # lazy per-tensor reads
    assert res.k == 2
    with pytest.raises(ValueError, match="already holds snapshot files"):
        SnapshotStore(storage="disk", directory=tmp_path / "snaps")
    with pytest.raises(ValueError, match=r"'a' has shape \(4, 5\) in the first snapshot but \(5, 4\)"):
        store.add({"a": torch.zeros(5, 4), "b": torch.zeros(7)}, 40)
    with pytest.raises(ValueError, match="lacks tensor 'b'"):
        store.add({"a": torch.zeros(4, 5)}, 40)


def test_snapshot_store_keeps_the_latest():
    store = SnapshotStore(max_snapshots=2)
    for step in range(4):
        store.add({"w": torch.full((2,), float(step))}, step)
    assert store.steps == [2, 3] and store[0]["w"][0].item() == 2.0


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values, labels=None):
        h = torch.relu(self.bn(self.conv(pixel_values))).mean((2, 3))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def image_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(1, 8, 8, generator=g) * 2 + 1, "labels": int(i % 3)} for i in range(n)]


def run_trainer(tmp_path, callbacks=(), **overrides):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = TinyCNN()
    kwargs = dict(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", max_steps=6,
                  per_device_train_batch_size=4, learning_rate=0.1, logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=image_data(),
                      callbacks=list(callbacks))
    trainer.train()
    return model


def test_snapshot_callback_in_trainer(tmp_path):
    cb = SnapshotCallback(every_n_steps=2)
    model = run_trainer(tmp_path, [cb])
    store = cb.store
    assert store.steps == [2, 4, 6]
    assert set(store.names) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"}
    assert not any("running" in n or "num_batches" in n for n in store.names)
    for name, p in model.named_parameters():
        torch.testing.assert_close(store[-1][name], p.detach())
    assert not torch.equal(store[0]["conv.weight"], store[-1]["conv.weight"])
    assert build_trajectory_basis(store).k == 2


def test_snapshot_callback_start_step(tmp_path):
    cb = SnapshotCallback(every_n_steps=1, start_step=4)
    run_trainer(tmp_path, [cb])
    assert cb.store.steps == [4, 5, 6]
    with pytest.raises(ValueError, match="start_step"):
        SnapshotCallback(every_n_steps=1, start_step=-1)


def test_snapshot_callback_per_epoch(tmp_path):
    cb = SnapshotCallback(storage="disk", directory=tmp_path / "snaps", dtype=torch.float16)
    run_trainer(tmp_path, [cb], max_steps=-1, num_train_epochs=2, per_device_train_batch_size=16)
    assert cb.store.steps == [2, 4] and len(list((tmp_path / "snaps").iterdir())) == 2
    with pytest.raises(ValueError, match="record nothing"):
        SnapshotCallback(per_epoch=False)


def test_load_checkpoint_snapshots(tmp_path):
    model = run_trainer(tmp_path, save_strategy="steps", save_steps=2, save_only_model=True)
    store = load_checkpoint_snapshots(tmp_path / "run")
    assert store.steps == [2, 4, 6]
    assert "bn.weight" in store.names and not any("running" in n or "num_batches" in n for n in store.names)
    for name, p in model.named_parameters():
        torch.testing.assert_close(store[-1][name], p.detach())
    only = load_checkpoint_snapshots(tmp_path / "run", names=["head.weight"])
    assert only.names == ["head.weight"]
    with pytest.raises(ValueError, match="no floating-point tensor named 'nope'"):
        load_checkpoint_snapshots(tmp_path / "run", names=["nope"])
    with pytest.raises(ValueError, match=r"found 1 checkpoint-\* folder"):
        load_checkpoint_snapshots([tmp_path / "run" / "checkpoint-2"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0 checkpoint"):
        load_checkpoint_snapshots(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------------------------
def test_recalibrate_batchnorm_from_hf_style_batches():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model.bn.momentum = 0.3
    data = image_data(24)
    batches = [{"pixel_values": torch.stack([d["pixel_values"] for d in data[i:i + 8]]),
                "labels": torch.tensor([d["labels"] for d in data[i:i + 8]])} for i in range(0, 24, 8)]
    assert torch.equal(model.bn.running_mean, torch.zeros(4))
    assert recalibrate_batchnorm(model, batches) == 1
    assert not model.training and not model.bn.training and model.bn.momentum == 0.3
    # momentum=None: the running mean is the equal-weight average of the per-batch means
    with torch.no_grad():
        acts = [model.conv(b["pixel_values"]) for b in batches]
    expected = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected, atol=1e-5, rtol=1e-5)
    assert int(model.bn.num_batches_tracked) == 3

    before = model.bn.running_mean.clone()
    model.train()
    assert recalibrate_batchnorm(model, [(b["pixel_values"], b["labels"]) for b in batches], num_batches=1) == 1
    assert model.training and int(model.bn.num_batches_tracked) == 1
    assert not torch.equal(model.bn.running_mean, before)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(model, [])
    assert int(model.bn.num_batches_tracked) == 1  # left unchanged


def test_recalibrate_batchnorm_without_batchnorm_reads_nothing():
    def never():
        raise AssertionError("the data must not be read")
        yield

    assert recalibrate_batchnorm(nn.Linear(3, 3), never()) == 0
