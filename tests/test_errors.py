"""Bad input, as a user gives it, ends in one clear exception: its type (hf_subspace.errors, all ValueErrors but
ProjectionMismatchError) and a message that says what was wrong and how to fix it. Tiny models, seconds in all."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

import hf_subspace as hs
from hf_subspace.errors import (AdapterMismatchError, CorruptAdapterError, ProjectionMismatchError,
                                SubspaceConfigError, SubspaceError, TWASnapshotError)

from conftest import tiny_bert_cls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def args(tmp_path, **kw):
    return hs.SubspaceTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def twa_args(tmp_path, **kw):
    return hs.TWATrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def deprecated_twa_args(tmp_path, **kw):
    return args(tmp_path, twa=True, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A SEQ_CLS adapter of the tiny BERT (seed 0), saved."""
    path = str(tmp_path_factory.mktemp("adapter") / "a")
    get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=20, task_type="SEQ_CLS")).save_pretrained(path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved adapter, to damage."""
    path = str(tmp_path / "copy")
    shutil.copytree(saved, path)
    return path


# -- the types ----------------------------------------------------------------------------------------------------
def test_every_error_keeps_its_builtin_base():
    for cls in (SubspaceConfigError, AdapterMismatchError, CorruptAdapterError, TWASnapshotError):
        assert issubclass(cls, SubspaceError) and issubclass(cls, ValueError)
    assert issubclass(ProjectionMismatchError, SubspaceError) and issubclass(ProjectionMismatchError, RuntimeError)
    assert hs.ProjectionMismatchError is ProjectionMismatchError


# -- dim, projection, mode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [0, -3, 1.5, "100", True, None])
def test_dim_not_a_positive_integer(dim):
    with pytest.raises(SubspaceConfigError, match=r"dim must be a positive integer .*got"):
        hs.SubspaceConfig(dim=dim)


def test_trainer_dim_not_a_positive_integer(tmp_path):
    with pytest.raises(SubspaceConfigError, match=r"dim must be a positive integer .*got 0"):
        args(tmp_path, subspace_dim=0)


def test_unknown_projection_kind(tmp_path):
    with pytest.raises(SubspaceConfigError, match=r"unknown projection kind 'gaussian'; choose one of .*'hashing'"):
        hs.SubspaceConfig(dim=10, projection="gaussian")
    with pytest.raises(SubspaceConfigError, match=r"unknown projection kind 'gaussian'"):
        args(tmp_path, subspace_dim=10, subspace_projection="gaussian")


def test_unknown_mode(tmp_path):
    with pytest.raises(SubspaceConfigError, match=r"unknown mode 'local'; choose one of \['global', 'said'\]"):
        hs.SubspaceConfig(dim=10, mode="local")
    with pytest.raises(SubspaceConfigError, match=r"unknown mode 'local'"):
        args(tmp_path, subspace_dim=10, subspace_mode="local")


def test_stored_kind_without_its_basis():
    with pytest.raises(SubspaceConfigError, match=r"needs save_projection=True"):
        hs.SubspaceConfig(dim=10, projection="trajectory")


def test_dim_larger_than_theta_names_D_and_the_targets():
    with pytest.raises(SubspaceConfigError, match=r"dim=5000 is larger than the number of weights in θ, D=2112 "
                                                  r"\(the 4 tensors of the modules matching target_modules="
                                                  r"\['query'\]\).*use dim ≤ 2112 or target more modules"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=5000, target_modules=["query"]))
    with pytest.raises(SubspaceConfigError, match=r"D=20044 \(all 41 trainable tensors of the model\)"):
        hs.reparameterize(tiny_bert_cls(), 10**6)


def test_said_dim_no_larger_than_the_number_of_tensors():
    with pytest.raises(SubspaceConfigError, match=r"SAID mode spends one of the dim=3 .* 41 tensors .*dim > 41"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=3, mode="said"))


# -- what θ is made of --------------------------------------------------------------------------------------------
def test_target_entry_matching_nothing_is_named_even_beside_ones_that_match():
    with pytest.raises(SubspaceConfigError, match=r"the target_modules entry 'qkv' matched no module of this "
                                                  r"BertForSequenceClassification.*named e\.g\. .*'query'"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules=["query", "qkv"]))


def test_target_regex_matching_nothing():
    with pytest.raises(SubspaceConfigError, match=r"target_modules='\.\*\\\\\.qkv' matched no module"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules=r".*\.qkv"))
    with pytest.raises(SubspaceConfigError, match=r"entry 'qkv' matched no module"):
        hs.reparameterize(tiny_bert_cls(), 10, target_modules=["qkv"])


def test_target_entry_naming_a_container_without_parameters():
    with pytest.raises(SubspaceConfigError, match=r"entry 'attention' matches only modules that own no parameters "
                                                  r"themselves .*name the layers inside"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules=["attention"]))


def test_module_both_in_theta_and_in_modules_to_save():
    with pytest.raises(SubspaceConfigError, match=r"entry 'classifier' matches 'classifier', which is trained in "
                                                  r"full \(modules_to_save=\['classifier'\]\).*not both"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules=["query", "classifier"],
                                                          modules_to_save=["classifier"]))
    with pytest.raises(SubspaceConfigError, match=r"'bert.pooler.dense'.*modules_to_save=\['pooler'\].*"
                                                  r"exclude_modules"):
        hs.reparameterize(tiny_bert_cls(), 10, target_modules=["dense"], modules_to_save=["pooler"])


def test_classifier_head_targeted_under_seq_cls_says_peft_trains_it_in_full():
    with pytest.raises(SubspaceConfigError, match=r"peft adds 'classifier' and 'score' to it for task_type='SEQ_CLS'"):
        get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules=["query", "classifier"],
                                                          task_type="SEQ_CLS"))


def test_all_linear_and_modules_to_save_leave_the_head_out_silently():
    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, target_modules="all-linear",
                                                              task_type="SEQ_CLS", modules_to_save=["pooler"]))
    names = {s.name for s in hs.find_engine(model).adapters["default"].layout.slots}
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert not any(n.startswith(("bert.pooler.", "classifier.")) for n in names)


# -- subspace settings without subspace_dim -----------------------------------------------------------------------
def test_subspace_settings_without_subspace_dim(tmp_path):
    with pytest.raises(SubspaceConfigError, match=r"subspace_projection='fastfood', subspace_mode='said' are set but "
                                                  r"subspace_dim is not.*every weight of the model would be "
                                                  r"fine-tuned\. Set subspace_dim=d"):
        args(tmp_path, subspace_projection="fastfood", subspace_mode="said")
    for kw in (dict(subspace_seed=3), dict(subspace_target_modules=["query"]), dict(subspace_modules_to_save=["x"]),
               dict(subspace_projection_format=1)):
        with pytest.raises(SubspaceConfigError, match=f"{next(iter(kw))}=.* is set but subspace_dim is not"):
            args(tmp_path, **kw)


def test_defaults_twa_and_the_examples_still_build_their_arguments(tmp_path):
    assert args(tmp_path).subspace_dim is None
    assert args(tmp_path, twa=True, subspace_seed=3).twa  # TWA: the seed follows --seed in the examples
    from dataclasses import dataclass

    from hf_subspace.demo import examples as examples_support

    @dataclass
    class Nothing:
        pass

    _, _, plain = examples_support.parse_args(
        Nothing, {"subspace_dim": 7, "target_modules": ["query"]},
        argv=["--subspace", "none", "--output_dir", str(tmp_path), "--seed", "3"])
    assert plain.subspace_dim is None and plain.subspace_seed == 0 and plain.subspace_target_modules is None


# -- loading onto another base ------------------------------------------------------------------------------------
def test_adapter_on_a_base_with_other_shapes(saved):
    with pytest.raises(AdapterMismatchError, match=r"trained on a base whose θ has D=19978 .* gives D=7722 .*names "
                                                   r"or shapes differ\. Load it onto the base model it was trained on"):
        PeftModel.from_pretrained(tiny_bert_cls(hidden=16), saved)


def test_adapter_on_other_weights_and_the_opt_out(saved):
    with pytest.raises(AdapterMismatchError, match=r"weights differ .* \(base fingerprint mismatch\).*"
                                                   r"check_base_fingerprint=False"):
        PeftModel.from_pretrained(tiny_bert_cls(seed=5), saved)
    PeftModel.from_pretrained(tiny_bert_cls(seed=5), saved, check_base_fingerprint=False)


def test_adapter_on_a_base_of_another_class_names_the_class_it_was_trained_with(saved):
    from transformers import BertModel

    torch.manual_seed(0)
    bare = BertModel(tiny_bert_cls().config)
    with pytest.raises(AdapterMismatchError, match=r"trained on a BertForSequenceClassification, and this base is a "
                                                   r"BertModel: .*AutoModelForSequenceClassification\.from_pretrained"):
        PeftModel.from_pretrained(bare, saved)


def test_same_theta_on_another_class_loads_with_a_warning(tmp_path):
    from transformers import BertForTokenClassification

    path = str(tmp_path / "q")
    get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=20, target_modules=["query"])).save_pretrained(path)
    source = tiny_bert_cls()
    other = BertForTokenClassification(source.config).eval()
    other.bert.load_state_dict(source.bert.state_dict(), strict=False)
    with pytest.warns(UserWarning, match=r"trained on a BertForSequenceClassification and is being loaded onto a "
                                         r"BertForTokenClassification: θ's parameter names and shapes match"):
        PeftModel.from_pretrained(other, path)


# -- damaged files ------------------------------------------------------------------------------------------------
def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _randomize(path):
    n = os.path.getsize(path)
    open(path, "wb").write(bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0)).tolist()))


@pytest.mark.parametrize("damage", [_truncate, _randomize, lambda p: open(p, "wb").close()],
                         ids=["half", "random", "empty"])
def test_truncated_or_corrupt_weights_file(copy, damage):
    weights = os.path.join(copy, WEIGHTS)
    damage(weights)
    with pytest.raises(CorruptAdapterError, match=rf"weights file {weights} is truncated or corrupt \(safetensors: "
                                                  r".*\); save the adapter again"):
        PeftModel.from_pretrained(tiny_bert_cls(), copy)


def test_missing_weights_file(copy):
    os.remove(os.path.join(copy, WEIGHTS))
    with pytest.raises(CorruptAdapterError, match=rf"folder {copy} holds adapter_config.json but no weights file "
                                                  r"\(adapter_model.safetensors\)"):
        PeftModel.from_pretrained(tiny_bert_cls(), copy)


@pytest.mark.parametrize("damage", [_truncate, _randomize, lambda p: open(p, "w").close()],
                         ids=["half", "random", "empty"])
def test_config_that_is_not_json(copy, damage):
    config = os.path.join(copy, CONFIG)
    damage(config)
    with pytest.raises(CorruptAdapterError, match=rf"config file {config} is not valid JSON \(.*\): it is truncated "
                                                  r"or corrupt; save the adapter again"):
        PeftModel.from_pretrained(tiny_bert_cls(), copy)


def test_weights_and_config_that_do_not_belong_together(copy):
    path = os.path.join(copy, CONFIG)
    config = json.load(open(path))
    json.dump(dict(config, dim=21), open(path, "w"))
    with pytest.raises(CorruptAdapterError, match=r"coefficient vector has shape \(20,\), but this config gives "
                                                  r"\(21,\).*do not belong together"):
        PeftModel.from_pretrained(tiny_bert_cls(), copy)


def test_without_import_hf_subspace_peft_raises_keyerror_and_the_card_says_import_it(saved):
    """peft looks the type up in a plain dict before reading anything else: nothing in our files can change that."""
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from transformers import BertConfig, BertForSequenceClassification\nfrom peft import PeftModel\n"
            "base = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, "
            "num_attention_heads=2, intermediate_size=37, max_position_embeddings=64))\n"
            f"PeftModel.from_pretrained(base, {saved!r})\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(saved))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "KeyError: 'SUBSPACE'"
    card = open(os.path.join(saved, "README.md")).read()
    assert "import hf_subspace  # registers" in card and "KeyError: 'SUBSPACE'" in card


# -- TWA ----------------------------------------------------------------------------------------------------------
def _checkpoints(run_dir, models):
    for step, model in enumerate(models, start=1):
        model.save_pretrained(os.path.join(run_dir, f"checkpoint-{step}"))


def _data():
    from conftest import bert_batch

    b = bert_batch(n=4)
    return [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for i in range(4)]


def test_twa_with_fewer_than_2_snapshots(tmp_path):
    from hf_subspace.twa import run_twa_phase

    model = tiny_bert_cls()
    trainer = hs.TWATrainer(model=model, args=twa_args(tmp_path), train_dataset=_data())
    with pytest.raises(TWASnapshotError, match=r"TWA needs at least 2 snapshots to span a subspace, got 1; record "
                                               r"more \(a smaller twa_snapshot_steps"):
        run_twa_phase(trainer, [{n: p.detach().clone() for n, p in model.named_parameters()}])
    _checkpoints(tmp_path / "run", [tiny_bert_cls()])
    with pytest.raises(TWASnapshotError, match=r"need at least 2 checkpoints to build a trajectory, found 1"):
        hs.twa_from_checkpoints(str(tmp_path / "run"), tiny_bert_cls(), twa_args(tmp_path / "out"), _data())


def test_twa_snapshots_of_another_shape(tmp_path):
    _checkpoints(tmp_path / "run", [tiny_bert_cls(seed=1, hidden=16), tiny_bert_cls(seed=2, hidden=16)])
    with pytest.raises(TWASnapshotError, match=r"snapshot tensor 'bert\.embeddings\.word_embeddings\.weight' has "
                                               r"shape \(99, 16\) but the model's parameter has shape \(99, 32\)"):
        hs.twa_from_checkpoints(str(tmp_path / "run"), tiny_bert_cls(), twa_args(tmp_path / "out"), _data())


def test_twa_snapshots_with_other_names(tmp_path):
    from hf_subspace.twa import run_twa_phase

    model = tiny_bert_cls()
    snaps = [{"other." + n: p.detach().clone() for n, p in model.named_parameters()} for _ in range(2)]
    trainer = hs.TWATrainer(model=model, args=twa_args(tmp_path), train_dataset=_data())
    with pytest.raises(TWASnapshotError, match=r"the snapshots have no tensor for the model's parameter "
                                               r"'bert\.embeddings\.word_embeddings\.weight'; they were taken from "
                                               r"another model"):
        run_twa_phase(trainer, snaps)
    _checkpoints(tmp_path / "run", [tiny_bert_cls().bert, tiny_bert_cls(seed=1).bert])
    with pytest.raises(TWASnapshotError, match=r"has no floating-point tensor named 'bert\."):
        hs.twa_from_checkpoints(str(tmp_path / "run"), tiny_bert_cls(), twa_args(tmp_path / "out"), _data())


@pytest.mark.parametrize("kw,words", [
    ({"twa_learning_rate": -1.0}, "twa_learning_rate must be a non-negative number"),
    ({"twa_momentum": -0.5}, r"twa_momentum must be a number in \[0, 1\)"),
    ({"twa_lr_gamma": -1.0}, "twa_lr_gamma must be a positive number"),
    ({"twa_lr_milestones": [1.5]}, "twa_lr_milestones must be fractions of the TWA phase"),
    ({"twa_batch_size": 0}, "twa_batch_size must be a positive integer or None"),
    ({"twa_bn_batches": 0}, "twa_bn_batches must be a positive integer or None"),
    ({"twa_snapshot_steps": 0}, "twa_snapshot_steps must be a positive integer or None"),
    ({"twa_num_components": 3}, "twa_num_components=3 only applies to twa_basis='pca'"),
])
@pytest.mark.parametrize("make", [twa_args, deprecated_twa_args])
def test_bad_twa_settings_fail_before_the_ordinary_phase(tmp_path, kw, words, make):
    with pytest.raises(SubspaceConfigError, match=words):
        make(tmp_path, **kw)


def test_a_twa_run_that_cannot_record_2_snapshots_fails_when_training_starts(tmp_path):
    """Not after the whole ordinary phase: twa_snapshot_start_step beyond the run's last step."""
    from test_trainer import image_dataset

    from conftest import tiny_resnet

    a = twa_args(tmp_path, max_steps=4, twa_snapshot_steps=2, twa_snapshot_start_step=10,
                 per_device_train_batch_size=8, disable_tqdm=True)
    trainer = hs.TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    with pytest.raises(TWASnapshotError, match=r"would record only 0 weight snapshot\(s\) \(every 2 steps from step "
                                               r"10 to step 4\), and TWA needs at least 2"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_subspace_weight_decay_without_subspace_dim(tmp_path):
    with pytest.raises(SubspaceConfigError, match="subspace_weight_decay=True is set but subspace_dim is not"):
        args(tmp_path, subspace_weight_decay=True)


def test_an_already_wrapped_model_with_another_subspace_dim(tmp_path):
    wrapped = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=10, task_type="SEQ_CLS"))
    with pytest.raises(SubspaceConfigError, match="already a subspace model with dim=10, but subspace_dim=500"):
        hs.SubspaceTrainer(model=wrapped, args=args(tmp_path, subspace_dim=500))
    with pytest.raises(SubspaceConfigError, match="pass the plain model, not one already wrapped"):
        hs.TWATrainer(model=wrapped, args=twa_args(tmp_path))


