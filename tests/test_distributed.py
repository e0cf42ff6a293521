"""Several processes (torchrun, 2 CPU processes over gloo): DDP sends only c, ranks must build the same P, FSDP2
shards θ0 and keeps c replicated (FSDP1, ZeRO-3 and TWA under FSDP refused). One torchrun launch runs every
scenario of tests/distributed_worker.py; the 1-process twin runs here.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import hf_subspace as hs
from hf_subspace.distributed import (fingerprint_differences, projection_fingerprint, refuse_sharded_training,
                                     sharding_in_use)
from benchmarks._comm import CommCounter

import distributed_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
HEAD = 32 * 2 + 2  # the tiny BERT's classifier (modules_to_save of SEQ_CLS)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both ranks' results of every scenario (one ``torchrun --nproc_per_node 2`` launch)."""
    out = str(tmp_path_factory.mktemp("distributed"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "distributed_worker.py"), out]  # --standalone: a free port of its own
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    for r, res in enumerate(ranks):
        for name, got in res.items():
            assert "crashed" not in got, f"rank {r}, scenario {name}:\n{got.get('crashed')}"
    return SimpleNamespace(out=out, ranks=ranks)


def test_two_processes_train_as_one_on_the_same_global_batches(launched, tmp_path):
    """DDP over 2 processes × 4 examples = 1 process × 8 examples, step for step: c and the head agree."""
    one = worker.train(str(tmp_path), world_size=1, subspace_dim=worker.DIM)
    ref = worker.subspace_state(one)
    two = torch.load(os.path.join(launched.out, "subspace.pt"))
    assert ref["c"].abs().max() > 1e-4  # it trained
    torch.testing.assert_close(two["c"], ref["c"], rtol=0, atol=1e-5)
    assert set(two["head"]) == set(ref["head"])
    for name in ref["head"]:
        torch.testing.assert_close(two["head"][name], ref["head"][name], rtol=0, atol=1e-5)
    losses = [h["loss"] for h in one.state.log_history if "loss" in h]
    assert launched.ranks[0]["subspace"]["losses"] == pytest.approx(losses, abs=1e-5)


def test_an_accelerate_loop_of_ones_own_trains_as_one_process(launched):
    """accelerate's prepare + hf_subspace.check_projections_match + a plain loop: the same c as one process, and
    DDP all-reduces c and the head only."""
    c_one, losses_one = worker.accelerate_loop(world_size=1)
    c_two = torch.load(os.path.join(launched.out, "accelerate_c.pt"))
    assert c_one.abs().max() > 1e-4
    torch.testing.assert_close(c_two, c_one, rtol=0, atol=1e-5)
    got = launched.ranks[0]["accelerate"]
    assert got["losses"] == pytest.approx(losses_one, abs=1e-5)
    assert got["syncs"] == [4 * (worker.DIM + HEAD)] * worker.STEPS


@pytest.mark.parametrize("basis", ["sharded", "whole"])
def test_two_process_twa_trains_as_one(launched, tmp_path, basis):
    """One-run TWA under DDP equals one process: the same snapshots on both ranks, the same basis (sharded by
    coordinates over the ranks, or whole on each), the same coefficients and merged weights."""
    one = worker.twa_state(worker.train_twa(str(tmp_path), world_size=1))
    two = torch.load(os.path.join(launched.out, f"twa-{basis}.pt"))
    assert two["k"] == one["k"] == 3  # 4 snapshots, centered
    assert one["coefficients"].abs().max() > 1e-4
    torch.testing.assert_close(two["coefficients"], one["coefficients"], rtol=0, atol=1e-5)
    for name in one["weights"]:
        torch.testing.assert_close(two["weights"][name], one["weights"][name], rtol=0, atol=1e-5)
    got = launched.ranks[0]["twa" if basis == "sharded" else "twa_whole"]
    # DDP: the ordinary phase all-reduces all of θ, the TWA phase the k coefficients' gradient
    assert got["syncs"] == [4 * got["D"]] * worker.STEPS + [4 * got["k"]] * worker.STEPS


def test_two_process_post_hoc_twa_from_checkpoints_trains_as_one(launched, tmp_path):
    one = worker.twa_state(worker.train_posthoc(str(tmp_path), world_size=1))
    two = torch.load(os.path.join(launched.out, "posthoc.pt"))
    assert two["k"] == one["k"] == 3  # 4 checkpoints
    assert launched.ranks[1]["posthoc"]["basis_bytes_per_rank"] is not None  # the sharded path
    torch.testing.assert_close(two["coefficients"], one["coefficients"], rtol=0, atol=1e-5)
    for name in one["weights"]:
        torch.testing.assert_close(two["weights"][name], one["weights"][name], rtol=0, atol=1e-5)


