"""The TWA pair TWATrainingArguments + TWATrainer (issue 25): its arguments' checks, the deprecated
SubspaceTrainer(twa=True) path (one FutureWarning, the same run bit for bit), the old import paths, and the
import direction trainer.py -> twa (never back). Training and resuming with the pair: test_trainer.py and
test_resume.py."""
import ast
import copy
import os
import warnings

import pytest
import torch
from transformers import HfArgumentParser, Trainer

import hf_subspace as hs
from hf_subspace import SubspaceConfigError, TWATrainer, TWATrainingArguments

from conftest import tiny_bert_cls, tiny_resnet
from test_trainer import args, image_dataset, twa_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    ({"subspace_dim": 100}, r"subspace_dim=100: that is a setting of a random subspace.*cannot be combined with a "
                            r"random subspace.*SubspaceTrainingArguments \+ SubspaceTrainer"),
    ({"subspace_projection": "fastfood", "subspace_seed": 3},
     r"subspace_projection='fastfood', subspace_seed=3: those are settings of a random subspace"),
    ({"subspace_lr_check_steps": 5}, "subspace_lr_check_steps=5: that is a setting of a random subspace"),
    ({"twa": True}, "TWATrainingArguments got twa=True: it always runs TWA; leave twa out"),
])
def test_twa_arguments_refuse_random_subspace_settings(tmp_path, kw, words):
    with pytest.raises(SubspaceConfigError, match=words):
        twa_args(str(tmp_path), **kw)


@pytest.mark.parametrize("kw,words", [
    ({"twa_basis": "svd"}, "twa_basis must be 'twa' or 'pca'"),
    ({"twa_lr_schedule": "exp"}, "twa_lr_schedule must be one of"),
    ({"twa_optimizer": "lbfgs"}, "twa_optimizer must be one of"),
    ({"twa_snapshot_dtype": "int8"}, "twa_snapshot_dtype must be float32, bfloat16 or float16"),
    ({"twa_epochs": 0}, "twa_epochs must be a positive number"),
    ({"twa_snapshot_start_step": -1}, "twa_snapshot_start_step must be a non-negative integer"),
    ({"twa_max_grad_norm": float("inf")}, "twa_max_grad_norm must be a non-negative number"),
    ({"max_consecutive_nonfinite_steps": -1}, "max_consecutive_nonfinite_steps must be a non-negative integer"),
])
def test_twa_arguments_refuse_bad_numbers_as_the_old_class_did(tmp_path, kw, words):
    with pytest.raises(ValueError, match=words):
        twa_args(str(tmp_path), **kw)
    with pytest.raises(ValueError, match=words):
        args(str(tmp_path), twa=True, **kw)


def test_twa_arguments_parse_copy_and_convert(tmp_path):
    (a,) = HfArgumentParser(TWATrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--twa_epochs", "0.5", "--twa_lr_milestones", "0.3", "0.6", "--use_cpu"])
    assert a.twa_epochs == 0.5 and a.twa_lr_milestones == [0.3, 0.6] and a.twa  # args.twa reads True
    assert copy.deepcopy(a).twa_lr_milestones == [0.3, 0.6]
    from hf_subspace.twa.arguments import as_twa_arguments

    old = args(str(tmp_path), twa=True, twa_learning_rate=0.7, twa_bn_batches=3, skip_nonfinite_steps=False)
    new = as_twa_arguments(old)
    assert type(new) is TWATrainingArguments and new.twa_learning_rate == 0.7 and new.twa_bn_batches == 3
    assert new.skip_nonfinite_steps is False and new.output_dir == old.output_dir and new.seed == old.seed


def test_the_wrong_trainer_for_twa_arguments_is_refused(tmp_path):
    a = twa_args(str(tmp_path))
    with pytest.raises(SubspaceConfigError, match="Trainer does not run TWA .*use hf_subspace.TWATrainer"):
        Trainer(model=tiny_resnet(), args=a)
    with pytest.raises(ValueError, match="args must be SubspaceTrainingArguments, got TWATrainingArguments"):
        hs.SubspaceTrainer(model=tiny_resnet(), args=a)
    with pytest.raises(ValueError, match="args must be TWATrainingArguments, got SubspaceTrainingArguments"):
        TWATrainer(model=tiny_resnet(), args=args(str(tmp_path), twa=True))
    with pytest.raises(SubspaceConfigError, match="Trainer does not run TWA .*hf_subspace.TWATrainer"):
        Trainer(model=tiny_resnet(), args=args(str(tmp_path), twa=True))


# -- the deprecated path ------------------------------------------------------------------------------------------
def _run(trainer):
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            trainer.twa_result.coefficients.clone(), losses, trainer.twa_result.metrics["train_loss"])


