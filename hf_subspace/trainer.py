"""``SubspaceTrainingArguments`` + ``SubspaceTrainer``: a ``transformers.Trainer`` that trains in a subspace.

Two uses, from one set of arguments (the way TRL pairs a config with a trainer):

* **random subspace** — ``subspace_dim=d``: a plain model is wrapped as a PEFT subspace adapter (or pass one
  already wrapped); everything else is the Trainer you know (evaluation, callbacks, logging, gradient
  accumulation, bf16/fp16, activation checkpointing, checkpoints holding the adapter, resuming, pushing).
* **TWA** — ``twa=True``: the ordinary run collects weight snapshots, then the trainer builds the trajectory
  basis, moves to the snapshots' mean (SWA), recalibrates BatchNorm, trains the k coefficients with SGD
  (momentum, large step-decayed learning rate), merges and recalibrates again. :func:`twa_from_checkpoints`
  does the second part from the ``checkpoint-*`` folders of an earlier run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .nonfinite import NonFiniteGuard, NonFiniteMixin
from .errors import SubspaceConfigError, TWASnapshotError
from .reparam import SubspaceEngine, find_engine, layout_from_names, validate_subspace_args
from .projections import PROJECTION_KINDS
from .tuner.config import PEFT_TYPE, SubspaceConfig, is_subspace_model

logger = logging.getLogger(__name__)


@dataclass
class SubspaceTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the subspace and TWA settings (all prefixed ``subspace_`` / ``twa_``).

    Learning rate: with a random subspace use ``learning_rate`` 1e-3 to 1e-1 with Adam(W) (the examples use 2e-2
    to 1e-1), not full fine-tuning's 1e-5 to 5e-5. P has unit-length columns, so ‖θ - θ0‖ ≈ ‖c‖: the d numbers of
    c carry the whole change of the model's weights, while Adam moves each of them by about ``learning_rate`` per
    step. At 2e-5, c (and so θ) moves ~1,000x less than at 2e-2 and training seems to do nothing; the trainer
    warns when that happens (``subspace_lr_check_steps``). TWA's coefficients have their own ``twa_learning_rate``.
    """

    subspace_dim: Optional[int] = field(default=None, metadata={"help": "d: train a random subspace of this size"})
    subspace_projection: str = field(default="hashing", metadata={"help": "hashing | fastfood | sparse | dense"})
    subspace_mode: str = field(default="global", metadata={"help": "global | said"})
    subspace_seed: int = field(default=0, metadata={"help": "seed P is generated from"})
    subspace_projection_format: Optional[int] = field(default=None, metadata={
        "help": "format of P (default: the latest; 1 = as hf_subspace 0.1.0 generated it)"})
    subspace_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "None = all parameters"})
    subspace_modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "trained in full"})
    subspace_weight_decay: bool = field(default=False, metadata={"help": "apply weight_decay to c (off: decay on c "
                                                                         "pulls θ toward θ0, rarely wanted)"})
    twa: bool = field(default=False, metadata={"help": "one-run TWA: ordinary phase with snapshots, then TWA"})
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
    subspace_lr_check_steps: int = field(default=20, metadata={
        "help": "after this many optimizer steps, warn if θ has barely moved (‖θ-θ0‖ < 1e-4 ‖θ0‖): the learning "
                "rate is then far too small for c (0: no check)"})
    skip_nonfinite_steps: bool = field(default=True, metadata={
        "help": "skip an optimizer step whose loss or gradient is NaN/Inf (parameters and optimizer state "
                "untouched; counted as nonfinite_steps_skipped in the logs)"})
    max_consecutive_nonfinite_steps: int = field(default=10, metadata={
        "help": "stop with NonFiniteTrainingError after this many skipped steps in a row (0: never stop)"})

    def __post_init__(self):
        super().__post_init__()
        if self.subspace_dim is not None:
            validate_subspace_args(self.subspace_dim, self.subspace_projection, self.subspace_mode)
        elif not self.twa:
            defaults = _subspace_defaults()
            ignored = [f"{n}={getattr(self, n)!r}" for n in SUBSPACE_ONLY if getattr(self, n) != defaults[n]]
            if ignored:
                raise SubspaceConfigError(
                    f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} set but subspace_dim is not, so "
                    f"{'it' if len(ignored) == 1 else 'they'} would be ignored and every weight of the model would be "
                    "fine-tuned. Set subspace_dim=d (--subspace_dim d: the number of trainable coefficients, e.g. "
                    "1000) to train in a random subspace, or leave the subspace_* settings out for full fine-tuning")
        if self.twa and self.subspace_dim is not None:
            raise ValueError("twa=True trains the ordinary model first; it cannot be combined with subspace_dim")
        if self.twa_basis not in ("twa", "pca"):
            raise ValueError(f"twa_basis must be 'twa' or 'pca', got {self.twa_basis!r}")
        if self.twa_snapshot_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"twa_snapshot_dtype must be float32, bfloat16 or float16, got {self.twa_snapshot_dtype!r}")
        if self.twa_lr_schedule not in TWA_LR_SCHEDULES:
            raise ValueError(f"twa_lr_schedule must be one of {list(TWA_LR_SCHEDULES)}, got {self.twa_lr_schedule!r}")
        if self.twa_epochs <= 0:
            raise ValueError(f"twa_epochs must be positive, got {self.twa_epochs}")
        if (isinstance(self.subspace_lr_check_steps, bool) or not isinstance(self.subspace_lr_check_steps, int)
                or self.subspace_lr_check_steps < 0):
            raise SubspaceConfigError("subspace_lr_check_steps must be a non-negative integer (0: no check), got "
                                      f"{self.subspace_lr_check_steps!r}")
        if (isinstance(self.max_consecutive_nonfinite_steps, bool) or not isinstance(self.max_consecutive_nonfinite_steps, int)
                or self.max_consecutive_nonfinite_steps < 0):
            raise ValueError("max_consecutive_nonfinite_steps must be a non-negative integer (0: never stop), got "
                             f"{self.max_consecutive_nonfinite_steps!r}")
        if self.twa_optimizer not in TWA_OPTIMIZERS:
            raise ValueError(f"twa_optimizer must be one of {list(TWA_OPTIMIZERS)}, got {self.twa_optimizer!r}")
        self._check_twa_numbers()

    def get_process_log_level(self):
        """``TrainingArguments.get_process_log_level``, plus one check: ``transformers.Trainer.__init__`` calls it
        with its model already set, so a plain ``Trainer`` given these arguments and an unwrapped model is refused
        here (it would silently fine-tune every weight at the subspace's learning rate)."""
        trainer = sys._getframe(1).f_locals.get("self")
        if (isinstance(trainer, Trainer) and not isinstance(trainer, SubspaceTrainer)
                and (self.subspace_dim is not None or self.twa)):
            model = getattr(trainer, "model", None)
            what = f"subspace_dim={self.subspace_dim}" if self.subspace_dim is not None else "twa=True"
            if model is not None and find_engine(model) is None:
                raise SubspaceConfigError(
                    f"{type(trainer).__name__} was given SubspaceTrainingArguments({what}) and a plain "
                    f"{type(model).__name__}: it does not read the subspace settings, so it would fine-tune all "
                    f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} weights. Use "
                    "hf_subspace.SubspaceTrainer (it wraps the model), or wrap the model first with "
                    "peft.get_peft_model(model, hf_subspace.SubspaceConfig(dim=...))")
            if self.twa:
                raise SubspaceConfigError(f"{type(trainer).__name__} does not run TWA (twa=True): use "
                                          "hf_subspace.SubspaceTrainer")
        return super().get_process_log_level()

    def _check_twa_numbers(self) -> None:
        """The TWA phase's numbers, checked now rather than after the whole ordinary phase."""
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


