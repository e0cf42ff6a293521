import copy

import pytest
import torch
from torch import nn

import hf_subspace as hs
from hf_subspace.reparam import select_parameters

from conftest import MODELS, bert_batch, gpt2_batch, tiny_bert_cls, tiny_gpt2, tiny_resnet

KINDS = ["hashing", "fastfood", "sparse", "dense"]


def _out(model, batch):
    b = {k: v for k, v in batch.items() if k != "labels"}
    return model(**b).logits


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", KINDS)
def test_zero_coefficients_leave_outputs_unchanged(name, kind):
    make, batch_fn = MODELS[name]
    model, batch = make(), batch_fn()
    with torch.no_grad():
        ref = _out(model, batch)
        hs.reparameterize(model, 64, kind)
        assert torch.equal(_out(model, batch), ref)


def _explicit_grad_check(model_fn, batch, kind, mode):
    """∂L/∂c from the engine must equal Pᵀ ∇θL computed on an ordinary copy of the model."""
    model = model_fn()
    plain = copy.deepcopy(model)
    engine = hs.reparameterize(model, 80, kind, mode=mode, seed=2)
    state = engine.adapters["default"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        engine.coeffs["default"].copy_(torch.randn(engine.coeffs["default"].shape, generator=g) * 0.1)
        if mode == "said":
            engine.scales["default"].copy_(1 + 0.5 * torch.rand(engine.scales["default"].shape, generator=g))
    model.eval()  # no dropout: both paths must see the same function
    loss = model(**batch).loss
    loss.backward()
    got = engine.coeffs["default"].grad.clone()

    # independent path: explicit dense P, plain model with θ = θ0 + λ P c written into its weights
    M = state.projection.dense_matrix().double()
    flat = M @ engine.coeffs["default"].detach().double()
    params = dict(plain.named_parameters())
    scales = engine.scales["default"].detach().double() if mode == "said" else None
    with torch.no_grad():
        for i, slot in enumerate(state.layout.slots):
            piece = flat[slot.offset: slot.offset + slot.numel].view(slot.shape)
            if scales is not None:
                piece = piece * scales[i]
            params[slot.name].add_(piece.float())
    plain.eval()
    plain.zero_grad()
    plain(**batch).loss.backward()
    gflat = torch.cat([
        (params[s.name].grad.double() * (scales[i] if scales is not None else 1.0)).reshape(-1)
        for i, s in enumerate(state.layout.slots)
    ])
    expected = M.T @ gflat
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_projected_full_gradient_bert(kind):
    torch.manual_seed(0)
    _explicit_grad_check(lambda: tiny_bert_cls(hidden=16, layers=1), bert_batch(), kind, "global")


@pytest.mark.parametrize("kind", ["hashing", "fastfood"])
def test_gradient_equals_projected_full_gradient_said_tied_gpt2(kind):
    _explicit_grad_check(tiny_gpt2, gpt2_batch(), kind, "said")


def test_tied_weights_counted_once():
    model = tiny_gpt2()
    layout = select_parameters(model)
    assert layout.D == sum(p.numel() for p in model.parameters())
    tied = [s for s in layout.slots if len(s.holders) == 2]
    assert [h[0] for h in tied[0].holders] == ["transformer.wte", "lm_head"]
    hs.reparameterize(model, 50)
    with torch.no_grad():
        model.subspace.coeffs["default"].fill_(0.3)
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_few_steps_lower_the_loss(name):
    make, batch_fn = MODELS[name]
    model, batch = make(), batch_fn()
    engine = hs.reparameterize(model, 200, "fastfood", mode="said")
    opt = torch.optim.Adam(engine.parameters(), lr=3e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["subspace.vectors.default.coeffs", "subspace.vectors.default.scales"]


def test_batchnorm_buffers_are_not_in_theta():
    model = tiny_resnet()
    layout = select_parameters(model)
    assert not any("running" in s.name for s in layout.slots)
    assert layout.D == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["hashing", "fastfood"])
def test_activation_checkpointing_gives_the_same_gradient(kind):
    batch = bert_batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_bert_cls()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        engine = hs.reparameterize(model, 100, kind, mode="said")
        with torch.no_grad():
            engine.coeffs["default"].normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for mod in model.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        model(**batch).loss.backward()
        grads.append(engine.coeffs["default"].grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_row_sliced_projection_keeps_nothing_of_size_D():
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 100, "hashing", mode="said")
    with torch.no_grad():
        engine.coeffs["default"].fill_(0.1)  # with c = 0 the scales' gradient ⟨P c, g⟩ is 0
    model.train()
    model(**bert_batch()).loss.backward()
    assert engine.adapters["default"].cached_delta is None
    assert engine.coeffs["default"].grad.abs().sum() > 0 and engine.scales["default"].grad.abs().sum() > 0


def test_projection_runs_once_per_step_and_again_after_update(monkeypatch):
    # projections without cheap row slices (sparse, dense) compute P c once per step
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 100, "sparse")
    proj = engine.adapters["default"].projection
    calls = {"matvec": 0, "rmatvec": 0}
    orig_m, orig_r = proj.matvec, proj.rmatvec

    def m(c):
        calls["matvec"] += 1
        return orig_m(c)

    def r(g):
        calls["rmatvec"] += 1
        return orig_r(g)

    monkeypatch.setattr(proj, "matvec", m)
    monkeypatch.setattr(proj, "rmatvec", r)
    opt = torch.optim.SGD(engine.parameters(), lr=0.1)
    model.train()
    for micro in range(2):  # gradient accumulation over two micro-batches
        model(**bert_batch(seed=micro)).loss.backward()
    assert calls == {"matvec": 1, "rmatvec": 2}
    g_accum = engine.coeffs["default"].grad.clone()
    opt.step()
    model(**bert_batch()).loss.backward()
    assert calls["matvec"] == 2
    assert g_accum.abs().sum() > 0


