"""Skipping optimizer steps whose loss or gradient is not finite (NaN or ±Inf).

This module owns :class:`NonFiniteGuard` (the callback) and :class:`NonFiniteMixin` (what a Trainer subclass adds to
report its losses to it), used by :class:`~hf_subspace.SubspaceTrainer`, :class:`~hf_subspace.TWATrainer` and the
TWA phase's inner trainer. It imports only :mod:`hf_subspace.errors` and :mod:`hf_subspace.checkpoints` (for the
checkpoint to name when training stops), never a trainer module.

One bad batch (a NaN in the data, an overflow in half precision, a loss spike) must not make c non-finite for the
rest of a run. :class:`NonFiniteGuard` (a Trainer callback) looks at the accumulated loss and the gradients just
before the optimizer step. When one of them is not finite it drops every gradient (``p.grad = None``), so the
optimizer's ``step()`` leaves the parameters and its own state (Adam's moments and step counts, SGD's momentum)
exactly as they were, and BatchNorm running statistics are put back as they were when the step began; the step
still counts, so the learning-rate schedule and ``global_step`` move on as they would after a step skipped by fp16's GradScaler. Skips
are counted and logged (``nonfinite_steps_skipped`` in the logs); ``max_consecutive`` skips in a row stop training
with :class:`NonFiniteTrainingError` before anything further is saved, so the last checkpoint is the last good
state.

On several processes the decision is all-reduced (one float per step), so every rank skips the same steps.

Nothing is read back from the device per micro-batch: each loss's finiteness is folded into a flag on the device,
read once per optimizer step together with the gradients' (one device→host sync per optimizer step, which the
skip-or-step decision needs).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from transformers import TrainerCallback

from .checkpoints import last_complete_checkpoint
from .errors import NonFiniteTrainingError  # noqa: F401  (raised here; importable from here as before)

logger = logging.getLogger(__name__)


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after ``max_consecutive`` in a row.

    ``trainer`` is the :class:`transformers.Trainer` it is added to; its ``training_step`` must report each
    micro-batch's loss through :meth:`observe_loss` (:class:`NonFiniteMixin` does). ``max_consecutive=0`` never
    stops. Counts: ``skipped`` (in total), ``in_a_row``, ``skipped_steps`` (the global steps skipped, the last 100).
    """

    hf_subspace_internal = True  # a trainer's own: the TWA phase installs its own guard

    def __init__(self, trainer, max_consecutive: int = 10):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 0:
            raise ValueError(f"max_consecutive must be a non-negative integer, got {max_consecutive!r}")
        self.trainer = trainer
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.in_a_row = 0
        self.skipped_steps: list[int] = []
        self._bad_loss: Optional[torch.Tensor] = None  # on the device: some micro-batch's loss was not finite
        self._bn_buffers: list[torch.Tensor] = []  # the model's BatchNorm running statistics (found once)
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # and their values as the step began

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Note one micro-batch's loss (a detached scalar): folded into a flag on its device, no host read."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.in_a_row = 0
        self._bad_loss = None
        model = model if model is not None else self.trainer.model
        self._bn_buffers = [buf for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
                            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
        self._stats = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        """Keep the BatchNorm running statistics as the step starts: a bad batch's forward has already folded its
        NaNs into them by the time the step is skipped."""
        self._stats = [(buf, buf.detach().clone()) for buf in self._bn_buffers]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        loss_flag, self._bad_loss = self._bad_loss, None
        model = model if model is not None else self.trainer.model
        if getattr(self.trainer.accelerator, "scaler", None) is not None:
            return  # fp16 with a GradScaler: it skips steps with inf gradients itself (see on_optimizer_step)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad_loss = bad_grad = False
        if grads or loss_flag is not None:  # one host read for the loss flag and every gradient
            device = grads[0].device if grads else loss_flag.device
            no = torch.zeros((), dtype=torch.bool, device=device)
            loss_bad = no if loss_flag is None else loss_flag.to(device)
            grad_bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else no
            bad_loss, bad_grad = torch.stack([loss_bad, grad_bad]).tolist()
        bad = bad_loss or bad_grad
        bad = _any_rank(bad, grads[0].device if grads else torch.device("cpu"))
        if not bad:
            self.in_a_row = 0
            return
        for p in model.parameters():
            p.grad = None  # optimizers skip parameters without a gradient: no update, no state change
        self._restore_batchnorm()
        step = state.global_step + 1
        self.skipped += 1
        self.in_a_row += 1
        self.skipped_steps = (self.skipped_steps + [step])[-100:]
        what = "loss" if bad_loss else "gradient"
        logger.warning("step %d skipped: non-finite %s (%d skipped so far, %d in a row)", step, what, self.skipped,
                       self.in_a_row)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            last = _last_checkpoint(args.output_dir)
            where = (f"the last checkpoint, {last}, holds the last good state: resume from it with "
                     f"trainer.train(resume_from_checkpoint={last!r})" if last else "no checkpoint was saved")
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"{what} (NaN or Inf), {self.skipped} in all; {where}. Look for NaN/Inf in the data, lower the "
                "learning rate, or use bf16 instead of fp16; max_consecutive_nonfinite_steps sets how many bad steps "
                "in a row are tolerated (0: never stop)"
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        """fp16 with a GradScaler: when it skipped the step and the forward left NaN/Inf in the BatchNorm running
        statistics, put them back (a step it skipped only to lower its scale leaves them as they are)."""
        accelerator = self.trainer.accelerator
        if getattr(accelerator, "scaler", None) is None or not accelerator.optimizer_step_was_skipped:
            return
        if any(not bool(torch.isfinite(buf).all()) for buf, _ in self._stats if buf.is_floating_point()):
            self._restore_batchnorm()

    def _restore_batchnorm(self) -> None:
        with torch.no_grad():
            for buf, kept in self._stats:
                buf.copy_(kept)  # the BatchNorm statistics as before the skipped step's forwards


class NonFiniteMixin:
    """For a :class:`transformers.Trainer` subclass: reports each micro-batch's loss to ``self.nonfinite_guard``
    and adds ``nonfinite_steps_skipped`` to the logs once a step was skipped."""

    nonfinite_guard: Optional[NonFiniteGuard] = None

    def install_nonfinite_guard(self, max_consecutive: int) -> NonFiniteGuard:
        self.nonfinite_guard = NonFiniteGuard(self, max_consecutive)
        self.add_callback(self.nonfinite_guard)
        return self.nonfinite_guard

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_guard is not None:
            self.nonfinite_guard.observe_loss(loss)
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        guard = self.nonfinite_guard
        if guard is not None and guard.skipped and "loss" in logs:
            logs = {**logs, "nonfinite_steps_skipped": guard.skipped}
        return super().log(logs, *args, **kwargs)


def _any_rank(flag: bool, device: torch.device) -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _last_checkpoint(output_dir) -> Optional[str]:
    """The newest checkpoint of ``output_dir`` whose save was not cut short."""
    return last_complete_checkpoint(output_dir) if output_dir else None