@pytest.mark.parametrize("kw,words", [({"seed": 1.5}, r"seed must be an integer .*got 1.5 \(float\)"),
                                      ({"seed": "abc"}, "seed must be an integer"),
                                      ({"target_modules": 5}, "target_modules must be None, a string"),
                                      ({"projection_format": "1"}, "projection_format must be a positive integer"),
                                      ({"projection_format": 0}, "projection_format must be a positive integer")])
def test_bad_config_fields(kw, words):
    with pytest.raises(SubspaceConfigError, match=words):
        hs.SubspaceConfig(dim=10, **kw)


def test_numpy_numbers_sets_and_none_are_accepted_where_they_mean_the_same(tmp_path):
    import numpy as np

    a = twa_args(tmp_path, twa_momentum=np.float32(0.9), twa_learning_rate=np.float32(1),
                 twa_batch_size=np.int64(4), twa_snapshot_steps=np.int64(5))
    assert a.twa_batch_size == 4 and type(a.twa_snapshot_steps) is int
    config = hs.SubspaceConfig(dim=50, exclude_modules={"classifier"}, projection_format=np.int64(1),
                               projection_options=None)
    assert config.exclude_modules == ["classifier"] and config.projection_format == 1
    assert config.projection_options == {}
    with pytest.raises(SubspaceConfigError, match="projection_options must be a dict"):
        hs.SubspaceConfig(dim=50, projection_options=["block"])
    with pytest.raises(SubspaceConfigError, match="twa_epochs must be a positive number"):
        twa_args(tmp_path, twa_epochs=float("nan"))
