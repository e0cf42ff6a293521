"""What the arguments of every hf_subspace trainer share: :class:`SharedTrainingArguments`.

:class:`~hf_subspace.SubspaceTrainingArguments` (random subspace) and :class:`~hf_subspace.TWATrainingArguments`
(Trainable Weight Averaging) both derive from it. It owns the reliability settings both trainers read (skipping
optimizer steps whose loss or gradient is not finite, :mod:`hf_subspace.nonfinite`) and the check that refuses a
plain ``transformers.Trainer`` given arguments whose settings it would silently ignore. It imports no trainer.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments


@dataclass
class SharedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the settings every hf_subspace trainer reads (not meant to be used alone)."""

    skip_nonfinite_steps: bool = field(default=True, metadata={
        "help": "skip an optimizer step whose loss or gradient is NaN/Inf (parameters and optimizer state "
                "untouched; counted as nonfinite_steps_skipped in the logs)"})
    max_consecutive_nonfinite_steps: int = field(default=10, metadata={
        "help": "stop with NonFiniteTrainingError after this many skipped steps in a row (0: never stop)"})

    def __post_init__(self):
        super().__post_init__()
        if (isinstance(self.max_consecutive_nonfinite_steps, bool)
                or not isinstance(self.max_consecutive_nonfinite_steps, int)
                or self.max_consecutive_nonfinite_steps < 0):
            raise ValueError("max_consecutive_nonfinite_steps must be a non-negative integer (0: never stop), got "
                             f"{self.max_consecutive_nonfinite_steps!r}")

    def get_process_log_level(self):
        """``TrainingArguments.get_process_log_level``, plus one check: ``transformers.Trainer.__init__`` calls it
        with its model already set, so a trainer that does not read these arguments is refused here
        (:meth:`_check_trainer`) instead of silently training something else."""
        trainer = sys._getframe(1).f_locals.get("self")  # the Trainer whose __init__ is asking
        if isinstance(trainer, Trainer):
            self._check_trainer(trainer)
        return super().get_process_log_level()

    def _check_trainer(self, trainer: Trainer) -> None:
        """Raise when ``trainer`` would ignore what these arguments ask for (subclasses say what)."""
