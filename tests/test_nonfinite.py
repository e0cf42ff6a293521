"""A NaN/Inf loss or gradient skips the optimizer step (c, λ and the optimizer state untouched), is counted and
logged; too many in a row stop training with a clear error and leave the last checkpoint good."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_subspace.nonfinite import NonFiniteTrainingError
from hf_subspace.trainer import SubspaceTrainer, SubspaceTrainingArguments
from hf_subspace.twa import TWATrainer

from conftest import tiny_bert_cls, tiny_resnet
from test_trainer import args, image_dataset, text_dataset, twa_args


class NaNLossTrainer(SubspaceTrainer):
    """Multiplies the loss by NaN while computing the steps in ``bad`` (0-based: the step being computed)."""

    bad = ()

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        if self.state.global_step in self.bad:
            loss = loss * float("nan")
        return loss


class Record(TrainerCallback):
    """c, λ and the optimizer state after every step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, a, state, control, model=None, optimizer=None, **kwargs):
        engine = model.base_model.subspace
        opt_state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                     for k, s in enumerate(optimizer.state.values())}
        scales = engine.scales["default"].detach().clone() if "default" in engine.scales else None
        self.after[state.global_step] = (engine.coeffs["default"].detach().clone(), scales, opt_state)


def same_optimizer_state(a, b):
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(torch.as_tensor(a[k][n]), torch.as_tensor(b[k][n]))
                                           for n in a[k]) for k in a)


def test_a_nan_loss_skips_the_step_and_leaves_c_lambda_and_adam_untouched(tmp_out):
    rec = Record()
    a = args(tmp_out, subspace_dim=80, subspace_mode="said", max_steps=6, learning_rate=1e-2)
    trainer = NaNLossTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset(), callbacks=[rec])
    trainer.bad = (2, 3)  # steps 3 and 4
    trainer.train()
    c2, s2, opt2 = rec.after[2]
    for step in (3, 4):
        c, s, opt = rec.after[step]
        assert torch.equal(c, c2) and torch.equal(s, s2) and same_optimizer_state(opt, opt2)
    c5, _, opt5 = rec.after[5]
    assert not torch.equal(c5, c2) and not same_optimizer_state(opt5, opt2)  # training went on
    assert torch.isfinite(trainer.model.base_model.subspace.coeffs["default"]).all()
    assert trainer.nonfinite_guard.skipped == 2 and trainer.nonfinite_guard.skipped_steps == [3, 4]
    logged = [h["nonfinite_steps_skipped"] for h in trainer.state.log_history if "nonfinite_steps_skipped" in h]
    assert logged and logged[-1] == 2


class InfGradientAt(TrainerCallback):
    """Runs before the guard (user callbacks come first): makes the gradient of ``name`` infinite at ``steps``."""

    def __init__(self, steps, name):
        self.steps, self.name = steps, name

    def on_pre_optimizer_step(self, a, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            for n, p in model.named_parameters():
                if self.name in n and p.grad is not None:
                    p.grad[0] = math.inf


def test_an_infinite_gradient_with_a_finite_loss_is_skipped_too(tmp_out):
    rec = Record()
    a = args(tmp_out, subspace_dim=64, max_steps=4, learning_rate=1e-2, optim="sgd")
    trainer = SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset(),
                              callbacks=[InfGradientAt({2}, "classifier"), rec])
    trainer.train()
    assert torch.equal(rec.after[2][0], rec.after[1][0])
    assert trainer.nonfinite_guard.skipped_steps == [2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error_and_the_last_checkpoint_is_good(tmp_out):
    rec = Record()
    a = args(tmp_out, subspace_dim=64, max_steps=20, learning_rate=1e-2, save_strategy="steps", save_steps=2,
             max_consecutive_nonfinite_steps=3)
    trainer = NaNLossTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset(), callbacks=[rec])
    trainer.bad = range(2, 100)  # every step from the 3rd on
    with pytest.raises(NonFiniteTrainingError, match=r"step 5: 3 optimizer steps in a row had a non-finite loss") as e:
        trainer.train()
    assert "checkpoint-4" in str(e.value) and "resume_from_checkpoint" in str(e.value)
    assert not os.path.exists(os.path.join(tmp_out, "checkpoint-6"))  # nothing saved after the stop
    saved = load_file(os.path.join(tmp_out, "checkpoint-4", "adapter_model.safetensors"))
    c = next(v for k, v in saved.items() if "coeffs" in k)
    assert torch.isfinite(c).all() and torch.equal(c, rec.after[2][0])  # steps 3 and 4 were skipped: step 2's c