def test_gradient_accumulation_sums_micro_batch_gradients():
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 100, "fastfood")
    with torch.no_grad():
        engine.coeffs["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.eval()  # deterministic forward (no dropout)
    singles = []
    for s in (0, 1):
        engine.zero_grad()
        model(**bert_batch(seed=s)).loss.backward()
        singles.append(engine.coeffs["default"].grad.clone())
    engine.zero_grad()
    for s in (0, 1):
        model(**bert_batch(seed=s)).loss.backward()
    torch.testing.assert_close(engine.coeffs["default"].grad, singles[0] + singles[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    model = tiny_bert_cls().to(dtype)
    engine = hs.reparameterize(model, 100, "fastfood")
    assert engine.coeffs["default"].dtype == torch.float32
    with torch.no_grad():
        engine.coeffs["default"].fill_(0.5)
    w = model.bert.encoder.layer[0].attention.self.query.weight
    assert w.dtype == dtype
    model.train()
    model(**bert_batch()).loss.float().backward()
    assert engine.coeffs["default"].grad.dtype == torch.float32
    assert torch.isfinite(engine.coeffs["default"].grad).all()


def test_target_modules_restrict_theta():
    model = tiny_bert_cls()
    layout = select_parameters(model, target_modules=["query", "value"])
    assert all(s.name.split(".")[-2] in ("query", "value") for s in layout.slots)
    assert len(layout.slots) == 2 * 2 * 2  # 2 layers x (query, value) x (weight, bias)
    regex = select_parameters(model, target_modules=r".*layer\.0\.attention\.self\.query")
    assert [s.name for s in regex.slots] == ["bert.encoder.layer.0.attention.self.query.weight",
                                            "bert.encoder.layer.0.attention.self.query.bias"]


@pytest.mark.parametrize("dim", [0, -5, 2.5, "100", None, True])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        hs.reparameterize(tiny_bert_cls(), dim)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown projection kind 'gaussian'"):
        hs.reparameterize(tiny_bert_cls(), 10, "gaussian")
    with pytest.raises(ValueError, match="unknown mode"):
        hs.reparameterize(tiny_bert_cls(), 10, mode="lora")
    with pytest.raises(ValueError, match="matched no module"):
        hs.reparameterize(tiny_bert_cls(), 10, target_modules=["q_proj"])
    frozen = tiny_bert_cls().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        hs.reparameterize(frozen, 10)
    with pytest.raises(ValueError, match="larger than the number of weights"):
        hs.reparameterize(tiny_bert_cls(), 10**9)
    with pytest.raises(ValueError, match="SAID mode"):
        hs.reparameterize(tiny_bert_cls(), 5, mode="said")


def test_state_dict_with_the_old_names_of_c_and_lambda_loads():
    """c and λ were ``subspace.coeffs.default`` / ``subspace.scales.default`` (ParameterDicts) up to 0.2.0; they are
    ``subspace.vectors.default.coeffs`` / ``.scales`` now (the adapter name between dots, as PEFT names things). A
    state dict with the old names loads into the new layout (strict: nothing missing, nothing unexpected)."""
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 80, mode="said")
    with torch.no_grad():
        engine.coeffs["default"].normal_()
        engine.scales["default"].uniform_(0.5, 1.5)
    renames = {"subspace.vectors.default.coeffs": "subspace.coeffs.default",
               "subspace.vectors.default.scales": "subspace.scales.default"}
    old = {renames.get(k, k): v for k, v in model.state_dict().items()}
    assert "subspace.coeffs.default" in old and "subspace.vectors.default.coeffs" not in old
    fresh = tiny_bert_cls()
    fresh_engine = hs.reparameterize(fresh, 80, mode="said")
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh_engine.coeffs["default"], engine.coeffs["default"])
    assert torch.equal(fresh_engine.scales["default"], engine.scales["default"])
    batch = bert_batch()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_modules_to_save_are_trained_in_full_and_left_out_of_theta():
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 64, modules_to_save=["classifier"])
    names = [s.name for s in engine.adapters["default"].layout.slots]
    assert not any(n.startswith("classifier") for n in names)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["classifier.bias", "classifier.weight", "subspace.vectors.default.coeffs"]


