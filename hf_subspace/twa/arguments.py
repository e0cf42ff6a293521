"""``TWATrainingArguments``: the settings of Trainable Weight Averaging (TWA), the config half of the TRL-style
pair :class:`~hf_subspace.TWATrainingArguments` + :class:`~hf_subspace.TWATrainer`.

It owns the ``twa_*`` fields (:class:`TWAArguments`, a mixin also carried, deprecated, by
``SubspaceTrainingArguments(twa=True)`` until 0.4), their checks, and :func:`as_twa_arguments`, which turns
any arguments holding them into ``TWATrainingArguments``. It imports neither :mod:`hf_subspace.trainer` nor
:mod:`hf_subspace.twa.trainer`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from ..arguments import SharedTrainingArguments
from ..errors import SubspaceConfigError

TWA_LR_SCHEDULES = ("step", "linear", "cosine", "constant")
TWA_OPTIMIZERS = ("sgd", "adamw")

#: what a random subspace is set with: not settings of TWA (SubspaceTrainingArguments holds them)
RANDOM_SUBSPACE_SETTINGS = ("subspace_dim", "subspace_projection", "subspace_mode", "subspace_seed",
                            "subspace_projection_format", "subspace_target_modules", "subspace_modules_to_save",
                            "subspace_weight_decay", "subspace_lr_check_steps")


@dataclass
class TWAArguments:
    """The ``twa_*`` settings (a dataclass mixin; :class:`TWATrainingArguments` is what to use)."""

    twa_snapshot_steps: Optional[int] = field(default=None, metadata={"help": "snapshot every N steps "
                                                                               "(default: every epoch)"})
    twa_snapshot_start_step: int = field(default=0, metadata={"help": "take no snapshot before this step (skip "
                                                                     "the first, far-from-converged stretch)"})
    twa_snapshot_storage: str = field(default="memory", metadata={"help": "memory | disk"})
    twa_snapshot_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    twa_basis: str = field(default="twa", metadata={"help": "twa (all directions) | pca (top-k, DLDR)"})
    twa_num_components: Optional[int] = field(default=None, metadata={"help": "k for pca"})
    twa_center: bool = field(default=True, metadata={"help": "span the snapshots' differences from their mean "
                                                               "(False: the snapshots themselves, adding the mean's "
                                                               "direction, as the official TWA code does)"})
    twa_epochs: float = field(default=1.0, metadata={"help": "epochs of coefficient training"})
    twa_learning_rate: float = field(default=2.0, metadata={"help": "learning rate on the coefficients"})
    twa_optimizer: str = field(default="sgd", metadata={"help": "sgd (with twa_momentum, the paper's) | adamw "
                                                                "(per-coefficient step sizes; lr ~10x smaller)"})
    twa_momentum: float = field(default=0.9)
    twa_batch_size: Optional[int] = field(default=None, metadata={"help": "per-device batch of the TWA phase "
                                                                          "(default: per_device_train_batch_size)"})
    twa_weight_decay: float = field(default=1e-5)
    twa_lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75],
                                           metadata={"help": "fractions of the TWA phase where lr is multiplied "
                                                             "by twa_lr_gamma"})
    twa_lr_gamma: float = field(default=0.1)
    twa_lr_schedule: str = field(default="step", metadata={"help": "step (÷ twa_lr_gamma at twa_lr_milestones, the "
                                                                    "paper's default) | linear (to 0) | cosine (to "
                                                                    "0) | constant"})
    twa_bn_batches: Optional[int] = field(default=None, metadata={"help": "batches for BN recalibration (all)"})
    twa_shard_basis: bool = field(default=True, metadata={"help": "with several processes, shard the k x D basis "
                                                                  "across them by coordinates (k·D/N floats per rank; "
                                                                  "an all-gather and a reduce-scatter of D floats per "
                                                                  "step) instead of keeping it whole on each (4·k bytes "
                                                                  "per step)"})
    twa_max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping in the TWA phase (0: none, "
                                                                     "as in the paper)"})

    def _check_twa_arguments(self) -> None:
        """The TWA settings, checked when the arguments are made rather than after the whole ordinary phase."""
        if self.twa_basis not in ("twa", "pca"):
            raise SubspaceConfigError(f"twa_basis must be 'twa' or 'pca', got {self.twa_basis!r}")
        if self.twa_snapshot_dtype not in ("float32", "bfloat16", "float16"):
            raise SubspaceConfigError("twa_snapshot_dtype must be float32, bfloat16 or float16, got "
                                      f"{self.twa_snapshot_dtype!r}")
        if self.twa_lr_schedule not in TWA_LR_SCHEDULES:
            raise SubspaceConfigError(f"twa_lr_schedule must be one of {list(TWA_LR_SCHEDULES)}, got "
                                      f"{self.twa_lr_schedule!r}")
        if self.twa_optimizer not in TWA_OPTIMIZERS:
            raise SubspaceConfigError(f"twa_optimizer must be one of {list(TWA_OPTIMIZERS)}, got "
                                      f"{self.twa_optimizer!r}")
        self._check_twa_numbers()

    def _check_twa_numbers(self) -> None:
        def bad(name, what):
            raise SubspaceConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def number(name):
            v = getattr(self, name)
            return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)

        def count(name, minimum=1):
            v = getattr(self, name)
            return v is None or (not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= minimum)

        if not number("twa_learning_rate") or self.twa_learning_rate < 0:
            bad("twa_learning_rate", "a non-negative number (0: stay at the snapshots' mean, i.e. SWA)")
        if not number("twa_momentum") or not 0 <= self.twa_momentum < 1:
            bad("twa_momentum", "a number in [0, 1)")
        if not number("twa_weight_decay") or self.twa_weight_decay < 0:
            bad("twa_weight_decay", "a non-negative number")
        if not number("twa_lr_gamma") or self.twa_lr_gamma <= 0:
            bad("twa_lr_gamma", "a positive number (the factor the learning rate is multiplied by at each milestone)")
        if not number("twa_max_grad_norm") or self.twa_max_grad_norm < 0:
            bad("twa_max_grad_norm", "a non-negative number (0: no clipping)")
        if not number("twa_epochs") or self.twa_epochs <= 0:
            bad("twa_epochs", "a positive number of epochs")
        if any(isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1
               for f in self.twa_lr_milestones):
            bad("twa_lr_milestones", "fractions of the TWA phase, each strictly between 0 and 1 (e.g. [0.5, 0.75])")
        for name in ("twa_batch_size", "twa_bn_batches", "twa_snapshot_steps", "twa_num_components"):
            if not count(name):
                bad(name, "a positive integer or None")
        if not count("twa_snapshot_start_step", 0):
            bad("twa_snapshot_start_step", "a non-negative integer")
        for name in ("twa_batch_size", "twa_bn_batches", "twa_snapshot_steps", "twa_num_components",
                     "twa_snapshot_start_step"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))  # e.g. a numpy integer: a plain int from here on
        if self.twa_num_components is not None and self.twa_basis != "pca":
            raise SubspaceConfigError(f"twa_num_components={self.twa_num_components} only applies to twa_basis='pca' "
                                      "(the top-k directions); twa_basis='twa' keeps every direction of the snapshots. "
                                      "Set twa_basis='pca' or leave twa_num_components out")


@dataclass
class TWATrainingArguments(TWAArguments, SharedTrainingArguments):
    """``TrainingArguments`` plus the TWA settings (``twa_*``), for :class:`~hf_subspace.TWATrainer`.

    The ordinary phase is the Trainer's own run (``learning_rate``, ``num_train_epochs``, ``optim``, ...) taking
    snapshots (``twa_snapshot_*``); the TWA phase then trains the k coefficients of the snapshots' subspace with its
    own settings (``twa_learning_rate``, ``twa_epochs``, ``twa_optimizer``, ``twa_lr_schedule``, ...). Random-subspace
    settings (``subspace_dim``, ``subspace_*``) are refused: they belong to
    :class:`~hf_subspace.SubspaceTrainingArguments`.
    """

    def __new__(cls, *args, **kwargs):
        wrong = [k for k in kwargs if k in RANDOM_SUBSPACE_SETTINGS]
        if wrong:
            shown = ", ".join(f"{k}={kwargs[k]!r}" for k in wrong)
            raise SubspaceConfigError(
                f"TWATrainingArguments got {shown}: {'that is a setting' if len(wrong) == 1 else 'those are settings'} "
                "of a random subspace, which TWA does not use (it trains the ordinary model, then the subspace its "
                "snapshots span, so it cannot be combined with a random subspace). "
                "Leave them out, or train a random subspace with SubspaceTrainingArguments + SubspaceTrainer")
        if "twa" in kwargs:
            raise SubspaceConfigError(f"TWATrainingArguments got twa={kwargs['twa']!r}: it always runs TWA; leave "
                                      "twa out (it is a setting of the deprecated SubspaceTrainingArguments)")
        return super().__new__(cls)

    def __post_init__(self):
        super().__post_init__()
        self._check_twa_arguments()

    @property
    def twa(self) -> bool:
        """Always True (for code written against ``SubspaceTrainingArguments(twa=True)`` that reads ``args.twa``)."""
        return True

    def _check_trainer(self, trainer) -> None:
        if not getattr(trainer, "_reads_twa_arguments", False):
            raise SubspaceConfigError(f"{type(trainer).__name__} does not run TWA (it would train the model ordinarily "
                                      "and ignore the twa_* settings): use hf_subspace.TWATrainer")


def as_twa_arguments(args) -> TWATrainingArguments:
    """``args`` as :class:`TWATrainingArguments`: the same object when it is one, else a copy of its
    ``TrainingArguments`` and ``twa_*`` values (e.g. from the deprecated ``SubspaceTrainingArguments(twa=True)``)."""
    if isinstance(args, TWATrainingArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TWATrainingArguments)
              if f.init and hasattr(args, f.name)}
    return TWATrainingArguments(**values)


__all__ = ["TWAArguments", "TWATrainingArguments", "TWA_LR_SCHEDULES", "TWA_OPTIMIZERS", "as_twa_arguments"]
