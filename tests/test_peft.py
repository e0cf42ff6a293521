"""PEFT's checklist for a method, on tiny models built from configs."""
import json
import os
import warnings
from unittest import mock

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import hf_subspace as hs
from hf_subspace import _registry

from conftest import bert_batch, gpt2_batch, tiny_bert_cls, tiny_gpt2, logits as _logits, train_steps as _train




def _bert_adapter(kind="fastfood", mode="said", **kw):
    cfg = hs.SubspaceConfig(dim=300, projection=kind, mode=mode, task_type="SEQ_CLS", **kw)
    return get_peft_model(tiny_bert_cls(), cfg)


def test_registration_is_idempotent_and_known_to_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    _registry.register()
    _registry.register()
    assert _registry.is_registered()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SUBSPACE"] is hs.SubspaceConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SUBSPACE"] is hs.SubspaceModel


def test_config_validates():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        hs.SubspaceConfig(dim=0)
    with pytest.raises(ValueError, match="unknown projection kind"):
        hs.SubspaceConfig(projection="lora")
    with pytest.raises(ValueError, match="unknown mode"):
        hs.SubspaceConfig(mode="local")


@pytest.mark.parametrize("kind", ["hashing", "fastfood", "sparse", "dense"])
def test_save_load_round_trip_classifier(tmp_out, kind):
    model = _train(_bert_adapter(kind), bert_batch())
    out = _logits(model, bert_batch())
    model.save_pretrained(tmp_out)
    saved = load_file(os.path.join(tmp_out, "adapter_model.safetensors"))
    assert set(saved) == {"base_model.subspace.coeffs", "base_model.subspace.scales",
                          "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_out)
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(_logits(loaded, bert_batch()), out)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default


def test_gpt2_causal_lm_round_trip_and_merge(tmp_out):
    cfg = hs.SubspaceConfig(dim=200, projection="hashing", task_type="CAUSAL_LM")
    model = _train(get_peft_model(tiny_gpt2(), cfg), gpt2_batch())
    out = _logits(model, gpt2_batch())
    model.save_pretrained(tmp_out)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_out)
    torch.testing.assert_close(_logits(loaded, gpt2_batch()), out)
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied after merging
    assert "transformer.wte.weight" in merged.state_dict()
    torch.testing.assert_close(_logits(merged, gpt2_batch()), out, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_merging_twice_is_harmless():
    model = _train(_bert_adapter(), bert_batch())
    out = _logits(model, bert_batch())
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, bert_batch()), out, rtol=1e-5, atol=1e-5)
    model.merge_adapter()  # second merge: nothing to add
    torch.testing.assert_close(_logits(model, bert_batch()), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, bert_batch()), out, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_base_outputs():
    base_out = _logits(tiny_bert_cls(), bert_batch())
    model = _train(_bert_adapter(), bert_batch())
    adapted = _logits(model, bert_batch())
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, bert_batch()), base_out)
    torch.testing.assert_close(_logits(model, bert_batch()), adapted)


def test_training_changes_only_c_and_saved_modules():
    model = _bert_adapter()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.subspace.vectors.default.coeffs", "base_model.subspace.vectors.default.scales",
                         "base_model.model.classifier.modules_to_save.default.weight",
                         "base_model.model.classifier.modules_to_save.default.bias"}
    _train(model, bert_batch())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_print_trainable_parameters_counts_d_and_head(capsys):
    model = _bert_adapter()
    model.print_trainable_parameters()
    head = 32 * 2 + 2
    assert f"trainable params: {300 + head:,}" in capsys.readouterr().out


def test_two_adapters_switch(tmp_out):
    model = _train(_bert_adapter(seed=1), bert_batch(seed=1))
    out_a = _logits(model, bert_batch())
    model.add_adapter("other", hs.SubspaceConfig(dim=100, projection="hashing", task_type="SEQ_CLS", seed=2))
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.subspace.vectors.other.coeffs", "base_model.model.classifier.modules_to_save.other.weight",
        "base_model.model.classifier.modules_to_save.other.bias"}
    _train(model, bert_batch(seed=2))
    out_b = _logits(model, bert_batch())
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, bert_batch()), out_a)
    # save both, load them back onto a fresh base, switch there too
    model.save_pretrained(tmp_out)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_out)
    loaded.load_adapter(os.path.join(tmp_out, "other"), adapter_name="other")
    torch.testing.assert_close(_logits(loaded, bert_batch()), out_a)
    loaded.set_adapter("other")
    torch.testing.assert_close(_logits(loaded, bert_batch()), out_b)
    loaded.delete_adapter("other")
    torch.testing.assert_close(_logits(loaded, bert_batch()), out_a)