@pytest.mark.parametrize("opt_kwargs", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_cache_follows_in_place_updates_of_every_optimizer_kind(opt_kwargs):
    # fused AdamW updates c without bumping its version counter; P c must be recomputed anyway
    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 100, "hashing")
    opt = torch.optim.AdamW(engine.parameters(), lr=0.1, **opt_kwargs)
    w = lambda: model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()  # noqa: E731
    model.eval()
    model(**bert_batch()).loss.backward()
    before = w()
    opt.step()
    after = w()
    assert not torch.equal(before, after)
    expected = engine.adapters["default"].projection.matvec(engine.coeffs["default"])
    slot = engine.adapters["default"].layout.slots[engine.adapters["default"].layout.index[
        "bert.encoder.layer.0.attention.self.query.weight"]]
    base = model.bert.encoder.layer[0].attention.self.query.parametrizations.weight.original
    torch.testing.assert_close(after - base, expected[slot.offset: slot.offset + slot.numel].view(slot.shape))


def _grads_both_paths(make_model, batch, **kwargs):
    """Loss, ∂L/∂c (and ∂L/∂λ) with embeddings on the rows-only path and on the whole-table path."""
    out = []
    for row_path in (True, False):
        model = make_model()
        engine = hs.reparameterize(model, **kwargs)
        engine.row_path_embeddings = row_path
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            engine.coeffs["default"].copy_(0.05 * torch.randn(engine.coeffs["default"].shape, generator=g))
        loss = model(**batch).loss
        loss.backward()
        grads = [p.grad.clone() for p in engine.parameters()]
        out.append((loss.detach(), grads))
    return out


@pytest.mark.parametrize("mode", ["global", "said"])
def test_embedding_row_path_matches_the_whole_table(mode):
    batch = bert_batch(n=4, length=12)
    batch["input_ids"][:, -3:] = 0  # padding_idx 0: its row must get no gradient, as F.embedding does
    batch["input_ids"][1] = batch["input_ids"][0]  # repeated tokens: their gradients add up
    (loss_r, grads_r), (loss_f, grads_f) = _grads_both_paths(tiny_bert_cls, batch, dim=300, projection="hashing",
                                                             mode=mode)
    torch.testing.assert_close(loss_r, loss_f, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_r, grads_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_embedding_row_path_touches_only_the_batch_rows(monkeypatch):
    from hf_subspace.projections.hashing import HashingProjection

    model = tiny_bert_cls()
    engine = hs.reparameterize(model, 200, "hashing")
    word = model.bert.embeddings.word_embeddings
    slot = engine.adapters["default"].layout.slots[engine.adapters["default"].layout.index["bert.embeddings.word_embeddings.weight"]]
    sliced, gathered = [], []
    monkeypatch.setattr(HashingProjection, "matvec_rows",
                        lambda self, c, a, b, f=HashingProjection.matvec_rows: sliced.append((a, b)) or f(self, c, a, b))
    monkeypatch.setattr(HashingProjection, "matvec_at",
                        lambda self, c, pos, f=HashingProjection.matvec_at: gathered.append(pos.numel()) or f(self, c, pos))
    batch = bert_batch(n=2, length=5)
    model.train()
    model(**batch).loss.backward()
    assert (slot.offset, slot.offset + slot.numel) not in sliced  # the word table was never expanded
    # one row per token (no dedup: `unique` would read the ids back to the host), never the whole table
    assert batch["input_ids"].numel() * word.embedding_dim in gathered
    assert engine.coeffs["default"].grad.abs().sum() > 0
    # switched off, the table is expanded again and the output is the same
    model.eval()
    with torch.no_grad():
        engine.coeffs["default"].fill_(0.02)
        on = model(**batch).logits
        engine.row_path_embeddings = False
        off = model(**batch).logits
    torch.testing.assert_close(on, off)
    assert (slot.offset, slot.offset + slot.numel) in sliced


def test_embedding_subclass_with_its_own_forward_keeps_it():
    class Scaled(nn.Embedding):
        def forward(self, input):
            return super().forward(input) * 3.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = Scaled(20, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, ids):
            return self.out(self.emb(ids)).sum()

    torch.manual_seed(0)
    net = Net()
    ids = torch.tensor([[1, 2, 2, 5]])
    before = net(ids).detach()
    engine = hs.reparameterize(net, 10, "hashing")
    torch.testing.assert_close(net(ids), before)
    with torch.no_grad():
        engine.coeffs["default"].fill_(0.3)
    expected = net.out(3.0 * net.emb.weight[ids]).sum()  # the scaled forward, with θ0 + δ
    torch.testing.assert_close(net(ids), expected)
