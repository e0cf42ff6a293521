"""Smoke tests of the four examples: the real scripts, in subprocesses, with tiny settings (seconds each)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--subspace_dim", "100", "--report_to", "none",
         "--save_strategy", "no"]
EXAMPLES = {
    "text_classification": ["--max_train_samples", "8", "--max_eval_samples", "8", "--max_length", "16"],
    "image_classification": ["--max_train_samples", "16", "--max_eval_samples", "16"],
    "object_detection": ["--subspace", "hashing", "--train_canvases", "8", "--eval_canvases", "4", "--image_size",
                         "64", "--eval_deepforest", "false", "--digit_size", "12", "20", "--num_queries", "8",
                         "--detector_layers", "1", "1"],
    "language_modeling": ["--tiny", "--max_train_samples", "40", "--eval_verses", "20", "--block_size", "32",
                          "--max_new_tokens", "4"],
}


def run_example(task, out, *extra, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "examples", task, "train.py"), *SMOKE, "--output_dir", str(out),
           *EXAMPLES[task], *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # this checkout's hf_subspace, not whichever one is installed (an editable install of another worktree)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize("task", sorted(EXAMPLES))
def test_example_trains_and_saves_its_adapter(task, tmp_path):
    proc = run_example(task, tmp_path)
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["dim"] == 100 and config["peft_type"] == "SUBSPACE"
    card = (final / "README.md").read_text()
    assert "before training" in card and "after training" in card and "| trainable numbers d | 100 |" in card
    results = json.loads((tmp_path / "all_results.json").read_text())
    metric = {"text_classification": "accuracy", "image_classification": "accuracy", "object_detection": "map_50",
              "language_modeling": "perplexity"}[task]
    assert f"before_{metric}" in results and f"eval_{metric}" in results
    assert "saved to" in proc.stdout and "adapter:" in proc.stdout


def test_example_refuses_an_unknown_subspace(tmp_path, capsys):
    from dataclasses import dataclass

    from hf_subspace import TWATrainingArguments
    from hf_subspace.demo import examples as examples_support

    @dataclass
    class Nothing:
        pass

    with pytest.raises(SystemExit):
        examples_support.parse_args(Nothing, {}, argv=["--subspace", "lora", "--output_dir", str(tmp_path)])
    assert "invalid choice: 'lora'" in capsys.readouterr().err
    example, _, args = examples_support.parse_args(
        Nothing, {"subspace_dim": 7}, argv=["--subspace", "twa", "--output_dir", str(tmp_path), "--seed", "3"])
    assert isinstance(args, TWATrainingArguments) and args.seed == 3  # --subspace twa: TWATrainer's arguments
    assert not hasattr(args, "subspace_dim") and not hasattr(args, "subspace_seed")  # no random-subspace settings


def test_image_example_twa(tmp_path):
    """--subspace twa: snapshots, the TWA phase (BatchNorm recalibrated: the default model is a ResNet), a TWA adapter."""
    run_example("image_classification", tmp_path, "--subspace", "twa", "--max_steps", "6", "--twa_snapshot_steps",
                "2", "--twa_snapshot_start_step", "0", "--twa_epochs", "0.5")
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "final" / "base" / "config.json").is_file()
    assert "twa_eval_accuracy" in (tmp_path / "final" / "adapter" / "README.md").read_text() or \
        "accuracy after training" in (tmp_path / "final" / "adapter" / "README.md").read_text()


def test_example_errors_are_one_line(tmp_path):
    """A wrong input ends in one `error:` line and exit status 2, as hf-subspace's own errors do (not a traceback)."""
    cmd = [sys.executable, os.path.join(ROOT, "examples", "text_classification", "train.py"), "--subspace_dim", "0",
           "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_SUBSPACE_DEBUG": "0"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dim must be a positive integer"), proc.stderr


def test_a_second_run_does_not_overwrite_an_earlier_result(tmp_path):
    """A run into an output_dir whose final/ holds a saved result is refused before training; nothing is touched."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_model.safetensors").write_bytes(b"earlier run")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "image_classification", "train.py"), *SMOKE,
           "--output_dir", str(tmp_path), *EXAMPLES["image_classification"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "holds the result of an earlier run" in proc.stderr, proc.stderr
    assert "--overwrite_output_dir" in proc.stderr
    assert (final / "adapter_model.safetensors").read_bytes() == b"earlier run"
    assert not (tmp_path / "all_results.json").exists()  # refused before anything ran
    run_example("image_classification", tmp_path, "--overwrite_output_dir")
    assert (final / "adapter_model.safetensors").read_bytes() != b"earlier run"


def test_two_process_example_is_data_parallel(tmp_path):
    """torchrun on CPU: a real DDP run (no "parallel_mode != DISTRIBUTED" warning), the loss as on one process (not
    multiplied by the number of processes), and an evaluation over exactly the requested samples (no padding)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.join(ROOT, "examples", "text_classification", "train.py"), *SMOKE, "--max_steps", "1",
           "--logging_steps", "1", "--learning_rate", "0", "--output_dir", str(tmp_path),
           *EXAMPLES["text_classification"][:2], "--max_eval_samples", "7", "--max_length", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr + proc.stdout
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["before_samples_per_second"] > 0
    assert round(results["before_accuracy"] * 7, 4) == round(results["before_accuracy"] * 7)  # k of 7, not k/128
    # lr 0: the one training step leaves the model as it was, so the logged training loss is the loss of that
    # batch at initialization, ~ln 2 for a fresh 2-class head (doubled, 1.39, with the loss scaled by 2 processes)
    losses = [float(v) for v in __import__("re").findall(r"'loss': '?([0-9.]+)", proc.stdout)]
    assert losses and all(0.4 < v < 1.0 for v in losses), proc.stdout[-3000:]


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_language_modeling_example_on_a_quantized_base(tmp_path, flag):
    """--load_in_4bit / --load_in_8bit: the tiny Llama's linear layers quantized by bitsandbytes, every weight in θ;
    the adapter points at the unquantized base saved before quantizing and loads onto it with the warning."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hf_subspace as hs

    proc = run_example("language_modeling", tmp_path, flag, "--target_modules", "q_proj", "k_proj", "v_proj",
                       "o_proj", "gate_proj", "up_proj", "down_proj")
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert "before_perplexity" in results and "eval_perplexity" in results
    assert "by bitsandbytes" in proc.stdout
    config = hs.SubspaceConfig.from_pretrained(tmp_path / "final")
    bits = 4 if "4bit" in flag else 8
    assert [(g["bits"], len(g["slots"])) for g in config.base_quantization] == [(bits, 14)]
    from safetensors.torch import load_file

    c = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))["base_model.subspace.coeffs"]
    assert c.abs().sum() > 0  # it trained (after the evaluation before training, too)
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, tmp_path / "final")
    assert any("trained on a quantized base" in str(w.message) for w in caught)


def _detection_module():
    from conftest import load_example

    return load_example("object_detection", "detection_example")


def test_detection_scores_follow_the_model_kind():
    """RT-DETR scores each (query, class) by a sigmoid and has no "no object" class: its best pairs are kept (a
    softmax that drops the last column, right for DETR/YOLOS, would silently lose the last digit class)."""
    from types import SimpleNamespace

    import torch

    det = _detection_module()
    boxes = torch.tensor([[[.5, .5, .2, .2], [.2, .2, .1, .1]]])
    logits = torch.tensor([[[-9.0, -9.0, 3.0], [1.0, 2.0, -9.0]]])  # query 0: class 2 (the last one); query 1: 1, 0
    rtdetr = SimpleNamespace(config=SimpleNamespace(use_focal_loss=True))
    (b, s, l), = det.detections(rtdetr, logits, boxes, max_detections=3)
    assert l.tolist() == [2, 1, 0] and torch.equal(b, boxes[0][[0, 1, 1]])
    torch.testing.assert_close(s, torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    (b, s, l), = det.detections(rtdetr, logits, boxes, class_agnostic=True)
    assert l.tolist() == [0, 0] and torch.equal(b, boxes[0])
    detr = SimpleNamespace(config=SimpleNamespace())  # softmax over classes + "no object" (the last column)
    logits = torch.tensor([[[0.0, 2.0, 5.0], [3.0, 1.0, -9.0]]])
    (b, s, l), = det.detections(detr, logits, boxes)
    assert l.tolist() == [1, 0] and torch.equal(b, boxes[0])
    torch.testing.assert_close(s, torch.stack([logits[0, 0].softmax(-1)[1], logits[0, 1].softmax(-1)[0]]))


def test_detection_example_full_training_saves_a_detector_that_loads_back(tmp_path):
    """--subspace none on the default RT-DETR + Lite0: the saved model is read back by load_rtdetr_lite0 (the
    backbone frozen and unchanged, the pretrained Lite0 weights)."""
    import torch
    from safetensors.torch import load_file

    from hf_subspace import vision

    run_example("object_detection", tmp_path, "--subspace", "none")
    final = tmp_path / "final"
    model = vision.load_rtdetr_lite0(str(final))
    saved = load_file(str(final / "model.safetensors"))
    reference = vision.Lite0Backbone().state_dict()
    backbone = model.model.backbone.model.state_dict()
    assert set(backbone) == set(reference)
    for k in reference:
        assert torch.equal(backbone[k], reference[k]) and torch.equal(saved[f"model.backbone.model.{k}"], reference[k])
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert 0 <= results["eval_map_50"] <= 1 and "every weight trained" in (final / "README.md").read_text()