def test_adapter_holds_no_projection_unless_asked(tmp_out):
    model = _train(_bert_adapter("fastfood", save_projection=True), bert_batch())
    out = _logits(model, bert_batch())
    model.save_pretrained(tmp_out)
    saved = load_file(os.path.join(tmp_out, "adapter_model.safetensors"))
    assert {"base_model.subspace.projection_gauss", "base_model.subspace.projection_signs"} <= set(saved)
    # a loaded P replaces the regenerated one: tamper with it and the outputs must follow the file
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_out)
    torch.testing.assert_close(_logits(loaded, bert_batch()), out)
    proj = loaded.base_model.subspace.adapters["default"].projection
    torch.testing.assert_close(proj.gauss, saved["base_model.subspace.projection_gauss"])


def test_loading_onto_a_different_architecture_is_refused(tmp_out):
    _bert_adapter().save_pretrained(tmp_out)
    with pytest.raises(ValueError, match="parameter names or shapes differ"):
        PeftModel.from_pretrained(tiny_bert_cls(hidden=48), tmp_out)
    with pytest.raises(ValueError, match="parameter names or shapes differ"):
        PeftModel.from_pretrained(tiny_bert_cls(layers=3), tmp_out)


def test_loading_onto_other_weights_is_refused_with_an_opt_out(tmp_out):
    model = _train(_bert_adapter(), bert_batch())
    model.save_pretrained(tmp_out)
    with pytest.raises(ValueError, match="check_base_fingerprint=False"):
        PeftModel.from_pretrained(tiny_bert_cls(seed=123), tmp_out)
    loaded = PeftModel.from_pretrained(tiny_bert_cls(seed=123), tmp_out, check_base_fingerprint=False)
    assert loaded.peft_config["default"].check_base_fingerprint is False


def test_minilm_adapter_is_a_few_kilobytes(tmp_out):
    from transformers import AutoModel

    from hf_subspace.demo.data import minilm_path

    base = AutoModel.from_pretrained(minilm_path())
    D = sum(p.numel() for p in base.parameters())
    assert 22_000_000 < D < 23_000_000
    model = get_peft_model(base, hs.SubspaceConfig(dim=1000, projection="fastfood", mode="said"))
    model.save_pretrained(tmp_out)
    size = os.path.getsize(os.path.join(tmp_out, "adapter_model.safetensors"))
    assert size < 16 * 1024, size
    card = open(os.path.join(tmp_out, "README.md")).read()
    assert "library_name: peft" in card and "hf-subspace" in card


def test_push_to_hub_uploads_adapter_and_our_card(tmp_out):
    model = _train(_bert_adapter(), bert_batch())
    model.peft_config["default"].base_model_name_or_path = "org/tiny-bert"
    model.peft_config["default"].training_metrics = {"eval_accuracy": 0.875, "train_loss": 0.31}
    uploaded = {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["card"] = open(os.path.join(folder_path, "README.md")).read()
        uploaded["config"] = json.load(open(os.path.join(folder_path, "adapter_config.json")))
        return "commit-info"

    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="me/tiny-subspace")
    api.upload_folder.side_effect = upload_folder
    assert model.push_to_hub("me/tiny-subspace", api=api) == "commit-info"
    api.create_repo.assert_called_once()
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = uploaded["card"]
    meta = card.split("---")[1]
    assert "library_name: peft" in meta and "library_name: transformers" not in card
    assert "base_model: org/tiny-bert" in meta
    for tag in ("hf-subspace", "intrinsic-dimension", "projection-fastfood"):
        assert f"- {tag}" in meta
    assert "| trainable numbers d | 300 |" in card
    assert f"| weights in θ, D | {uploaded['config']['num_weights']:,} |" in card
    assert "| eval_accuracy | 0.875 |" in card
    assert "compression" in card and "PeftModel.from_pretrained" in card
    assert uploaded["config"]["peft_type"] == "SUBSPACE"


def test_get_subspace_model_shortcut():
    model = hs.get_subspace_model(tiny_bert_cls(), hs.SubspaceConfig(dim=50, task_type="SEQ_CLS"))
    assert isinstance(model, PeftModel)
    assert model.base_model.subspace.coeffs["default"].numel() == 50