#: the settings that only a random subspace (subspace_dim) uses
SUBSPACE_ONLY = ("subspace_projection", "subspace_mode", "subspace_seed", "subspace_projection_format",
                 "subspace_target_modules", "subspace_modules_to_save", "subspace_weight_decay")


def _subspace_defaults() -> dict:
    """The defaults of :data:`SUBSPACE_ONLY` (what arguments without a random subspace must hold)."""
    return {f.name: f.default for f in dataclasses.fields(SubspaceTrainingArguments) if f.name in SUBSPACE_ONLY}


def _task_type(model) -> Optional[str]:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def wrap_model(model: nn.Module, args: SubspaceTrainingArguments):
    """Turn ``model`` into a PEFT subspace model according to ``args`` (unchanged if already one)."""
    if is_subspace_model(model):
        config = next(c for c in model.peft_config.values() if getattr(c, "peft_type", None) == PEFT_TYPE)
        if args.subspace_dim is not None and args.subspace_dim != config.dim:
            raise SubspaceConfigError(
                f"the model is already a subspace model with dim={config.dim}, but subspace_dim={args.subspace_dim}: "
                "pass the plain model to have the trainer wrap it, or leave subspace_dim out to train it as it is")
        if args.twa:
            raise SubspaceConfigError("twa=True trains the ordinary model and then its trajectory's subspace; pass "
                                      "the plain model, not one already wrapped as a random subspace")
        return model
    if args.subspace_dim is None:
        return model

    from peft import get_peft_model

    config = SubspaceConfig(
        dim=args.subspace_dim, projection=args.subspace_projection, mode=args.subspace_mode, seed=args.subspace_seed,
        projection_format=args.subspace_projection_format, target_modules=args.subspace_target_modules, modules_to_save=args.subspace_modules_to_save,
        task_type=_task_type(model),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated name (for every method): not the user's
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


class _SubspaceInfoCallback(TrainerCallback):
    """Logs d, D and the number of trainable parameters when training starts."""

    def __init__(self, trainer: "SubspaceTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        info = self.trainer.subspace_info()
        if info:
            logger.info("subspace training: %s", info)
            self.trainer.log(info)


class _LearningRateCheckCallback(TrainerCallback):
    """After ``args.subspace_lr_check_steps`` optimizer steps, warn when θ has barely moved: ‖Δc‖ < 1e-4 ‖θ0‖ over
    θ (P's columns have unit length, so ‖θ - θ0‖ ≈ ‖Δc‖) — the mark of a full fine-tuning learning rate given to c.
    One pass over θ0 when training starts; nothing per step but an integer comparison."""

    RELATIVE = 1e-4

    def __init__(self, trainer: "SubspaceTrainer"):
        self.trainer = trainer
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = find_engine(self.trainer.model)
        self.start = None
        if engine is None or args.subspace_lr_check_steps <= 0 or args.twa:
            return
        adapter = engine.active[0]
        slots = engine.adapters[adapter].layout.slots
        from .fsdp import sum_of_squares

        norm = math.sqrt(sum_of_squares([engine.original(s.name) for s in slots]))  # FSDP2 shards: all-reduced
        self.start = (adapter, engine.coeffs[adapter].detach().clone(), norm, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            return
        adapter, c0, norm, first = self.start
        if state.global_step - first < min(args.subspace_lr_check_steps, max(state.max_steps - first, 1)):
            return
        self.start = None
        moved = float((find_engine(self.trainer.model).coeffs[adapter].detach() - c0).norm())
        if moved < self.RELATIVE * norm:
            lr = args.learning_rate  # the peak: the schedule's current value may have decayed already
            message = (
                f"after {state.global_step - first} steps θ has moved by ‖Δc‖ = {moved:.3g}, "
                f"{moved / norm if norm else 0:.2g} of ‖θ0‖ = {norm:.3g}: the learning rate ({lr:g}) is likely far too "
                "small for a subspace. c's d numbers carry the whole change of the weights (P has unit columns, so "
                "‖θ-θ0‖ ≈ ‖c‖) and Adam moves each by about the learning rate per step: use 1e-3 to 1e-1 (the "
                "examples use 2e-2 to 1e-1), not full fine-tuning's 1e-5 to 5e-5")
            logger.warning(message)
            warnings.warn(message, stacklevel=2)


class _DistributedChecksCallback(TrainerCallback):
    """On several processes, when training starts (the model wrapped): refuse FSDP1 / ZeRO-3 (under FSDP2: check
    that c is not sharded, hook its gradient average), and compare every
    rank's projection with rank 0's (:func:`hf_subspace.check_projections_match`)."""

    def __init__(self, trainer: "SubspaceTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from .distributed import check_projections_match, refuse_sharded_training

        trainer = self.trainer
        if find_engine(trainer.model) is None or args.world_size <= 1:
            return
        refuse_sharded_training(trainer.model_wrapped, trainer.accelerator)
        check_projections_match(trainer.model)


class SubspaceTrainer(NonFiniteMixin, Trainer):
    """A ``transformers.Trainer`` for subspace training. See the module docstring.

    ``model`` is a plain model (wrapped from ``args.subspace_*``), an already-wrapped subspace model, or — with
    ``args.twa`` — the plain model to train ordinarily and then with TWA.
    """

    def __init__(self, model=None, args: SubspaceTrainingArguments = None, *targs, **kwargs):
        if args is None:
            raise ValueError("SubspaceTrainer needs SubspaceTrainingArguments(output_dir=...)")
        if not isinstance(args, SubspaceTrainingArguments):
            raise ValueError(f"args must be SubspaceTrainingArguments, got {type(args).__name__}")
        if model is not None:
            model = wrap_model(model, args)
        super().__init__(model, args, *targs, **kwargs)
        if args.subspace_dim is not None or args.twa or (model is not None and is_subspace_model(model)):
            from .distributed import refuse_sharded_training

            refuse_sharded_training(self.model, self.accelerator,
                                    what="TWA" if args.twa else "subspace training")
        self.add_callback(_SubspaceInfoCallback(self))
        self.add_callback(_DistributedChecksCallback(self))
        self.add_callback(_LearningRateCheckCallback(self))
        if args.skip_nonfinite_steps:
            self.install_nonfinite_guard(args.max_consecutive_nonfinite_steps)
        self.snapshot_callback = None
        self.twa_result = None
        if args.twa:
            from .twa import SnapshotCallback

            # its store is made when training starts (train()): a fresh one, or the one a resumed checkpoint lists
            self.snapshot_callback = SnapshotCallback(
                every_n_steps=args.twa_snapshot_steps, per_epoch=args.twa_snapshot_steps is None,
                dtype=getattr(torch, args.twa_snapshot_dtype), start_step=args.twa_snapshot_start_step,
                min_snapshots=2,
            )
            self.add_callback(self.snapshot_callback)

    def call_model_init(self, trial=None):
        """``model_init`` (what ``hyperparameter_search`` calls for every trial) gives a plain model: wrap it too."""
        return wrap_model(super().call_model_init(trial), self.args)

    # -- information ------------------------------------------------------------------------------------------
    def subspace_info(self) -> dict:
        model = self.model
        engine = find_engine(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if engine is None:
            return {}
        adapter = engine.active[0]
        state = engine.adapters[adapter]
        return {"subspace_d": int(engine.coeffs[adapter].numel() + (engine.scales[adapter].numel()
                                                                  if adapter in engine.scales else 0)),
                "subspace_D": int(state.layout.D), "subspace_projection": state.projection.kind,
                "trainable_params": int(trainable)}

    # -- optimizer: no weight decay on c unless asked -------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.args.subspace_weight_decay:
            return names
        return [n for n in names if "subspace.vectors." not in n]  # c and λ: subspace.vectors.<adapter>.coeffs

    # -- model card -------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs):
        """After TWA, write our TWA card (library_name: transformers — the result is a merged model)."""
        if self.twa_result is None:
            return super().create_model_card(*args, **kwargs)
        from .atomic import atomic_write
        from .hub import twa_card

        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with atomic_write(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(twa_card(self.model, self.twa_result, repo_id=self.args.hub_model_id,
                                 base_model=kwargs.get("finetuned_from")))

    # -- training ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; with ``twa=True`` the ordinary phase, then the TWA phase.

        ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint (one a kill in the middle of its
        save left without ``trainer_state.json`` is passed over). A one-run TWA resumes in either phase: in the
        ordinary one with the snapshots taken before the checkpoint (listed in its ``twa_snapshots.json``), in the
        TWA one from ``<output_dir>/twa/checkpoint-*`` (the basis is rebuilt from the same snapshots).
        """
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if not self.args.twa:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
            if isinstance(resume_from_checkpoint, (str, os.PathLike)):
                _check_resumed_adapter(self.model, str(resume_from_checkpoint))
            return super().train(resume_from_checkpoint, *args, **kwargs)
        from transformers.trainer_utils import TrainOutput

        from .twa import SnapshotStore

        out = self.args.output_dir
        twa_dir = os.path.join(out, "twa")
        phase = _read_json(os.path.join(twa_dir, TWA_PHASE_FILE)) if resume_from_checkpoint is not None else None
        twa_checkpoint = None
        if resume_from_checkpoint is True:
            if phase is not None:
                twa_checkpoint = last_complete_checkpoint(twa_dir, phase_id=phase["id"])
            else:
                resume_from_checkpoint = last_complete_checkpoint(out) or True
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            inside = os.path.abspath(resume_from_checkpoint).startswith(os.path.abspath(twa_dir) + os.sep)
            if inside:
                if phase is None:
                    raise ValueError(f"{resume_from_checkpoint} is a TWA-phase checkpoint, but {twa_dir} has no "
                                     f"{TWA_PHASE_FILE} telling which snapshots the phase was built from")
                twa_checkpoint = str(resume_from_checkpoint)
            else:
                phase = None
        if phase is not None:  # the ordinary phase ended before the interruption: go straight to the TWA phase
            self.snapshot_callback.store = SnapshotStore.restore(
                phase["snapshots"], os.path.join(out, phase["snapshots"]["directory"]),
                storage=self.args.twa_snapshot_storage)
            output = TrainOutput(**phase["ordinary"])
            logger.info("resuming one-run TWA in its TWA phase (%s)", twa_checkpoint or "from the phase's start")
        else:
            self.snapshot_callback.store = self._snapshot_store(resume_from_checkpoint)
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            phase = self._record_twa_phase(output)
        self.twa_result = run_twa_phase(self, self.snapshot_callback.store, resume_from_checkpoint=twa_checkpoint,
                                        phase_id=phase["id"] if phase else None)
        return output

    def _snapshot_store(self, resume_from_checkpoint):
        """The ordinary phase's snapshot store: new, or as the checkpoint being resumed lists it."""
        from .twa import SnapshotStore

        args = self.args
        directory = os.path.join(args.output_dir, TWA_SNAPSHOT_DIR)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            manifest = _read_json(os.path.join(resume_from_checkpoint, TWA_MANIFEST_FILE))
            if manifest is not None:
                return SnapshotStore.restore(manifest, os.path.join(args.output_dir, manifest["directory"]),
                                             storage=args.twa_snapshot_storage)
            logger.warning("%s has no %s (not written by a one-run TWA): the TWA basis will span only the snapshots "
                           "taken from here on", resume_from_checkpoint, TWA_MANIFEST_FILE)
        writes = args.twa_snapshot_storage == "disk" or args.save_strategy != "no"  # into twa_snapshots/, twa/
        if resume_from_checkpoint is None and writes:
            from .errors import TWASnapshotError

            phase = os.path.join(args.output_dir, "twa", TWA_PHASE_FILE)
            earlier = [p for p in (directory, phase) if os.path.isfile(p) or (os.path.isdir(p) and any(
                name.startswith("snapshot-") for name in os.listdir(p)))]
            if earlier:
                raise TWASnapshotError(
                    f"{earlier[0]} holds {'TWA snapshots' if earlier[0] == directory else 'the TWA phase record'} of "
                    "an earlier one-run TWA in this output_dir, which a new run would mix with its own: resume it "
                    "with trainer.train(resume_from_checkpoint=True), or choose another output_dir (or delete it)")
        return SnapshotStore(storage=args.twa_snapshot_storage,
                             directory=directory if args.twa_snapshot_storage == "disk" else None,
                             dtype=getattr(torch, args.twa_snapshot_dtype))

    def _save_checkpoint(self, model, trial):
        """A checkpoint of a one-run TWA also lists the snapshots taken so far (memory ones are written to
        ``<output_dir>/twa_snapshots`` first), before the Trainer writes ``trainer_state.json`` last."""
        if self.args.twa and self.snapshot_callback is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from .atomic import write_json

            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_json(os.path.join(folder, TWA_MANIFEST_FILE), self._snapshot_manifest(), indent=1)
        return super()._save_checkpoint(model, trial)

    def _subspace_under_fsdp2(self) -> bool:
        """A subspace model sharded by FSDP2 (θ0 sharded, c and λ whole on every rank)."""
        from .distributed import sharding_kind

        return (getattr(self, "is_fsdp_enabled", False) and find_engine(self.model) is not None
                and is_subspace_model(self.model) and sharding_kind(self.model) == "FSDP2")

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Under FSDP2 the Trainer would gather the whole model (FULL_STATE_DICT) or save nothing here
        (SHARDED_STATE_DICT); a subspace adapter is c and its config: the main process writes them, nothing of
        size D is gathered (``PeftModel.save_pretrained`` reads only c from the sharded model)."""
        if self._subspace_under_fsdp2():
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir)
            return
        return super().save_model(output_dir, _internal_call)

    @contextlib.contextmanager
    def _checkpoint_as_replicated(self):
        """Under FSDP2 a subspace model's checkpoint is its adapter (c, written by :meth:`save_model`) and the
        optimizer state of c and λ, the same on every rank: saved and loaded as without FSDP (the main process
        writes ``optimizer.pt``), instead of accelerate's FSDP checkpointing of the whole sharded model (θ0 gathered
        to rank 0 under FULL_STATE_DICT)."""
        if not self._subspace_under_fsdp2():
            yield
            return
        self.is_fsdp_enabled = False
        try:
            yield
        finally:
            self.is_fsdp_enabled = True

    def _save_optimizer_and_scheduler(self, output_dir):
        with self._checkpoint_as_replicated():
            return super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with self._checkpoint_as_replicated():
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._checkpoint_as_replicated():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _snapshot_manifest(self) -> dict:
        """The snapshots so far, made durable in ``<output_dir>/twa_snapshots`` and listed (relative to output_dir)."""
        manifest = self.snapshot_callback.store.persist(os.path.join(self.args.output_dir, TWA_SNAPSHOT_DIR))
        manifest["directory"] = TWA_SNAPSHOT_DIR
        return manifest

    def _record_twa_phase(self, output) -> Optional[dict]:
        """When checkpoints are saved, note where the TWA phase starts (``twa/phase.json``: its snapshots and the
        ordinary phase's result), so that an interruption in the TWA phase resumes there."""
        if self.args.save_strategy == "no":
            return None
        import uuid

        from .atomic import write_json

        phase = {"id": uuid.uuid4().hex, "ordinary": {"global_step": output.global_step,
                                                      "training_loss": output.training_loss,
                                                      "metrics": dict(output.metrics)}}
        if self.args.should_save:
            phase["snapshots"] = self._snapshot_manifest()
            os.makedirs(os.path.join(self.args.output_dir, "twa"), exist_ok=True)
            write_json(os.path.join(self.args.output_dir, "twa", TWA_PHASE_FILE), phase, indent=1)
        return phase


TWA_SNAPSHOT_DIR = "twa_snapshots"
TWA_MANIFEST_FILE = "twa_snapshots.json"
TWA_PHASE_FILE = "phase.json"
TWA_COEFFICIENTS_FILE = "twa_coefficients.safetensors"
TWA_PHASE_MARK_FILE = "twa_phase.json"  # in each TWA-phase checkpoint: the id of the phase it belongs to


#: what a checkpoint's subspace adapter and the model it resumes in must share (else c means another P c)
_RESUME_KEYS = ("dim", "projection", "mode", "seed", "projection_format", "projection_options", "num_weights",
                "layout_hash")
_RESUME_ARGS = {"dim": "subspace_dim", "projection": "subspace_projection", "mode": "subspace_mode",
                "seed": "subspace_seed", "projection_format": "subspace_projection_format",
                "num_weights": "subspace_target_modules", "layout_hash": "subspace_target_modules"}


def _check_resumed_adapter(model, checkpoint: str) -> None:
    """Refuse to resume a subspace run from a checkpoint whose adapter was trained with other subspace settings:
    its c would be loaded and trained as coefficients of another P (peft keeps the model's own config)."""
    from .errors import AdapterMismatchError

    configs = getattr(model, "peft_config", None)
    if not is_subspace_model(model) or not isinstance(configs, dict):
        return
    for name, config in configs.items():
        saved = _read_json(os.path.join(checkpoint, "adapter_config.json") if name == "default"
                           else os.path.join(checkpoint, name, "adapter_config.json"))
        if saved is None or saved.get("peft_type") != PEFT_TYPE:
            continue
        if saved.get("projection_format") is None and saved.get("projection") in PROJECTION_KINDS:
            saved["projection_format"] = 1  # saved by hf_subspace 0.1.0
        differ = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(config, k, None)
                  and not (k == "projection_options" and not saved[k] and not getattr(config, k, None))]
        if differ:
            shown = ", ".join(f"{k}={saved[k]!r} there but {getattr(config, k, None)!r} here" for k in differ)
            flags = sorted({_RESUME_ARGS[k] for k in differ if k in _RESUME_ARGS})
            raise AdapterMismatchError(
                f"{checkpoint} holds adapter {name!r} trained with other subspace settings ({shown}); resuming would "
                f"train its coefficients as those of another subspace. Resume with the settings it was trained with"
                + (f" ({', '.join(flags)})" if flags else "") + ", or start a new run in another output_dir")


def _read_json(path) -> Optional[dict]:
    import json

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_complete_checkpoint(folder, phase_id: Optional[str] = None) -> Optional[str]:
    """The newest ``checkpoint-<step>`` folder of ``folder`` that holds ``trainer_state.json`` (written last, so a
    checkpoint cut short by a kill is passed over), and for the TWA phase, of phase ``phase_id``."""
    from .twa.snapshots import _CHECKPOINT_RE

    if not os.path.isdir(folder):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                    if (m := _CHECKPOINT_RE.fullmatch(name))), reverse=True)
    for _, name in found:
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            logger.warning("passing over %s: it has no trainer_state.json (its save was cut short)", path)
            continue
        if phase_id is not None and (_read_json(os.path.join(path, TWA_PHASE_MARK_FILE)) or {}).get("id") != phase_id:
            continue
        return path
    return None


def run_twa_phase(trainer: Trainer, snapshots, model: Optional[nn.Module] = None, names=None,
                  resume_from_checkpoint: Optional[str] = None, phase_id: Optional[str] = None):
    """The TWA phase: basis from ``snapshots``, start at their mean, train the coefficients, merge.

    ``trainer`` supplies the data, collator, metrics and (``SubspaceTrainingArguments``) the TWA settings.
    The model ends as a plain model with θ = mean + Qᵀc written into its weights. Returns the
    :class:`~hf_subspace.twa.TrajectoryBasisResult` with ``coefficients`` and ``metrics`` added.

    With ``save_strategy`` set, the phase saves checkpoints (c, optimizer, schedule, RNG) in
    ``<output_dir>/twa/checkpoint-*``, marked with ``phase_id``; ``resume_from_checkpoint`` continues from one.
    The phase starts from ``set_seed(args.seed)``, so a resumed run recalibrates and trains as an uninterrupted one.
    """
    from transformers import set_seed

    from .twa import build_trajectory_basis, recalibrate_batchnorm

    args: SubspaceTrainingArguments = trainer.args
    model = model if model is not None else trainer.model
    if names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    _check_snapshots_fit(model, snapshots, names)
    sharded = args.world_size > 1 and args.twa_shard_basis
    if sharded:  # no rank holds the whole k x D basis while it is built and trained (hf_subspace.twa.sharded)
        from .twa.sharded import build_sharded_trajectory_basis

        result = build_sharded_trajectory_basis(snapshots, names=names, method=args.twa_basis,
                                                k=args.twa_num_components, center=args.twa_center)
    else:
        result = build_trajectory_basis(snapshots, names=names, method=args.twa_basis, k=args.twa_num_components,
                                        center=args.twa_center)
    params = dict(model.named_parameters())
    requires_grad = {n: p.requires_grad for n, p in params.items()}
    with torch.no_grad():
        for n in result.names:
            params[n].copy_(result.mean[n].to(params[n].device, params[n].dtype))
    set_seed(args.seed)  # what follows does not depend on how the ordinary phase got here (resumed or not)
    train_loader = trainer.get_train_dataloader()
    recalibrate_batchnorm(model, train_loader, num_batches=args.twa_bn_batches)
    if args.world_size > 1:  # each rank read its share of the data: average, so all ranks hold the same model
        from .distributed import average_batchnorm_statistics

        average_batchnorm_statistics(model)

    engine = SubspaceEngine()
    layout = layout_from_names(model, result.names)
    engine.add_adapter(model, "twa", layout, result.k, result.projection)
    model.requires_grad_(False)
    model.add_module("subspace", engine)
    engine.coeffs["twa"].requires_grad_(True)
    if args.world_size > 1:  # the ranks' snapshots, hence their bases, must agree (they do under DDP)
        from .distributed import check_projections_match

        check_projections_match(model)

    twa_args = dataclasses.replace(
        args, twa=False, num_train_epochs=args.twa_epochs, max_steps=-1, learning_rate=args.twa_learning_rate,
        **_subspace_defaults(),  # no random subspace in this phase: its settings at their defaults
        weight_decay=args.twa_weight_decay, output_dir=os.path.join(args.output_dir, "twa"),
        load_best_model_at_end=False, push_to_hub=False, warmup_steps=0,
        per_device_train_batch_size=args.twa_batch_size or args.per_device_train_batch_size,
        max_grad_norm=args.twa_max_grad_norm,
    )
    batches = (len(train_loader) if not args.twa_batch_size
               else math.ceil(len(train_loader) * args.per_device_train_batch_size / args.twa_batch_size))
    steps_per_epoch = max(1, batches // max(1, args.gradient_accumulation_steps))
    total = max(1, math.ceil(steps_per_epoch * args.twa_epochs))
    optimizer = _twa_optimizer([engine.coeffs["twa"]], args)
    scheduler = _twa_scheduler(optimizer, args, total)
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    from .twa import SnapshotCallback

    internal = (DefaultFlowCallback, PrinterCallback, ProgressCallback, SnapshotCallback, _SubspaceInfoCallback,
                _DistributedChecksCallback, NonFiniteGuard)
    user_callbacks = [cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, internal)]
    inner = _TWAPhaseTrainer(
        engine.coeffs["twa"], phase_id, model=model, args=twa_args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
        data_collator=trainer.data_collator, compute_metrics=trainer.compute_metrics,
        optimizers=(optimizer, scheduler), processing_class=trainer.processing_class, callbacks=user_callbacks,
    )
    if args.skip_nonfinite_steps:
        inner.install_nonfinite_guard(args.max_consecutive_nonfinite_steps)
    train_out = inner.train(resume_from_checkpoint=resume_from_checkpoint)

    result.coefficients = engine.coeffs["twa"].detach().cpu().clone()
    engine.merge(["twa"])
    if sharded:  # after training, rank 0 gets the whole basis (for save_twa_adapter there); the others keep shards
        from .projections import TrajectoryProjection

        result.basis_bytes_per_rank = result.projection.state_bytes()
        whole = result.projection.gather_basis(dst=0)
        if whole is not None:
            result.projection = TrajectoryProjection(whole)
    engine.remove_parametrizations(model)
    del model._modules["subspace"]
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    recalibrate_batchnorm(model, train_loader, num_batches=args.twa_bn_batches)
    if args.world_size > 1:
        from .distributed import average_batchnorm_statistics

        average_batchnorm_statistics(model)
    result.metrics = dict(train_out.metrics)
    trainer.model = model
    if trainer.eval_dataset is not None:
        result.metrics.update(trainer.evaluate(metric_key_prefix="twa_eval"))
    return result


class _TWAPhaseTrainer(NonFiniteMixin, Trainer):
    """The TWA phase's Trainer: its checkpoints hold the k coefficients (not the model), marked with the phase."""

    def __init__(self, coefficients: torch.Tensor, phase_id: Optional[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coefficients = coefficients
        self.phase_id = phase_id

    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:
            return
        from .atomic import save_safetensors, write_json

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_safetensors({"coefficients": self.coefficients.detach().cpu().contiguous()},
                         os.path.join(output_dir, TWA_COEFFICIENTS_FILE))
        write_json(os.path.join(output_dir, TWA_PHASE_MARK_FILE), {"id": self.phase_id})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, TWA_COEFFICIENTS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} is not a TWA-phase checkpoint: it has no {TWA_COEFFICIENTS_FILE}")
        c = load_file(path)["coefficients"]
        if c.shape != self.coefficients.shape:
            raise ValueError(f"{path} holds {c.numel()} TWA coefficients, but the basis rebuilt from the snapshots "
                             f"has k={self.coefficients.numel()}: the checkpoint belongs to another TWA phase")
        with torch.no_grad():
            self.coefficients.copy_(c.to(self.coefficients.device))


TWA_LR_SCHEDULES = ("step", "linear", "cosine", "constant")
TWA_OPTIMIZERS = ("sgd", "adamw")


def _twa_optimizer(params, args: "SubspaceTrainingArguments") -> torch.optim.Optimizer:
    """The TWA phase's optimizer over the coefficients (weight decay pulls c toward 0, i.e. θ toward the mean)."""
    if args.twa_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.twa_learning_rate, weight_decay=args.twa_weight_decay)
    return torch.optim.SGD(params, lr=args.twa_learning_rate, momentum=args.twa_momentum,
                           weight_decay=args.twa_weight_decay)


def _twa_scheduler(optimizer, args: "SubspaceTrainingArguments", total: int):
    """The TWA phase's learning-rate schedule over ``total`` optimizer steps."""
    if args.twa_lr_schedule == "step":
        milestones = sorted({max(1, int(f * total)) for f in args.twa_lr_milestones if 0 < f < 1})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=args.twa_lr_gamma)
    if args.twa_lr_schedule == "linear":
        factor = lambda step: max(0.0, 1.0 - step / total)  # noqa: E731
    elif args.twa_lr_schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_snapshots_fit(model: nn.Module, snapshots, names) -> None:
    """Raise a :class:`~hf_subspace.errors.TWASnapshotError` (a ValueError) for fewer than 2 snapshots, or naming
    the first parameter whose snapshot is missing or has another shape."""
    if len(snapshots) < 2:
        raise TWASnapshotError(f"TWA needs at least 2 snapshots to span a subspace, got {len(snapshots)}; record "
                               "more (a smaller twa_snapshot_steps, an earlier twa_snapshot_start_step, or more "
                               "checkpoint-* folders) or train longer")
    params = dict(model.named_parameters())
    # a SnapshotStore records its shapes; only a plain list needs its first snapshot looked at
    shapes = getattr(snapshots, "shapes", None) or {k: tuple(v.shape) for k, v in snapshots[0].items()}
    for name in names:
        if name not in shapes:
            raise TWASnapshotError(f"the snapshots have no tensor for the model's parameter {name!r}; they were "
                                   "taken from another model; take them from this one")
        if tuple(shapes[name]) != tuple(params[name].shape):
            raise TWASnapshotError(f"snapshot tensor {name!r} has shape {tuple(shapes[name])} but the model's "
                                   f"parameter has shape {tuple(params[name].shape)}: the snapshots come from "
                                   "another model; take them from this one")


def twa_from_checkpoints(run_dir, model: nn.Module, args: SubspaceTrainingArguments, train_dataset,
                         eval_dataset=None, data_collator=None, compute_metrics=None, **trainer_kwargs):
    """Post-hoc TWA over the ``checkpoint-*`` folders an earlier Trainer run left in ``run_dir``.

    ``model`` is the architecture to load them into (e.g. the last checkpoint loaded with ``from_pretrained``).
    Returns ``(trainer, result)``; ``trainer.model`` holds the TWA weights, ready for ``save_model``.
    """
    from .twa import load_checkpoint_snapshots

    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    try:
        snapshots = load_checkpoint_snapshots(run_dir, names=names)
    except ValueError as e:  # no checkpoints, or another model's: one type for every snapshot problem
        raise TWASnapshotError(str(e)) from e
    plain_args = dataclasses.replace(args, twa=False, subspace_dim=None, **_subspace_defaults())
    trainer = SubspaceTrainer(model=model, args=plain_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=data_collator, compute_metrics=compute_metrics, **trainer_kwargs)
    trainer.args = args
    result = run_twa_phase(trainer, snapshots, names=names)
    return trainer, result