SETTINGS = dict(num_train_epochs=2, learning_rate=0.05, twa_snapshot_steps=2, twa_epochs=1, twa_learning_rate=0.5)


def test_subspace_trainer_with_twa_warns_once_and_runs_as_the_new_pair(tmp_path):
    new = _run(TWATrainer(model=tiny_resnet(), args=twa_args(str(tmp_path / "new"), **SETTINGS),
                          train_dataset=image_dataset()))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        old_args = args(str(tmp_path / "old"), twa=True, **SETTINGS)  # the arguments alone do not warn
        trainer = hs.SubspaceTrainer(model=tiny_resnet(), args=old_args, train_dataset=image_dataset())
        old = _run(trainer)
    future = [w for w in seen if issubclass(w.category, FutureWarning) and "TWATrainer" in str(w.message)]
    assert len(future) == 1, [str(w.message) for w in future]
    assert "deprecated" in str(future[0].message) and "TWATrainingArguments" in str(future[0].message)
    assert future[0].filename == __file__  # pointed at the caller's line
    assert isinstance(trainer, TWATrainer) and isinstance(trainer.args, TWATrainingArguments)
    assert torch.equal(old[1], new[1])  # the coefficients
    assert old[2] == new[2] and old[3] == new[3]  # every logged loss, both phases
    assert old[0].keys() == new[0].keys()
    for k in new[0]:  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(old[0][k], new[0][k]), k


def test_a_subspace_trainer_subclass_with_twa_is_told_to_derive_from_twa_trainer(tmp_path):
    class Mine(hs.SubspaceTrainer):
        pass

    with pytest.raises(SubspaceConfigError, match="Mine .* was given twa=True.*derive Mine from TWATrainer"):
        Mine(model=tiny_resnet(), args=args(str(tmp_path), twa=True))
    assert type(Mine(model=tiny_bert_cls(), args=args(str(tmp_path), subspace_dim=8))) is Mine  # no TWA: as before


def test_twa_from_checkpoints_with_the_old_arguments_warns(tmp_path):
    with pytest.warns(FutureWarning, match="twa_from_checkpoints with SubspaceTrainingArguments is deprecated"):
        with pytest.raises(hs.TWASnapshotError):  # an empty run folder: the warning comes first
            hs.twa_from_checkpoints(str(tmp_path), tiny_resnet(), args(str(tmp_path / "out")), image_dataset())


def test_old_import_paths_still_work():
    import hf_subspace.checkpoints as checkpoints
    import hf_subspace.trainer as trainer
    import hf_subspace.twa as twa

    assert trainer.twa_from_checkpoints is twa.twa_from_checkpoints is hs.twa_from_checkpoints
    assert trainer.run_twa_phase is twa.run_twa_phase
    assert trainer.last_complete_checkpoint is checkpoints.last_complete_checkpoint
    assert trainer.TWA_LR_SCHEDULES == ("step", "linear", "cosine", "constant")
    assert hs.TWATrainer is twa.TWATrainer and hs.TWATrainingArguments is twa.TWATrainingArguments
    assert {"TWATrainer", "TWATrainingArguments"} <= set(hs.__all__) & set(twa.__all__)


# -- the import direction -----------------------------------------------------------------------------------------
def _imports(path):
    """The hf_subspace modules a file imports, at module level or inside functions (absolute names)."""
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    package = rel.rsplit(".", 1)[0] if not rel.endswith("__init__") else rel[: -len(".__init__")]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_twa_nonfinite_and_checkpoints_do_not_import_the_random_subspace_trainer():
    files = [os.path.join(ROOT, "hf_subspace", name) for name in ("nonfinite.py", "checkpoints.py", "arguments.py")]
    twa_dir = os.path.join(ROOT, "hf_subspace", "twa")
    files += [os.path.join(twa_dir, name) for name in os.listdir(twa_dir) if name.endswith(".py")]
    for path in files:
        assert "hf_subspace.trainer" not in _imports(path), path
    assert not {m for m in _imports(os.path.join(ROOT, "hf_subspace", "checkpoints.py")) if m.startswith("hf_subspace")}


def test_the_cli_twa_command_runs_on_twa_arguments(tmp_path, capsys):
    """``hf-subspace twa RUN --dataset D -o OUT``: post-hoc TWA through TWATrainingArguments, no FutureWarning."""
    from hf_subspace.cli import main

    run_dir = str(tmp_path / "run")
    trainer = hs.SubspaceTrainer(model=tiny_resnet(), args=args(run_dir, num_train_epochs=2, save_strategy="epoch"),
                                 train_dataset=image_dataset())
    trainer.train()
    image_dataset().save_to_disk(str(tmp_path / "data"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        code = main(["twa", run_dir, "--dataset", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--cpu",
                     "--epochs", "0.5", "--batch_size", "16", "--lr", "0.3"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "twa_summary.json").is_file()
