"""Atomic saves: a process killed in the middle of a save leaves the previous files whole and loadable.

One child process starts four saves over good files (a subspace adapter twice, a disk snapshot, a sweep's results)
and blocks each one at a chosen moment: half of the weights written, half of a JSON line written, between the
rename of the weights and the rename of the config. When all four have reached their moment, the parent kills the
child with SIGKILL and checks what is on disk.
"""
import fnmatch
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import bert_batch, tiny_bert_cls

import hf_subspace as hs
from hf_subspace import atomic
from hf_subspace.analysis import ToyTask, run_sweep
from hf_subspace.analysis.sweep import RUNS_FILE, ResultStore
from hf_subspace.twa.snapshots import _FILE_RE, SnapshotStore

TESTS = os.path.dirname(os.path.abspath(__file__))
DIM = 16


def subspace_bert():
    from peft import get_peft_model

    return get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=DIM, task_type="SEQ_CLS"))


def set_coeffs(model, values):
    with torch.no_grad():
        hs.find_engine(model).coeffs["default"].copy_(values)


def load_adapter(path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_bert_cls(), path).eval()


def coeffs_of(model):
    return hs.find_engine(model).coeffs["default"].detach().clone()


OLD_C = torch.linspace(-0.05, 0.05, DIM)
NEW_C = torch.linspace(0.2, -0.2, DIM)

CHILD = r'''
import builtins, json, os, sys, threading
sys.path.insert(0, TESTS)
import torch
from conftest import tiny_bert_cls  # sets HF_HUB_OFFLINE and imports hf_subspace
import peft.peft_model as peft_model
import safetensors.torch as st
from test_atomic import NEW_C, set_coeffs, subspace_bert
from hf_subspace.analysis import sweep
from hf_subspace.twa.snapshots import SnapshotStore

work = sys.argv[1]


def reached(name):  # tell the parent, then wait to be killed
    open(os.path.join(work, "reached-" + name), "w").close()
    threading.Event().wait()


def half_file(filename, data, name):
    with builtins.open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    reached(name)


real_peft_save = peft_model.safe_save_file
def peft_save(tensors, filename, metadata=None):  # adapter A: killed with half of the weights written
    if os.path.basename(os.path.dirname(filename)).startswith(".A."):
        half_file(filename, st.save(tensors, metadata=metadata), "adapter")
    return real_peft_save(tensors, filename, metadata=metadata)
peft_model.safe_save_file = peft_save

real_st_save = st.save_file
def snapshot_save(tensors, filename, metadata=None):  # a disk snapshot: killed with half of the file written
    if os.path.basename(filename).startswith(".snapshot-"):
        half_file(filename, st.save(tensors, metadata=metadata), "snapshot")
    return real_st_save(tensors, filename, metadata=metadata)
st.save_file = snapshot_save

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    dst = os.fspath(dst)
    if dst == os.path.join(work, "B", "adapter_config.json"):  # adapter B: its new weights are in place already
        reached("between")
    if dst == os.path.join(work, "sweep", "runs.json"):  # the sweep's outputs: runs.json is the first written
        reached("outputs")
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace


class HalfLine:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        reached("jsonl")
def sweep_open(path, mode="r", *args, **kwargs):  # the sweep's runs.jsonl: killed with half of a line appended
    f = builtins.open(path, mode, *args, **kwargs)
    return HalfLine(f) if str(path).endswith("runs.jsonl") and "a" in mode else f
sweep.open = sweep_open


models = {}
for folder in ("A", "B"):  # built here, one after the other; only the saves run in threads
    models[folder] = subspace_bert()
    set_coeffs(models[folder], NEW_C)


def save_adapter(folder):
    models[folder].save_pretrained(os.path.join(work, folder))


def add_snapshot():
    store = SnapshotStore.open(os.path.join(work, "snaps"))
    store.add({"w": torch.full((64, 64), 9.0), "b": torch.full((64,), 9.0)}, step=30)


def append_run():
    sweep.ResultStore(os.path.join(work, "sweep", "runs.jsonl")).append(
        {"key": "new-run", "task": "toy", "dim": 77, "seed": 5, "lr": 0.1, "val_metric": 1.0, "test_metric": 1.0})


def write_outputs():
    out = os.path.join(work, "sweep")
    records = json.load(open(os.path.join(out, "runs.json")))
    sweep._write_outputs(sweep.Path(out), records + [dict(records[0], dim=77, key="x")], {"changed": True})


for target, args in ((save_adapter, ("A",)), (save_adapter, ("B",)), (add_snapshot, ()), (append_run, ()),
                     (write_outputs, ())):
    threading.Thread(target=target, args=args, daemon=True).start()
threading.Event().wait()
'''