def test_twa_of_a_batchnorm_model_ends_with_the_same_model_on_every_rank(launched):
    """Each rank recalibrates BatchNorm on its share of the data; the statistics are then averaged over the ranks."""
    r0, r1 = launched.ranks[0]["twa_batchnorm"], launched.ranks[1]["twa_batchnorm"]
    assert len(r0["buffers"]) >= 4
    assert r0["buffers"] == r1["buffers"]
    assert r0["weights"] == r1["weights"]


def test_sharded_twa_basis_holds_half_per_rank_and_what_each_step_sends(launched):
    k, D = launched.ranks[0]["twa"]["k"], launched.ranks[0]["twa"]["D"]
    half = -(-D // 2)
    for r in range(2):
        got = launched.ranks[r]["twa"]
        assert got["basis_bytes_per_rank"] == 4 * k * half  # k directions for ⌈D/2⌉ coordinates: 1/2 of the whole
        # per TWA step: one all-gather of θ's delta (P c) and one reduce-scatter of the gradient, D floats each
        ag, rs = got["outside"]["all_gather_single"], got["outside"]["reduce_scatter_single"]
        assert set(ag) == {4 * 2 * half} and len(rs) == worker.STEPS and set(rs) == {4 * 2 * half}
    assert launched.ranks[0]["twa"]["basis_rank0"] == [k, D]  # gathered on rank 0 at the end, for saving


def test_ddp_sends_4d_bytes_per_step_for_a_subspace_and_4D_for_full_fine_tuning(launched):
    sub, full = launched.ranks[0]["subspace"], launched.ranks[0]["full"]
    assert sub["trainable"] == worker.DIM + HEAD
    assert sub["syncs"] == [4 * (worker.DIM + HEAD)] * worker.STEPS  # c + the head, every step, nothing else
    D = full["trainable"]  # every weight of the model
    assert D > 19_000 and full["syncs"] == [4 * D] * 2
    assert full["syncs"][0] / sub["syncs"][0] > 150
    # outside DDP's gradient buckets: one broadcast of the whole model when DDP is built (θ0 included), then only
    # the buffers (BERT's position_ids / token_type_ids, int64) before each forward
    broadcasts = sub["counter"]["outside"]["_broadcast_coalesced"]
    first, then = broadcasts["first_calls"][0], broadcasts["first_calls"][1:]
    assert first >= 4 * D and all(b < 2048 for b in then)
    assert launched.ranks[1]["subspace"]["syncs"] == sub["syncs"]


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(launched):
    """The skip decision is all-reduced: rank 0 skips the step rank 1 found bad, and the ranks stay equal."""
    got = [launched.ranks[r]["nonfinite"] for r in range(2)]
    assert got[0]["skipped"] == got[1]["skipped"] == [2]
    assert got[0]["c"] == got[1]["c"]


def test_ranks_that_built_different_projections_fail_with_the_clear_error(launched):
    for r in range(2):  # every rank raises, not only the one that differs
        got = launched.ranks[r]["mismatch"]
        assert got["same"] is None
        assert "rank 1 has adapter 'default': seed=1 where rank 0 has seed=0" in got["seed"]
        assert "same seed" in got["seed"] and "hf_subspace and torch versions" in got["seed"]
        assert "d=51 where rank 0 has d=50" in got["dim"]
        assert "another θ (layout hash" in got["theta"] and "target_modules" in got["theta"]
        assert "the same (kind, D, d, seed, format) but other entries of P" in got["entries"]


def test_the_trainer_stops_at_the_start_when_seeds_differ(launched):
    for r in range(2):
        got = launched.ranks[r]["trainer_seed"]
        assert got["error"] == "ProjectionMismatchError"
        assert "seed=1 where rank 0 has seed=0" in got["message"]


@pytest.mark.parametrize("case", worker.FSDP_CASES, ids=lambda case: worker.fsdp_case_name(*case))
def test_fsdp2_training_equals_one_process(launched, case):
    """hf_subspace.shard_model on 2 processes (θ0 sharded; a tied embedding and head one unit; with and without
    resharding after the forward; with activation checkpointing; with 2 micro-batches accumulated) = 1 process on
    the same global batches, with gradient clipping that acts every step (c's gradient is averaged before it)."""
    kind, mode, reshard, tied, checkpointing, micro = case
    name = worker.fsdp_case_name(*case)
    _, one = worker.fsdp_loop(kind, mode, 1, tied=tied)  # one process: no sharding, no checkpointing
    two = torch.load(os.path.join(launched.out, "fsdp_train.pt"))[name]
    assert one["c"].abs().max() > 1e-3 and set(two) == set(one) == ({"c", "scales"} if mode == "said" else {"c"})
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    r0, r1 = launched.ranks[0]["fsdp_train"][name], launched.ranks[1]["fsdp_train"][name]
    assert r0["c"] == r1["c"]  # replicas, bit for bit
    # each decoder layer its own unit, the embedding and the head (one unit of two modules when tied), the root
    assert r0["units"] == ["FSDPLlamaDecoderLayer"] * 2 + ["FSDPParametrizedEmbedding", "FSDPParametrizedLinear",
                                                           "FSDPPeftModel"]
    assert r0["groups"] == (4 if tied else 5)  # 2 layers, embedding + head (one group when tied), the root
    assert r0["vectors"] == [["TrackedParameter", "torch.float32"]] * (2 if mode == "said" else 1)  # not DTensors
    assert r0["theta0_local"] * 2 == r0["theta0_whole"] and r0["cache"] is False


def test_fsdp2_through_accelerate_trains_saves_on_rank0_and_loads_on_one_process(launched):
    """accelerate's FSDP2 plugin + prepare (what `accelerate launch` with fsdp_version: 2 runs) trains as one
    process; rank 0 writes c alone; loaded on 1 process the adapter gives the sharded model's logits; the plain
    state dict and the base fingerprint come from the shards."""
    from peft import PeftModel

    from hf_subspace.fingerprint import fingerprint_tensors, fingerprints_match

    r0, r1 = launched.ranks[0]["fsdp_accelerate"], launched.ranks[1]["fsdp_accelerate"]
    assert r0["units"] == ["FSDPLlamaDecoderLayer"] * 2 + ["FSDPParametrizedEmbedding", "FSDPParametrizedLinear",
                                                           "FSDPPeftModel"]
    assert r0["vectors"] == [["TrackedParameter", "torch.float32"]] * 2
    got = torch.load(os.path.join(launched.out, "fsdp_acc.pt"))
    _, one = worker.fsdp_loop("hashing", "said", 1)
    for name in one:
        torch.testing.assert_close(got["vectors"][name], one[name], rtol=0, atol=1e-5)
    assert r0["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert r0["adapter_bytes"] < 4 * (worker.FSDP_DIM + 100) + 1024  # c and λ, not θ
    loaded = PeftModel.from_pretrained(worker.tiny_llama(), os.path.join(launched.out, "fsdp_adapter"))
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor(worker.FSDP_IDS)).logits
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-5)
    plain = hs.plain_state_dict(loaded)
    assert set(r0["plain_types"].values()) == {"DTensor"}
    for key, value in got["plain"].items():
        torch.testing.assert_close(value, plain["base_model.model." + key], rtol=0, atol=1e-6)
    assert torch.equal(got["plain"]["lm_head.weight"], got["plain"]["model.embed_tokens.weight"])
    # the fingerprint from the shards: the same on both ranks, and it fits the whole θ0 on one process
    assert r0["fingerprint_matches"] and r1["fingerprint_matches"] and r0["fingerprint"] == r1["fingerprint"]
    engine = hs.find_engine(loaded)
    whole = [engine.original(s.name) for s in engine.adapters["default"].layout.slots]
    assert fingerprints_match(r0["fingerprint"], whole)
    assert fingerprint_tensors(whole).split(":")[:2] == r0["fingerprint"].split(":")[:2]
    # ‖θ0‖² from the shards (the Trainer's learning-rate check reads it): the whole model's, on every rank
    from hf_subspace.fsdp import sum_of_squares

    assert r0["theta0_sum_of_squares"] == r1["theta0_sum_of_squares"] == pytest.approx(sum_of_squares(whole), rel=1e-12)


