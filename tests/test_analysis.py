"""Intrinsic-dimension sweeps and effective rank: the search on a task whose answer is known, the resumable results
file, the bootstrap, effective rank against hand-computed cases, and the CLI end to end."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_subspace.analysis import (ResultStore, ToyTask, bootstrap_interval, effective_rank, model_effective_ranks,
                                  run_sweep, suggest_dims, suggest_twa_k, trajectory_effective_rank)


# ---------------------------------------------------------------------------------------------------------------
# effective rank
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 17])
def test_effective_rank_of_the_identity_is_its_size(n):
    assert effective_rank(3.0 * torch.eye(n)) == pytest.approx(n, rel=1e-9)


def test_effective_rank_of_a_rank_one_matrix_is_one():
    # seeded, and in float64: in float32 the SVD's rounding leaves singular values ~1e-7 of the first, whose
    # entropy terms (p log p) add ~1e-6 — the test failed or passed with the random draw
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 1, generator=g, dtype=torch.float64), torch.randn(1, 7, generator=g, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_of_a_known_spectrum():
    # singular values 3, 1 -> p = (0.75, 0.25): erank = exp(-(0.75 ln 0.75 + 0.25 ln 0.25))
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    a = q[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ r[:, :2].T
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(a) == pytest.approx(expected, rel=1e-9)
    assert 1.0 < expected < 2.0


def test_effective_rank_edge_cases():
    assert effective_rank(torch.zeros(3, 5)) == 0.0
    conv = torch.randn(8, 3, 3, 3)  # read as 8 x 27
    assert 1.0 <= effective_rank(conv) <= 8.0
    with pytest.raises(ValueError, match="needs a matrix"):
        effective_rank(torch.ones(5))


def test_model_effective_ranks_lists_every_matrix():
    model = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.outer(torch.randn(6), torch.randn(10)))  # rank one
    rows = model_effective_ranks(model)
    assert [r["name"] for r in rows] == ["0.weight", "2.weight"]
    assert rows[0]["rank"] == 1  # numerical rank at float32 precision
    assert rows[0]["effective_rank"] == pytest.approx(1.0, abs=1e-4)  # float32 rounding leaves tiny singular values
    assert 0 < rows[1]["ratio"] <= 1


def test_trajectory_effective_rank_counts_the_directions_used():
    g = torch.Generator().manual_seed(0)
    base, (e1, e2) = torch.randn(50, generator=g), torch.linalg.qr(torch.randn(50, 2, generator=g))[0].T
    # four snapshots on a square in a 2-D plane: centered, two equal singular values
    snaps = [{"w": base + a * e1 + b * e2} for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    assert trajectory_effective_rank(snaps) == pytest.approx(2.0, rel=1e-6)
    assert suggest_twa_k(snaps) == 2
    line = [{"w": base + t * e1} for t in (0.0, 1.0, 2.0)]
    assert trajectory_effective_rank(line) == pytest.approx(1.0, abs=1e-4)  # float32 snapshots
    assert suggest_dims(2.0) == [1, 3, 10, 32, 100]


# ---------------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------------
def _toy_d90(task):
    """The exact smallest real d whose toy metric reaches 0.9 of the baseline at the best lr: the logistic curve
    1 / (1 + exp(-4 (log10 d - log10 center))) is 0.9 at log10 d = log10 center + ln(9) / 4."""
    return task.center * 10 ** (math.log(9) / 4)


def test_search_brackets_the_known_answer_and_picks_the_lr_on_validation(tmp_path):
    task = ToyTask(center=300.0, best_lr=1e-2)
    true_d = _toy_d90(task)  # ≈ 1,063
    s = run_sweep(task, dims=[10, 100, 1000, 10000], seeds=[0, 1], lrs=[1e-3, 1e-2, 1e-1], output_dir=tmp_path,
                  baseline=1.0, refine_steps=8, bootstrap=20, progress=False)
    assert s["target"] == pytest.approx(0.9)
    assert true_d <= s["d_int"] <= 1.05 * true_d  # bisection closes in from the 1,000 / 10,000 bracket
    chosen = {r["dim"]: r["lr"] for r in s["dims"]}
    assert set(chosen.values()) == {1e-2}  # the validation metric peaks at the best lr for every d
    misses = [r["dim"] for r in s["dims"] if not r["reaches_target"]]
    assert max(misses) < true_d  # the last miss lies below the answer


def test_absolute_target_and_unreachable_target(tmp_path):
    task = ToyTask(center=300.0)
    s = run_sweep(task, dims=[100, 1000], seeds=[0], lrs=[1e-2], output_dir=tmp_path / "a", absolute=0.5,
                  refine_steps=0, progress=False)
    assert s["target"] == 0.5 and s["d_int"] == 1000
    s = run_sweep(task, dims=[10, 100], seeds=[0], lrs=[1e-2], output_dir=tmp_path / "b", baseline=1.0,
                  refine_steps=2, progress=False)
    assert s["d_int"] is None and s["d_int_interval"]["high"] is None


def test_baseline_is_trained_when_not_given(tmp_path):
    task = ToyTask(baseline=0.8)
    s = run_sweep(task, dims=[100, 10000], seeds=[0, 1], lrs=[1e-2], output_dir=tmp_path, baseline_lrs=[1e-3],
                  refine_steps=0, progress=False)
    assert s["baseline"] == pytest.approx(0.8) and s["target"] == pytest.approx(0.72)
    assert s["baseline_lr"] == 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the results file
# ---------------------------------------------------------------------------------------------------------------
class _Interrupting(ToyTask):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def run(self, dim, seed, lr):
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().run(dim, seed, lr)


def test_interrupted_sweep_resumes_without_repeating_a_run(tmp_path):
    kwargs = dict(dims=[10, 100, 1000], seeds=[0, 1], lrs=[1e-2, 3e-2], output_dir=tmp_path, baseline=1.0,
                  refine_steps=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_Interrupting(after=5), **kwargs)
    assert len(ResultStore(tmp_path / "runs.jsonl")) == 5
    resumed = ToyTask()
    first = run_sweep(resumed, **kwargs)
    total = len(ResultStore(tmp_path / "runs.jsonl"))
    assert resumed.calls == total - 5  # only the missing runs
    again = ToyTask()
    assert run_sweep(again, **kwargs) == first and again.calls == 0  # a repeated command repeats nothing
    keys = [json.loads(line)["key"] for line in open(tmp_path / "runs.jsonl")]
    assert len(keys) == len(set(keys)) == total


def test_a_partial_last_line_is_dropped(tmp_path):
    store = ResultStore(tmp_path / "runs.jsonl")
    store.append({"key": "a", "task": "t", "dim": 1, "seed": 0, "lr": 0.1, "val_metric": 1, "test_metric": 1})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"key": "b", "task": "t", "di')  # killed mid-write
    reopened = ResultStore(tmp_path / "runs.jsonl")
    assert list(reopened.records) == ["a"]
    reopened.append({"key": "c", "task": "t", "dim": 2, "seed": 0, "lr": 0.1, "val_metric": 1, "test_metric": 1})
    assert [json.loads(line)["key"] for line in open(tmp_path / "runs.jsonl")] == ["a", "c"]


def test_a_killed_cli_sweep_resumes(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hf_subspace.cli", "intrinsic-dim", "--task", "toy", "-o", str(out),
           "--dims", "10,100,1000,10000", "--seeds", "0,1,2", "--lrs", "1e-2", "--baseline", "1.0",
           "--refine", "3"]
    env = {**os.environ, "HF_SUBSPACE_TOY_SLEEP": "0.3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not runs.exists() or runs.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = runs.read_text().count("\n")
    assert 3 <= done < 21
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_SUBSPACE_TOY_SLEEP": "0"})
    keys = [json.loads(line)["key"] for line in runs.read_text().splitlines()]
    assert len(keys) == len(set(keys)) > done
    assert json.loads((out / "summary.json").read_text())["d_int"] is not None


# ---------------------------------------------------------------------------------------------------------------
# the bootstrap
# ---------------------------------------------------------------------------------------------------------------
def test_bootstrap_is_degenerate_when_seeds_agree_and_spreads_when_they_do_not():
    agree = {10: {0: 0.5, 1: 0.5}, 100: {0: 0.95, 1: 0.95}}
    iv = bootstrap_interval(agree, lambda rng: 0.9, resamples=50)
    assert (iv["low"], iv["high"], iv["unreached"]) == (100, 100, 0)
    # at d = 10 one seed of two reaches the target: about half the resamples' means reach it
    split = {10: {0: 0.99, 1: 0.85}, 100: {0: 0.95, 1: 0.96}}
    iv = bootstrap_interval(split, lambda rng: 0.9, resamples=400, seed=1)
    assert (iv["low"], iv["high"]) == (10, 100)
    unreachable = {10: {0: 0.1}, 100: {0: 0.2}}
    iv = bootstrap_interval(unreachable, lambda rng: 0.9, resamples=10)
    assert iv["high"] is None and iv["unreached"] == 10


# ---------------------------------------------------------------------------------------------------------------
# the CLI on a real tiny task
# ---------------------------------------------------------------------------------------------------------------
def test_cli_intrinsic_dim_on_mnist_writes_json_csv_and_png(tmp_path):
    from hf_subspace.cli import main

    out = tmp_path / "fc"
    assert main(["intrinsic-dim", "--task", "mnist-fc", "-o", str(out), "--dims", "10,200", "--seeds", "0",
                 "--lrs", "3e-2", "--baseline", "auto", "--baseline_lrs", "3e-3", "--epochs", "3",
                 "--n_train", "600", "--refine", "1", "--bootstrap", "10", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = json.loads((out / "runs.json").read_text())
    assert {r["dim"] for r in runs} >= {"full", 10, 200}
    assert summary["baseline"] > 0.5  # direct training learns the digits
    assert (out / "runs.csv").read_text().splitlines()[0].startswith("dim,seed,lr,val_metric,test_metric")
    assert (out / "intrinsic_dim.png").stat().st_size > 10_000
    by_dim = {r["dim"]: r["mean"] for r in summary["dims"]}
    assert by_dim[200] > by_dim[10]  # a bigger subspace learns more
    if summary["d_int"] is not None:
        assert summary["compression"]["full_model_bytes"] == 4 * 199_210


def test_cli_effective_rank(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from hf_subspace.cli import main

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=16)).save_pretrained(tmp_path / "m")
    assert main(["effective-rank", str(tmp_path / "m"), "-o", str(tmp_path / "er")]) == 0
    report = json.loads((tmp_path / "er" / "effective_rank.json").read_text())
    assert any(r["name"].endswith("query.weight") for r in report["matrices"])
    assert (tmp_path / "er" / "effective_rank.png").stat().st_size > 5_000
    assert "erank" in capsys.readouterr().out


def test_a_chosen_lr_at_the_grid_edge_is_flagged(tmp_path):
    """The best lr lies above the grid: every d picks the grid's largest, and the summary says so (empty otherwise)."""
    task = ToyTask(center=300.0, best_lr=1.0)
    s = run_sweep(task, dims=[100, 1000], seeds=[0], lrs=[1e-3, 1e-2], output_dir=tmp_path / "a", baseline=1.0,
                  refine_steps=0, bootstrap=5, progress=False)
    assert [(e["dim"], e["lr"], e["edge"]) for e in s["lr_at_grid_edge"]] == [(100, 1e-2, "largest"),
                                                                               (1000, 1e-2, "largest")]
    assert s["metric"] == "toy metric"
    s = run_sweep(ToyTask(center=300.0, best_lr=1e-2), dims=[100, 1000], seeds=[0], lrs=[1e-3, 1e-2, 1e-1],
                  output_dir=tmp_path / "b", baseline=1.0, refine_steps=0, bootstrap=5, progress=False)
    assert s["lr_at_grid_edge"] == []