MOMENTS = ("adapter", "between", "snapshot", "jsonl", "outputs")


def sweep_args(out):
    return dict(task=ToyTask(), dims=[10, 1000], seeds=[0], lrs=[1e-2], output_dir=str(out), baseline=1.0,
                refine_steps=0, bootstrap=10, progress=False)


def test_killed_saves_leave_the_previous_files_loadable(tmp_path):
    work = tmp_path
    # the good files: two adapters, two disk snapshots, a finished sweep
    model = subspace_bert()
    set_coeffs(model, OLD_C)
    batch = bert_batch()
    with torch.no_grad():
        old_logits = model.eval()(input_ids=batch["input_ids"]).logits
    for folder in ("A", "B"):
        model.save_pretrained(str(work / folder))
    old_config = (work / "A" / "adapter_config.json").read_text()
    store = SnapshotStore("disk", directory=work / "snaps")
    snaps = [{"w": torch.randn(64, 64), "b": torch.randn(64)} for _ in range(2)]
    for step, snap in enumerate(snaps):
        store.add(snap, step=10 * (step + 1))
    summary = run_sweep(**sweep_args(work / "sweep"))
    old_sweep = {name: (work / "sweep" / name).read_bytes() for name in (RUNS_FILE, "runs.json", "runs.csv",
                                                                        "summary.json")}

    script = work / "child.py"
    script.write_text(f"TESTS = {TESTS!r}\n" + textwrap.dedent(CHILD))
    child = subprocess.Popen([sys.executable, str(script), str(work)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                          "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not all((work / f"reached-{m}").exists() for m in MOMENTS):
            if child.poll() is not None:
                pytest.fail(f"the child ended ({child.returncode}) before its saves were stopped: "
                            f"{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                missing = [m for m in MOMENTS if not (work / f"reached-{m}").exists()]
                pytest.fail(f"the child did not reach {missing}")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    # adapter A: killed with half of its new weights written -> the old adapter, whole; the torn file is a temp
    leftovers = glob.glob(str(work / ".A.*.tmp" / "adapter_model.safetensors"))
    assert len(leftovers) == 1 and 0 < os.path.getsize(leftovers[0]) < os.path.getsize(
        work / "A" / "adapter_model.safetensors")
    assert sorted(os.listdir(work / "A")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(str(work / "A"))
    torch.testing.assert_close(coeffs_of(loaded), OLD_C)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, old_logits)
    assert not [d for d in os.listdir(work) if fnmatch.fnmatch(d, "A*") and d != "A"]
    # adapter B: killed between the two renames -> the new weights beside the old (identical) config: loadable
    assert (work / "B" / "adapter_config.json").read_text() == old_config
    torch.testing.assert_close(coeffs_of(load_adapter(str(work / "B"))), NEW_C)

    # snapshots: the torn third one is a temp file that SnapshotStore.open does not see
    names = os.listdir(work / "snaps")
    assert sorted(n for n in names if _FILE_RE.fullmatch(n)) == ["snapshot-000000.safetensors",
                                                                 "snapshot-000001.safetensors"]
    torn = [n for n in names if n.endswith(atomic.TMP_SUFFIX)]
    assert len(torn) == 1 and not fnmatch.fnmatch(torn[0], "snapshot-*.safetensors")
    reopened = SnapshotStore.open(work / "snaps")
    assert len(reopened) == 2 and reopened.steps == [10, 20]
    for i, snap in enumerate(snaps):
        for name, t in snap.items():
            torch.testing.assert_close(reopened[i][name], t)
    reopened.add({"w": torch.ones(64, 64), "b": torch.ones(64)}, step=30)  # the store goes on from there
    assert len(SnapshotStore.open(work / "snaps")) == 3

    # the sweep: summary, runs.json and runs.csv untouched; the half line in runs.jsonl is dropped on resume
    for name in ("runs.json", "runs.csv", "summary.json"):
        assert (work / "sweep" / name).read_bytes() == old_sweep[name], name
    jsonl = (work / "sweep" / RUNS_FILE).read_bytes()
    assert jsonl.startswith(old_sweep[RUNS_FILE]) and len(jsonl) > len(old_sweep[RUNS_FILE])  # the torn line
    assert len(ResultStore(work / "sweep" / RUNS_FILE)) == 2
    assert (work / "sweep" / RUNS_FILE).read_bytes() == old_sweep[RUNS_FILE]  # cut back to the last whole line
    assert not [n for n in os.listdir(work / "sweep") if fnmatch.fnmatch(n, "*.json") and n not in old_sweep]
    again = run_sweep(**sweep_args(work / "sweep"))  # resumes: no run repeated, same answer
    assert again["d_int"] == summary["d_int"] and len(ResultStore(work / "sweep" / RUNS_FILE)) == 2


# ----------------------------------------------------------------------------------------------------------------
# in-process checks of the helpers and of the adapter save
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_an_error_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(path) as f:
            f.write('{"a": 2')
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["summary.json"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (os.stat(path).st_mode & 0o777) == (os.stat(plain).st_mode & 0o777)  # the umask, not mkstemp's 0600
    with atomic.atomic_write(tmp_path / "w.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_write(path, "a"):
            pass


def test_temp_names_match_none_of_the_real_patterns():
    for real in ("snapshot-000003.safetensors", "adapter_model.safetensors", "adapter_config.json", "README.md",
                 "runs.json", "summary.json", "checkpoint-12", "model.safetensors"):
        tmp = os.path.basename(atomic.temp_name(real))
        assert tmp.startswith(".") and tmp.endswith(atomic.TMP_SUFFIX)
        for pattern in ("snapshot-*.safetensors", "*.safetensors", "*.json", "checkpoint-*", "README.md", real):
            assert not fnmatch.fnmatch(tmp, pattern), (tmp, pattern)
        assert not _FILE_RE.fullmatch(tmp)


def test_subspace_save_with_two_adapters_is_whole_and_leaves_no_temp(tmp_path):
    from peft import PeftModel

    model = subspace_bert()
    model.add_adapter("other", hs.SubspaceConfig(dim=8, task_type="SEQ_CLS"))
    set_coeffs(model, OLD_C)
    target = tmp_path / "out"
    model.save_pretrained(target)  # a pathlib.Path as PEFT takes it
    model.save_pretrained(str(target))  # over the first save
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left next to it
    assert sorted(os.listdir(target)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(target / "other")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (target / "README.md").read_text()
    assert str(target) in card and ".tmp" not in card  # the card names the final folder
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), str(target))
    torch.testing.assert_close(coeffs_of(loaded), OLD_C)
    loaded.load_adapter(str(target / "other"), adapter_name="other")
    assert hs.find_engine(loaded).coeffs["other"].shape == (8,)
    with pytest.raises(ValueError, match="directory"):  # PEFT's own error for a file
        model.save_pretrained(str(target / "README.md"))
    # another process of a multi-process run writes no file
    model.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert not [f for _, _, files in os.walk(tmp_path / "rank1") for f in files]


def test_other_peft_methods_save_as_peft_does(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA model must not go through the atomic save")

    monkeypatch.setattr(atomic, "temp_folder", refuse)
    lora = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "adapter_model.safetensors")


@pytest.mark.parametrize("first,second", [(True, False), (False, True)])
def test_a_save_in_the_other_format_removes_the_stale_weights_file(tmp_path, first, second):
    """peft loads adapter_model.safetensors before adapter_model.bin: a .bin saved over a .safetensors (or the
    reverse) must not leave the old file to be loaded instead of the new one."""
    from peft import PeftModel

    model = subspace_bert()
    set_coeffs(model, torch.full_like(model.base_model.subspace.coeffs["default"], 0.1))
    model.save_pretrained(tmp_path, safe_serialization=first)
    set_coeffs(model, torch.full_like(model.base_model.subspace.coeffs["default"], 0.3))
    model.save_pretrained(tmp_path, safe_serialization=second)
    names = {p.name for p in tmp_path.iterdir()}
    assert ("adapter_model.safetensors" in names) == second and ("adapter_model.bin" in names) == (not second)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path))
    assert torch.allclose(loaded.base_model.subspace.coeffs["default"], torch.tensor(0.3))