def test_fsdp2_bf16_policy_keeps_c_a_float32_replica(launched):
    r0, r1 = launched.ranks[0]["fsdp_accelerate"], launched.ranks[1]["fsdp_accelerate"]
    assert r0["bf16_vectors"] == [["TrackedParameter", "torch.float32"]] * 2
    assert r0["bf16_c"] == r1["bf16_c"] and max(abs(v) for v in r0["bf16_c"]) > 1e-3
    assert r0["bf16_units"] == r0["units"]


def test_fsdp2_through_the_subspace_trainer_equals_one_process(launched, tmp_path):
    """SubspaceTrainer with fsdp=True, fsdp_config={'version': 2} (PEFT's wrap policy is replaced by
    decoder-layer units); gradient clipping (max_grad_norm) acts; save_model on rank 0 writes the adapter; a
    checkpoint is the adapter and c's optimizer state, and resuming from it gives the same c."""
    one = worker.train_llama(str(tmp_path), 1)
    ref = worker.vectors(one.model)
    two = torch.load(os.path.join(launched.out, "fsdp_trainer.pt"))
    for name in ref:
        torch.testing.assert_close(two[name], ref[name], rtol=0, atol=1e-5)
    r0 = launched.ranks[0]["fsdp_trainer"]
    assert r0["units"].count("FSDPLlamaDecoderLayer") == 2
    losses = [h["loss"] for h in one.state.log_history if "loss" in h]
    assert r0["losses"] == pytest.approx(losses, abs=1e-5)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(launched.out, "fsdp_trainer_adapter", "adapter_model.safetensors"))
    assert {k: v.numel() for k, v in saved.items()} == {"base_model.subspace.coeffs": ref["c"].numel(),
                                                        "base_model.subspace.scales": ref["scales"].numel()}
    torch.testing.assert_close(saved["base_model.subspace.coeffs"], ref["c"], rtol=0, atol=1e-5)
    # the half-way checkpoint holds the adapter and c's optimizer state, not θ0; resuming from it ends at the same c
    assert "adapter_model.safetensors" in r0["checkpoint"] and "optimizer.pt" in r0["checkpoint"]
    assert not any("fsdp" in name for name in r0["checkpoint"])
    assert r0["resumed_c"] == r0["c"] and launched.ranks[1]["fsdp_trainer"]["resumed_c"] == r0["c"]


