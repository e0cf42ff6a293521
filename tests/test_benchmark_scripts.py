"""The benchmark scripts' own helpers (the scripts themselves are run by hand; see benchmarks/)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import twa_variants  # noqa: E402
from hf_subspace.twa import SnapshotStore  # noqa: E402


def test_subset_takes_every_nth_snapshot_from_start():
    store = SnapshotStore()
    for step in range(10, 110, 10):
        store.add({"w": torch.full((2,), float(step))}, step=step)
    sub = twa_variants.subset(store, start=2, every=3)
    assert sub.steps == [30, 60, 90]
    assert [float(sub[i]["w"][0]) for i in range(len(sub))] == [30.0, 60.0, 90.0]
    with pytest.raises(ValueError, match="start must be in"):
        twa_variants.subset(store, start=10, every=1)
    with pytest.raises(ValueError, match="every"):
        twa_variants.subset(store, start=0, every=0)


@pytest.mark.parametrize("variants, message", [
    ('[{"args": {"twa_lr": 1}}]', "unknown TWA settings"),
    ('{"start": 1}', "JSON list of objects"),
    ("[{start: 1}]", "not valid JSON"),
])
def test_variants_are_checked_before_any_training(variants, message, capsys):
    with pytest.raises(SystemExit):
        twa_variants.parse_args(["--variants", variants])
    assert message in capsys.readouterr().err


def test_variant_fields_are_trainer_fields():
    from hf_subspace import TWATrainingArguments

    fields = TWATrainingArguments.__dataclass_fields__
    assert set(twa_variants.PHASE_FIELDS) <= set(fields)


def test_comm_paper_rows_are_payloads_and_ring_times():
    import bench_comm

    rows = {(r[0], r[1]): r for r in bench_comm.paper_rows()}
    full7b = rows[("Llama-2-7B", "full fine-tuning, fp32 gradients")]
    assert full7b[2] == "27 GB"  # 4 bytes × 6.74e9
    # ring all-reduce over 8 GPUs: 2·7/8 × 26.95 GB at 12.5 GB/s = 3.77 s
    assert full7b[3] == "3.77 s"
    assert rows[("Llama-2-70B", "hf_subspace d=10k")][2] == "40 KB"
    assert rows[("Llama-2-7B", "LoRA r=8 (q,v)")][2] == "16.8 MB"  # 32 layers × 8 × (4096·2 + 4096·2) × 4 B


def test_comm_fsdp2_paper_rows_shard_theta0_over_the_gpus():
    import bench_comm

    rows = {(r[0], r[1]): r for r in bench_comm.fsdp_paper_rows()}
    assert rows[("Llama-2-7B", "8")][2] == "1.68 GB"  # 2 bytes × 6.74e9 / 8
    assert rows[("Llama-2-70B", "64")][2] == "2.16 GB"  # 2 bytes × 6.9e10 / 64
    # two 70B decoder layers (855.7M weights each) + embedding and head (32,000 × 8,192 each), bf16
    assert rows[("Llama-2-70B", "8")][3] == "4.47 GB"
    assert rows[("Llama-2-7B", "8")][7] == "40 KB"  # c's gradient, whatever the model
    # the forward gathers all of θ0, the backward the decoder layers again: 2·(2D − 2·emb − norm) bytes
    assert rows[("Llama-2-7B", "8")][6] == "26.4 GB"
