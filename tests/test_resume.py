"""Interrupted and resumed runs end bit-identical (on CPU) to uninterrupted ones: a random subspace, and one-run TWA
interrupted in its ordinary phase (with its snapshots kept, in memory or on disk) or in its TWA phase."""
import json
import os

import pytest
import torch
from transformers import TrainerCallback

from hf_subspace.trainer import SubspaceTrainer, last_complete_checkpoint
from hf_subspace.twa import TWATrainer

from conftest import tiny_bert_cls, tiny_resnet
from test_trainer import args, image_dataset, text_dataset, twa_args


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raise at the start of step ``step + 1`` of the phase whose output_dir ends with ``phase`` (the run stops
    after step ``step`` and the checkpoints saved up to it)."""

    def __init__(self, step, phase=""):
        self.step, self.phase = step, phase

    def on_step_begin(self, a, state, control, **kwargs):
        in_twa = os.path.basename(os.path.normpath(a.output_dir)) == "twa"
        if in_twa == (self.phase == "twa") and state.global_step == self.step:
            raise Interrupted(f"killed after step {self.step}")


def subspace_run(out, callbacks=(), resume=None):
    a = args(str(out), subspace_dim=100, max_steps=6, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    t = SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset(), callbacks=list(callbacks))
    t.train(resume_from_checkpoint=resume)
    return t


def test_random_subspace_interrupted_and_resumed_is_bit_identical(tmp_path):
    straight = subspace_run(tmp_path / "a").model.base_model.subspace.coeffs["default"].detach().clone()
    with pytest.raises(Interrupted):
        subspace_run(tmp_path / "b", [InterruptAt(5)])
    assert last_complete_checkpoint(str(tmp_path / "b")).endswith("checkpoint-4")
    os.makedirs(tmp_path / "b" / "checkpoint-6")  # a checkpoint a kill cut short: no trainer_state.json
    (tmp_path / "b" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = subspace_run(tmp_path / "b", resume=True)
    c = resumed.model.base_model.subspace.coeffs["default"]
    assert torch.equal(c, straight)
    assert resumed.state.global_step == 6


def twa_run(out, storage="memory", callbacks=(), resume=None):
    a = twa_args(str(out), num_train_epochs=2, learning_rate=0.05, twa_snapshot_steps=2,
                 twa_snapshot_storage=storage, save_strategy="steps", save_steps=4, twa_epochs=1, twa_learning_rate=0.5)
    t = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=list(callbacks))
    t.train(resume_from_checkpoint=resume)
    return t


def final_state(trainer):
    return ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            trainer.twa_result.coefficients.clone())


@pytest.fixture(scope="module")
def straight_twa(tmp_path_factory):
    return final_state(twa_run(tmp_path_factory.mktemp("straight")))


def assert_same(got, want):
    weights, coefficients = got
    assert torch.equal(coefficients, want[1])
    assert weights.keys() == want[0].keys()
    for k in weights:  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(weights[k], want[0][k]), k


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_twa_interrupted_in_its_ordinary_phase_keeps_its_snapshots(tmp_path, straight_twa, storage):
    with pytest.raises(Interrupted):
        twa_run(tmp_path, storage, [InterruptAt(10)])  # 16 ordinary steps; checkpoint-8 is the last
    manifest = json.loads((tmp_path / "checkpoint-8" / "twa_snapshots.json").read_text())
    assert [s["step"] for s in manifest["snapshots"]] == [2, 4, 6, 8]
    assert (tmp_path / "twa_snapshots" / manifest["snapshots"][0]["file"]).is_file()
    resumed = twa_run(tmp_path, storage, resume=True)
    assert resumed.snapshot_callback.store.steps == list(range(2, 17, 2))  # 4 kept, 4 retaken, none twice
    assert resumed.twa_result.num_snapshots == 8
    assert_same(final_state(resumed), straight_twa)


def test_twa_interrupted_in_its_twa_phase(tmp_path, straight_twa):
    with pytest.raises(Interrupted):
        twa_run(tmp_path, callbacks=[InterruptAt(5, phase="twa")])  # 8 TWA-phase steps; twa/checkpoint-4 the last
    assert (tmp_path / "twa" / "checkpoint-4" / "twa_coefficients.safetensors").is_file()
    assert not (tmp_path / "twa" / "checkpoint-4" / "model.safetensors").exists()  # c, not the model

    class OrdinarySteps(TrainerCallback):
        seen = 0

        def on_step_end(self, a, state, control, **kwargs):
            if os.path.basename(os.path.normpath(a.output_dir)) != "twa":
                OrdinarySteps.seen += 1

    resumed = twa_run(tmp_path, callbacks=[OrdinarySteps()], resume=True)
    assert OrdinarySteps.seen == 0  # the ordinary phase was over: not redone
    assert_same(final_state(resumed), straight_twa)


def test_twa_phase_checkpoints_of_an_earlier_phase_are_not_resumed(tmp_path, straight_twa):
    """A TWA phase redone from an ordinary checkpoint gets a new phase id; the old phase's later checkpoints (here
    a fake twa/checkpoint-99) are passed over by resume_from_checkpoint=True."""
    with pytest.raises(Interrupted):
        twa_run(tmp_path, callbacks=[InterruptAt(5, phase="twa")])
    stale = tmp_path / "twa" / "checkpoint-99"
    stale.mkdir()
    for name in ("trainer_state.json", "twa_coefficients.safetensors"):
        (stale / name).write_bytes((tmp_path / "twa" / "checkpoint-4" / name).read_bytes())
    (stale / "twa_phase.json").write_text(json.dumps({"id": "an-older-phase"}))
    assert_same(final_state(twa_run(tmp_path, resume=True)), straight_twa)


def test_a_fresh_disk_run_refuses_the_snapshots_of_an_earlier_one(tmp_path):
    with pytest.raises(Interrupted):
        twa_run(tmp_path, "disk", [InterruptAt(3)])
    with pytest.raises(ValueError, match="holds TWA snapshots of an earlier one-run TWA.*resume_from_checkpoint=True"):
        twa_run(tmp_path, "disk")


KILLED_CHILD = r"""
import sys, time
import torch
torch.set_num_threads({threads})  # as the parent: another thread count may sum in another order
sys.path[:0] = [{tests!r}]
from transformers import TrainerCallback
import test_resume