def test_what_fsdp_still_refuses(launched):
    for r in range(2):
        got = launched.ranks[r]["fsdp_refusals"]
        for where in ("function", "trainer"):  # fully_shard by hand put c into the root group
            assert "sharded into an FSDP group" in got[where] and "hf_subspace.shard_model" in got[where]
        assert "merging a subspace adapter under FSDP is unsupported" in got["merge"]
        assert "TWA is refused under FSDP2" in got["twa"] and "multi_gpu.yaml" in got["twa"]
        assert got["mismatch"].startswith("ProjectionMismatchError")
        assert "rank 1 has adapter 'default': seed=1 where rank 0 has seed=0" in got["mismatch"]
        assert got["same"] is None
        assert "sharded into an FSDP group" in got["check"]
    # fully_shard by hand with c in ignored_params: after check_projections_match c's gradient is averaged
    g0, g1 = (launched.ranks[r]["fsdp_refusals"]["by_hand_grad"] for r in range(2))
    assert g0 == g1 and max(abs(v) for v in g0) > 0 and launched.ranks[0]["fsdp_refusals"]["by_hand_cache"] is False


# ------------------------------------------------------------------------------------------------------------
# one process
# ------------------------------------------------------------------------------------------------------------
def _state(kind, **kw):
    return SimpleNamespace(distributed_type=SimpleNamespace(value=kind), fsdp_plugin=None, deepspeed_plugin=None, **kw)


def test_accelerate_fsdp1_and_zero3_are_refused_fsdp2_passes_zero12_warned(caplog):
    assert sharding_in_use(accelerator=_state("MULTI_GPU")) is None
    assert sharding_in_use(accelerator=_state("FSDP")) == "FSDP"
    fsdp1 = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"), deepspeed_plugin=None,
                            fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(ValueError, match="refused under FSDP \\(version 1\\).*fsdp2.yaml"):
        refuse_sharded_training(accelerator=fsdp1)
    fsdp2 = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"), deepspeed_plugin=None,
                            fsdp_plugin=SimpleNamespace(fsdp_version=2))
    refuse_sharded_training(accelerator=fsdp2)  # FSDP2 trains
    with pytest.raises(ValueError, match="TWA is refused under FSDP2.*multi_gpu.yaml"):
        refuse_sharded_training(accelerator=fsdp2, what="TWA")
    zero3 = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"), fsdp_plugin=None,
                            deepspeed_plugin=SimpleNamespace(zero_stage=3))
    assert sharding_in_use(accelerator=SimpleNamespace(state=zero3)) == "DeepSpeed ZeRO-3"
    with pytest.raises(ValueError, match="refused under DeepSpeed ZeRO-3.*MULTI_GPU"):
        refuse_sharded_training(accelerator=zero3)
    zero2 = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"), fsdp_plugin=None,
                            deepspeed_plugin=SimpleNamespace(zero_stage=2))
    with caplog.at_level("WARNING", logger="hf_subspace.distributed"):
        refuse_sharded_training(accelerator=zero2)
    assert "untested" in caplog.text


