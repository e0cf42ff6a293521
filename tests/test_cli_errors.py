"""Every CLI command on a wrong path or a folder of the wrong kind: one ``error:`` line, exit status 2, no traceback."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_bert_cls

import hf_subspace as hs
from hf_subspace.cli import CliError, EXIT_ERROR, main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A subspace adapter, a LoRA adapter, a plain model, truncated copies, Trainer-like runs, an empty folder."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("cli")
    get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=17, task_type="SEQ_CLS")).save_pretrained(root / "sub")
    get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(
        root / "lora")
    tiny_bert_cls().save_pretrained(root / "plain")
    for name, src, file in (("trunc", "sub", "adapter_model.safetensors"), ("plaintrunc", "plain", "model.safetensors")):
        shutil.copytree(root / src, root / name)
        data = (root / name / file).read_bytes()
        (root / name / file).write_bytes(data[: len(data) // 2])
    shutil.copytree(root / "sub", root / "badjson")
    (root / "badjson" / "adapter_config.json").write_text('{"peft_type": "SUBSPACE", "dim": ')
    shutil.copytree(root / "sub", root / "noweights")
    os.remove(root / "noweights" / "adapter_model.safetensors")
    for run, steps in (("run", (1, 2)), ("run1", (5,))):
        for step in steps:
            shutil.copytree(root / "plain", root / run / f"checkpoint-{step}")
    (root / "empty").mkdir()
    (root / "afile").write_text("not a folder")
    return root


CASES = [
    # (argv with R for the fixture folder and O for an output folder, words the message must have)
    (["info", "R/missing"], ["R/missing", "does not exist"]),
    (["info", "R/afile"], ["is a file, not a folder"]),
    (["info", "R/lora"], ["LORA adapter", "not a subspace adapter"]),
    (["info", "R/plain"], ["not an adapter folder", "transformers model"]),
    (["info", "R/empty"], ["not an adapter folder", "empty"]),
    (["info", "R/trunc"], ["adapter_model.safetensors", "truncated or corrupt"]),
    (["info", "R/badjson"], ["adapter_config.json", "not valid JSON"]),
    (["info", "R/noweights"], ["no adapter_model.safetensors"]),
    (["info", "R/run"], ["not an adapter folder", "Trainer run"]),
    (["info", "R"], ["adapters in subfolders", "lora, ", "e.g. R/noweights"]),  # a subspace one as the example
    (["effective-rank", "R/missing", "-o", "O"], ["model folder", "does not exist"]),
    (["effective-rank", "R/afile", "-o", "O"], ["is a file, not a folder"]),
    (["effective-rank", "R/lora", "-o", "O"], ["LORA adapter, not a model", "merge"]),
    (["effective-rank", "R/sub", "-o", "O"], ["SUBSPACE adapter, not a model"]),
    (["effective-rank", "R/empty", "-o", "O"], ["not a transformers model folder", "no config.json"]),
    (["effective-rank", "R/plaintrunc", "-o", "O"], ["could not load the model weights", "truncated or corrupt"]),
    (["effective-rank", "R/plain", "-o", "R/afile"], ["-o/--output_dir", "is a file"]),
    (["effective-rank", "R/plain", "-o", "O", "--trajectory", "R/empty"], ["no checkpoint-* folders"]),
    (["effective-rank", "R/plain", "-o", "O", "--trajectory", "R/missing"], ["run folder", "does not exist"]),
    (["twa", "R/missing", "--dataset", "x", "-o", "O"], ["run folder", "does not exist"]),
    (["twa", "R/afile", "--dataset", "x", "-o", "O"], ["is a file, not a folder"]),
    (["twa", "R/empty", "--dataset", "x", "-o", "O"], ["no checkpoint-* folders", "save_strategy"]),
    (["twa", "R/lora", "--dataset", "x", "-o", "O"], ["no checkpoint-* folders", "LORA adapter, not a Trainer run"]),
    (["twa", "R/run1", "--dataset", "x", "-o", "O"], ["1 checkpoint-* folder", "at least 2"]),
    (["twa", "R/run1/checkpoint-5", "--dataset", "x", "-o", "O"], ["one checkpoint", "R/run1"]),
    (["twa", "R/run", "--dataset", "R/missing", "-o", "O"], ["--dataset", "does not exist"]),
    (["twa", "R/run", "--dataset", "R/afile", "-o", "O"], ["--dataset", "is a file"]),
    (["twa", "R/run", "--dataset", "R/plain", "-o", "O"], ["--dataset", "not a datasets.save_to_disk folder",
                                                           "transformers model"]),
    (["twa", "R/run", "--dataset", "R/empty", "-o", "R/afile"], ["-o/--output", "is a file"]),
    (["twa", "R/run", "--dataset", "R/empty", "-o", "O", "--model", "R/lora"], ["LORA adapter, not a model"]),
    (["intrinsic-dim", "--script", "R/missing.py", "-o", "O"], ["--script", "does not exist"]),
    (["intrinsic-dim", "--script", "R/empty", "-o", "O"], ["--script", "is a folder"]),
    (["intrinsic-dim", "--task", "toy", "-o", "R/afile"], ["-o/--output_dir", "is a file"]),
    (["intrinsic-dim", "--task", "toy", "-o", "O", "--baseline", "abc"], ["--baseline", "a number or 'auto'"]),
    (["intrinsic-dim", "--task", "toy", "-o", "O", "--dims", "0"], ["dims must be positive", "--debug"]),
]


def _argv(argv, root, out):
    return [str(root) + a[1:] if a == "R" or a.startswith("R/") else str(out) if a == "O" else a for a in argv]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_wrong_inputs_end_in_one_error_line(folders, tmp_path, capsys, argv, words):
    rc = main(_argv(argv, folders, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        word = re.sub(r"(?<![\w/-])R/", f"{folders}/", word)
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out").exists() or argv[0] == "intrinsic-dim"  # nothing was written before the check


def test_debug_shows_the_exception_instead(folders, monkeypatch, capsys):
    with pytest.raises(CliError, match="LORA adapter"):
        main(["--debug", "info", str(folders / "lora")])
    with pytest.raises(CliError, match="does not exist"):
        main(["info", str(folders / "missing"), "--debug"])  # after the command too
    monkeypatch.setenv("HF_SUBSPACE_DEBUG", "1")
    with pytest.raises(CliError):
        main(["info", str(folders / "plain")])
    monkeypatch.setenv("HF_SUBSPACE_DEBUG", "0")
    assert main(["info", str(folders / "plain")]) == EXIT_ERROR
    capsys.readouterr()


def test_good_inputs_still_work(folders, capsys):
    assert main(["info", str(folders / "sub")]) == 0
    assert '"dim": 17' in capsys.readouterr().out


def test_the_command_prints_no_traceback(folders):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_SUBSPACE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "hf_subspace.cli", "info", str(folders / "missing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == EXIT_ERROR and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: adapter folder {folders / 'missing'} does not exist: pass the folder that PeftModel.save_pretrained "
        "wrote"], proc.stderr


def test_an_unexpected_error_is_one_line_too(folders, monkeypatch, capsys):
    """An error no check foresaw (here: an AttributeError deep in a command, as a --dataset whose columns the model
    does not take gives inside the model's forward): still one line with its type, exit 2."""
    import hf_subspace.cli as cli

    def broken(ns):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(cli, "cmd_info", broken)
    code = main(["info", str(folders / "sub")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "\n" not in err
    assert err.startswith("error: AttributeError: 'NoneType' object has no attribute 'shape' (--debug")
    monkeypatch.setenv("HF_SUBSPACE_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["info", str(folders / "sub")])