class Slow(TrainerCallback):
    def on_step_end(self, a, state, control, **kwargs):
        time.sleep(0.3)  # the parent kills us somewhere after checkpoint-4

test_resume.subspace_run({out!r}, [Slow()])
"""


def test_a_run_killed_with_sigkill_resumes_bit_identically(tmp_path):
    """No exception handler runs on SIGKILL: whatever the kill leaves, resume_from_checkpoint=True continues from
    the newest complete checkpoint and ends where an uninterrupted run does."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    code = KILLED_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out),
                               threads=torch.get_num_threads())
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "checkpoint-6").exists()
    straight = subspace_run(tmp_path / "straight").model.base_model.subspace.coeffs["default"]
    resumed = subspace_run(out, resume=True).model.base_model.subspace.coeffs["default"]
    assert torch.equal(resumed, straight)


def test_per_epoch_snapshots_survive_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    """The default per-epoch snapshot is taken at the epoch's last step, before that step's checkpoint: a run
    resumed from checkpoint-8 (the end of epoch 1) keeps it instead of losing it."""
    def run(out, callbacks=(), resume=None):
        a = twa_args(str(out), num_train_epochs=3, learning_rate=0.05, save_strategy="steps", save_steps=4,
                     twa_epochs=1, twa_learning_rate=0.5)
        t = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=list(callbacks))
        t.train(resume_from_checkpoint=resume)
        return t

    straight = run(tmp_path / "a")
    assert straight.snapshot_callback.store.steps == [8, 16, 24]
    with pytest.raises(Interrupted):
        run(tmp_path / "b", [InterruptAt(10)])
    manifest = json.loads((tmp_path / "b" / "checkpoint-8" / "twa_snapshots.json").read_text())
    assert [s["step"] for s in manifest["snapshots"]] == [8]
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.snapshot_callback.store.steps == [8, 16, 24]
    assert_same(final_state(resumed), final_state(straight))