def test_one_process_check_returns_the_fingerprint():
    from peft import get_peft_model

    model = get_peft_model(worker.tiny_bert(), hs.SubspaceConfig(dim=40, projection="fastfood", task_type="SEQ_CLS"))
    fp = hs.check_projections_match(model)
    assert fp == projection_fingerprint(model)
    ad = fp["adapters"]["default"]
    from hf_subspace.projections import latest_format

    assert (ad["kind"], ad["d"], ad["seed"]) == ("fastfood", 40, 0) and len(ad["entries"]) == 24
    assert ad["format"] == model.peft_config["default"].projection_format == latest_format("fastfood")
    again = projection_fingerprint(get_peft_model(worker.tiny_bert(), hs.SubspaceConfig(
        dim=40, projection="fastfood", task_type="SEQ_CLS")))
    assert fingerprint_differences(fp, again) == []
    other = projection_fingerprint(get_peft_model(worker.tiny_bert(), hs.SubspaceConfig(
        dim=40, projection="fastfood", seed=3, task_type="SEQ_CLS")))
    assert fingerprint_differences(fp, other) == ["adapter 'default': seed=3 where rank 0 has seed=0"]


def test_comm_counter_outside_ddp_counts_and_restores():
    import torch.distributed as dist

    counter = CommCounter()
    original = dist.all_reduce
    with counter.counting():
        assert dist.all_reduce is not original
    assert dist.all_reduce is original
    assert counter.summary()["ddp_syncs"] == 0


def test_sharded_basis_on_one_process_is_the_whole_basis():
    from hf_subspace.twa import build_trajectory_basis
    from hf_subspace.twa.sharded import build_sharded_trajectory_basis

    g = torch.Generator().manual_seed(0)
    snaps = [{"a": torch.randn(7, 5, generator=g), "b": torch.randn(11, generator=g)} for _ in range(5)]
    whole = build_trajectory_basis(snaps, chunk_size=8)
    sharded = build_sharded_trajectory_basis(snaps, chunk_size=8)
    assert torch.equal(sharded.projection.shard, whole.basis) and sharded.k == whole.k == 4
    assert all(torch.equal(sharded.mean[n], whole.mean[n]) for n in whole.names)
    c, v = torch.randn(4, generator=g), torch.randn(46, generator=g)
    torch.testing.assert_close(sharded.projection.matvec(c), whole.projection.matvec(c))
    torch.testing.assert_close(sharded.projection.rmatvec(v), whole.projection.rmatvec(v))
    with pytest.raises(ValueError, match="sharded over 1 processes"):
        sharded.projection.basis


def test_shard_model_refuses_what_it_cannot_shard_and_finds_the_decoder_layers():
    from peft import get_peft_model

    from hf_subspace.fsdp import decoder_layers, refuse_unsupported

    model = worker.subspace_llama()
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert decoder_layers(model, ["LlamaMLP"]) == [m.mlp for m in layers]
    with pytest.raises(ValueError, match="needs a model with a subspace adapter"):
        hs.shard_model(worker.tiny_llama())
    with pytest.raises(ValueError, match="needs an initialized process group"):
        hs.shard_model(model)
    # a TWA (trajectory) adapter: refused under FSDP2 with what to use
    from hf_subspace.projections.trajectory import TrajectoryProjection

    twa = get_peft_model(worker.tiny_llama(), hs.SubspaceConfig(dim=40))
    state = hs.find_engine(twa).adapters["default"]
    state.projection = TrajectoryProjection.empty(state.layout.D, 40)
    with pytest.raises(ValueError, match="TWA \\(trajectory\\) basis, refused under FSDP2.*multi_gpu.yaml"):
        refuse_unsupported(twa)


def test_accelerates_fsdp2_preparation_hands_only_subspace_models_to_shard_model(monkeypatch):
    import accelerate.accelerator as acc_mod

    from hf_subspace import fsdp

    hooked = acc_mod.fsdp2_prepare_model
    assert hooked._hf_subspace and fsdp.install_accelerate_hook() and acc_mod.fsdp2_prepare_model is hooked
    seen = []
    monkeypatch.setattr(fsdp, "prepare_with_accelerate", lambda acc, model: seen.append(("ours", model)) or model)
    original = hooked.__defaults__[0]  # accelerate's own function, bound when the hook was installed
    monkeypatch.setattr(hooked, "__defaults__", (lambda acc, model: seen.append(("accelerate", model)) or model,))
    plain, sub = worker.tiny_llama(), worker.subspace_llama()
    assert hooked(None, plain) is plain and hooked(None, sub) is sub
    assert seen == [("accelerate", plain), ("ours", sub)]
    assert original.__module__.startswith("accelerate")
