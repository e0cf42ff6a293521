"""The detection example's fine-tuning case: a saved detector adapted to the shifted task in full, with LoRA and in a
random subspace (tiny settings, in one process: a few seconds)."""
import pytest
import torch
from conftest import load_example

TINY = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--train_canvases", "8", "--eval_canvases", "4",
        "--image_size", "64", "--eval_deepforest", "false", "--digit_size", "12", "20", "--num_queries", "8",
        "--detector_layers", "1", "1", "--report_to", "none", "--save_strategy", "no", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def example():
    return load_example("object_detection", "detection_example_finetune")


@pytest.fixture(scope="module")
def pretrained(example, tmp_path_factory):
    """A tiny detector trained (2 steps) on the digit canvases and saved: what --init_from reads."""
    out = tmp_path_factory.mktemp("digits")
    example.main([*TINY, "--subspace", "none", "--output_dir", str(out)])
    return str(out / "final")


@pytest.fixture(scope="module")
def start(pretrained):
    """The saved detector's parameters, as --init_from reads them."""
    from hf_subspace.demo.vision import load_rtdetr_lite0

    params = dict(load_rtdetr_lite0(pretrained).named_parameters())
    return {n: p.detach() for n, p in params.items()}, {n for n, p in params.items() if p.requires_grad}


def _train(example, monkeypatch, argv):
    """Run the example's main and keep its trainer (to look at the trained model)."""
    kept = {}
    run = example.ex.run_example

    def keep(trainer, *args, **kwargs):
        kept["trainer"] = trainer
        return run(trainer, *args, **kwargs)

    monkeypatch.setattr(example.ex, "run_example", keep)
    metrics = example.main(argv)
    return kept["trainer"], metrics


def _base_name(name):
    """A parameter's name in the plain detector: without peft's and the parametrizations' wrapping."""
    for part in ("base_model.model.", "base_layer.", "parametrizations.", ".original"):
        name = name.replace(part, "")
    return name


@pytest.mark.parametrize("method", ["none", "lora", "hashing"])
def test_shifted_task_fine_tuning_keeps_the_base_frozen_with_lora_and_subspace(example, pretrained, start, method,
                                                                               monkeypatch, tmp_path, capsys):
    how = {"none": ["--subspace", "none"], "lora": ["--subspace", "none", "--lora_rank", "2", "--lora_convs", "true"],
           "hashing": ["--subspace", "hashing", "--subspace_dim", "50", "--learning_rate", "0.5"]}[method]
    trainer, metrics = _train(example, monkeypatch, [*TINY, "--init_from", pretrained, "--task", "shifted", *how,
                                                      "--output_dir", str(tmp_path)])
    assert 0 <= metrics["eval_map_50"] <= 1 and trainer.state.global_step == 2
    start, trainable = start
    model = trainer.model
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {_base_name(n): p for n, p in model.named_parameters() if not p.requires_grad}
    if method == "none":  # every detector weight trained, the backbone still frozen
        assert sum(p.numel() for p in trained.values()) == sum(start[n].numel() for n in trainable)
        assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
        return
    assert set(frozen) == set(start)  # every weight of the detector is still there, frozen
    for name, value in frozen.items():
        assert torch.equal(value, start[name]), f"{method} changed the base weight {name}"
    # the saved adapter on the saved base is the trained model (BatchNorm statistics were kept, not updated)
    from peft import PeftModel

    import hf_subspace  # noqa: F401  (registers the SUBSPACE adapter type with peft)
    from hf_subspace.demo.vision import load_rtdetr_lite0

    reloaded = PeftModel.from_pretrained(load_rtdetr_lite0(pretrained), str(tmp_path / "final")).eval()
    pixels = torch.stack([trainer.eval_dataset[i]["pixel_values"] for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)
    if method == "lora":
        assert trained and all("lora_" in n for n in trained)
        kinds = {type(m).__name__ for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert {"Linear", "Conv2d"} <= kinds and not any("lora_" in n for n in dict(model.named_parameters())
                                                         if ".backbone." in n)
        assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # it learned (B starts at 0)
        assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
        # reported and carded as what it is: a LoRA adapter, not a model whose every weight was trained
        assert "LORA adapter (on the unchanged base)" in capsys.readouterr().out
        card = (tmp_path / "final" / "README.md").read_text()
        assert "every weight" not in card and "library_name: peft" in card and "LORA adapter" in card
        assert "base_model:" not in card  # the base is a local folder, not a Hub id
    else:
        assert sum(p.numel() for p in trained.values()) == 50
        assert any(p.abs().sum() > 0 for p in trained.values())
        assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_shifted_canvases_are_deterministic_and_bright(example):
    a, b = example.shifted_canvases(6, "train", 64, 0), example.shifted_canvases(6, "train", 64, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    test = example.shifted_canvases(6, "test", 64, 0)
    assert not torch.equal(test.images[0], a.images[0])
    assert all(float(im.float().median()) >= 100 for im in a.images)  # bright background, dark digits


@pytest.mark.parametrize("argv, message", [
    (["--lora_rank", "4", "--subspace", "hashing", "--subspace_dim", "10"], "use it with --subspace none"),
    (["--lora_rank", "-1", "--subspace", "none"], "--lora_rank must be"),
    (["--lora_convs", "true", "--subspace", "none"], "give --lora_rank too"),
    (["--init_from", "/nonexistent", "--subspace", "none"], "holds no saved detector"),
    (["--init_from", "/nonexistent", "--model_type", "yolos", "--subspace", "none"], "rtdetr_lite0"),
])
def test_fine_tuning_flags_are_checked(example, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        example.main([*TINY, *argv, "--output_dir", str(tmp_path)])


def test_init_from_checks_the_image_size_before_building(example, pretrained, tmp_path):
    argv = [*TINY, "--init_from", pretrained, "--task", "shifted", "--subspace", "none", "--image_size", "50"]
    with pytest.raises(ValueError, match="--image_size must be a multiple of 32"):
        example.main([*argv, "--output_dir", str(tmp_path)])