def test_a_fresh_run_refuses_an_earlier_runs_twa_phase_record(tmp_path):
    """A completed one-run TWA left twa/phase.json and twa_snapshots/: a new run into the same folder would mix
    them with its own (and a later resume would take the old phase), so it is refused; nothing is deleted."""
    twa_run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "twa_snapshots").iterdir())
    with pytest.raises(ValueError, match="an earlier one-run TWA in this output_dir.*resume_from_checkpoint=True"):
        twa_run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "twa_snapshots").iterdir()) == before
    assert (tmp_path / "twa" / "phase.json").is_file()


@pytest.mark.parametrize("change,words", [({"subspace_seed": 5}, "seed=0 there but 5 here"),
                                          ({"subspace_dim": 64}, "dim=100 there but 64 here"),
                                          ({"subspace_projection": "fastfood"}, "projection='hashing' there")])
def test_resuming_with_other_subspace_settings_is_refused(tmp_path, change, words):
    from hf_subspace import AdapterMismatchError

    with pytest.raises(Interrupted):
        subspace_run(tmp_path, [InterruptAt(3)])
    a = args(str(tmp_path), **{**dict(subspace_dim=100, max_steps=6, save_strategy="steps", save_steps=2,
                                      learning_rate=1e-2), **change})
    t = SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset())
    with pytest.raises(AdapterMismatchError, match=rf"checkpoint-2 holds adapter 'default' trained with other "
                                                   rf"subspace settings \({words}.*Resume with the settings"):
        t.train(resume_from_checkpoint=True)


def per_epoch_twa(out, callbacks=(), resume=None, **kw):
    a = twa_args(str(out), learning_rate=0.05, twa_epochs=1, twa_learning_rate=0.5, **kw)
    t = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=list(callbacks))
    t.train(resume_from_checkpoint=resume)
    return t


def test_a_run_ending_mid_epoch_lists_its_last_snapshot_and_resumes_from_any_checkpoint(tmp_path):
    """8 steps per epoch, max_steps=12: per-epoch snapshots at 8 and 12 (the run's end, before its checkpoint is
    saved); a resume from checkpoint-7 is not refused by the early 2-snapshot check and ends the same."""
    kw = dict(max_steps=12, save_strategy="steps", save_steps=7)
    straight = per_epoch_twa(tmp_path / "a", **kw)
    assert straight.snapshot_callback.store.steps == [8, 12]
    last = json.loads((tmp_path / "a" / "checkpoint-12" / "twa_snapshots.json").read_text())
    assert [s["step"] for s in last["snapshots"]] == [8, 12]
    with pytest.raises(Interrupted):
        per_epoch_twa(tmp_path / "b", [InterruptAt(9)], **kw)
    resumed = per_epoch_twa(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-7"), **kw)
    assert resumed.snapshot_callback.store.steps == [8, 12]
    assert_same(final_state(resumed), final_state(straight))


def test_the_early_snapshot_check_counts_a_fractional_last_epoch(tmp_path):
    """1.5 epochs of 8 steps from step 7: snapshots at 8 and 12, so the run is not refused."""
    t = per_epoch_twa(tmp_path, num_train_epochs=1.5, twa_snapshot_start_step=7)
    assert t.snapshot_callback.store.steps == [8, 12]


def test_an_iterable_dataset_does_not_stall_the_early_check(tmp_path):
    """Its epochs have no known length (the Trainer sets num_train_epochs to sys.maxsize): the check stands aside
    and training starts."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            for item in image_dataset():
                yield {k: v for k, v in item.items()}

    class StopAtOne(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            raise Interrupted("started")

    a = twa_args(str(tmp_path), max_steps=4)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=Stream(), callbacks=[StopAtOne()])
    with pytest.raises(Interrupted, match="started"):
        trainer.train()