def test_the_twa_phase_skips_non_finite_coefficient_gradients(tmp_out):
    class NaNInTWA(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kwargs):
            if os.path.basename(a.output_dir) == "twa" and state.global_step in (1, 2):
                model.subspace.coeffs["twa"].grad.fill_(float("nan"))

    a = twa_args(tmp_out, num_train_epochs=1, twa_snapshot_steps=2, twa_epochs=1, twa_learning_rate=0.5)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=[NaNInTWA()])
    trainer.train()
    assert torch.isfinite(trainer.twa_result.coefficients).all()
    assert trainer.twa_result.coefficients.abs().sum() > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_guard_can_be_turned_off_and_its_setting_is_checked(tmp_out):
    a = args(tmp_out, subspace_dim=64, max_steps=3, skip_nonfinite_steps=False)
    trainer = NaNLossTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset())
    trainer.bad = (1,)
    trainer.train()
    assert trainer.nonfinite_guard is None
    assert not torch.isfinite(trainer.model.base_model.subspace.coeffs["default"]).all()  # what it guards against
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps must be a non-negative integer"):
        SubspaceTrainingArguments(output_dir=tmp_out, max_consecutive_nonfinite_steps=-1)


def test_a_nan_batch_leaves_batchnorm_statistics_as_they_were(tmp_out):
    """The bad batch's forward folds NaN into BatchNorm's running statistics before the step is skipped: they are
    put back, so evaluation after the run is finite (full fine-tuning of a ResNet)."""
    class NaNImages(SubspaceTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if self.state.global_step == 2:
                inputs = {**inputs, "pixel_values": inputs["pixel_values"] * float("nan")}
            return super().compute_loss(model, inputs, *a, **kw)

    class Stats(TrainerCallback):
        after = {}

        def on_step_end(self, a, state, control, model=None, **kwargs):
            bn = model.resnet.embedder.embedder.normalization
            Stats.after[state.global_step] = (bn.running_mean.clone(), bn.num_batches_tracked.clone())

    a = args(tmp_out, max_steps=5, learning_rate=1e-3)
    trainer = NaNImages(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=[Stats()])
    trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == [3]
    assert torch.equal(Stats.after[3][0], Stats.after[2][0]) and torch.equal(Stats.after[3][1], Stats.after[2][1])
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers() if b.is_floating_point())
    assert math.isfinite(trainer.evaluate(image_dataset(16, 1))["eval_loss"])


def test_under_a_grad_scaler_batchnorm_is_restored_only_when_its_skip_left_nan():
    """fp16's GradScaler skips inf steps itself (the guard stands aside); when it skipped one and the forward had
    folded NaN into BatchNorm's statistics, they are put back; after a skip that only lowered the scale, not."""
    from types import SimpleNamespace

    from hf_subspace.nonfinite import NonFiniteGuard

    model = tiny_resnet()
    accelerator = SimpleNamespace(scaler=object(), optimizer_step_was_skipped=True)
    guard = NonFiniteGuard(SimpleNamespace(accelerator=accelerator, model=model))
    guard.on_train_begin(None, None, None, model=model)
    bn = model.resnet.embedder.embedder.normalization
    for poison, restored in ((float("nan"), True), (0.5, False)):
        guard.on_step_begin(None, None, None, model=model)
        kept = bn.running_mean.clone()
        with torch.no_grad():
            bn.running_mean.add_(poison)
        guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
        guard.on_optimizer_step(None, None, None)
        assert torch.equal(bn.running_mean, kept) == restored
    assert guard.skipped == 0  # the scaler's skips are its own
