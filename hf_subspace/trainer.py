"""``SubspaceTrainingArguments`` + ``SubspaceTrainer``: a ``transformers.Trainer`` that trains a random subspace.

The random-subspace pair (the way TRL pairs a config with a trainer): ``subspace_dim=d`` and a plain model is
wrapped as a PEFT subspace adapter (or pass one already wrapped); everything else is the Trainer you know
(evaluation, callbacks, logging, gradient accumulation, bf16/fp16, activation checkpointing, checkpoints holding
the adapter, resuming — with a check that the checkpoint's adapter matches the subspace settings —, pushing).

This module owns that path only. Trainable Weight Averaging is the pair :class:`~hf_subspace.TWATrainingArguments`
+ :class:`~hf_subspace.TWATrainer` in :mod:`hf_subspace.twa`. Until hf_subspace 0.4, ``SubspaceTrainingArguments``
still carries the ``twa=True`` / ``twa_*`` settings and ``SubspaceTrainer`` given ``twa=True`` hands the run to
``TWATrainer`` with a ``FutureWarning`` (the one place this module imports :mod:`hf_subspace.twa`; ``twa`` never
imports this module). ``twa_from_checkpoints``, ``run_twa_phase`` and ``last_complete_checkpoint`` stay importable
from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from transformers import Trainer, TrainerCallback

from .arguments import SharedTrainingArguments
from .checkpoints import _read_json, last_complete_checkpoint  # noqa: F401  (importable from here as before)
from .errors import SubspaceConfigError
from .nonfinite import NonFiniteMixin
from .projections import PROJECTION_KINDS
from .reparam import find_engine, validate_subspace_args
from .tuner.config import PEFT_TYPE, SubspaceConfig, is_subspace_model
# TWA lives in hf_subspace.twa; these names stay importable from here for the deprecated path (until 0.4)
from .twa.arguments import TWA_LR_SCHEDULES, TWA_OPTIMIZERS, TWAArguments, as_twa_arguments  # noqa: F401
from .twa.trainer import TWATrainer, run_twa_phase, twa_from_checkpoints  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class SubspaceTrainingArguments(TWAArguments, SharedTrainingArguments):
    """``TrainingArguments`` plus the random-subspace settings (prefixed ``subspace_``), for :class:`SubspaceTrainer`.

    Learning rate: with a random subspace use ``learning_rate`` 1e-3 to 1e-1 with Adam(W) (the examples use 2e-2
    to 1e-1), not full fine-tuning's 1e-5 to 5e-5. P has unit-length columns, so ‖θ - θ0‖ ≈ ‖c‖: the d numbers of
    c carry the whole change of the model's weights, while Adam moves each of them by about ``learning_rate`` per
    step. At 2e-5, c (and so θ) moves ~1,000x less than at 2e-2 and training seems to do nothing; the trainer
    warns when that happens (``subspace_lr_check_steps``).

    Deprecated until hf_subspace 0.4: ``twa=True`` and the ``twa_*`` settings (inherited from
    :class:`~hf_subspace.twa.arguments.TWAArguments`); use :class:`~hf_subspace.TWATrainingArguments` instead.
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
    subspace_lr_check_steps: int = field(default=20, metadata={
        "help": "after this many optimizer steps, warn if θ has barely moved (‖θ-θ0‖ < 1e-4 ‖θ0‖): the learning "
                "rate is then far too small for c (0: no check)"})
    twa: bool = field(default=False, metadata={"help": "deprecated (removed in 0.4): use TWATrainingArguments + "
                                                       "TWATrainer for one-run TWA"})

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
        if (isinstance(self.subspace_lr_check_steps, bool) or not isinstance(self.subspace_lr_check_steps, int)
                or self.subspace_lr_check_steps < 0):
            raise SubspaceConfigError("subspace_lr_check_steps must be a non-negative integer (0: no check), got "
                                      f"{self.subspace_lr_check_steps!r}")
        self._check_twa_arguments()  # deprecated twa_* settings: checked as before while they exist

    def _check_trainer(self, trainer) -> None:
        """A plain ``Trainer`` given these arguments and an unwrapped model is refused (it would silently fine-tune
        every weight at the subspace's learning rate), and so is one given ``twa=True`` (it runs no TWA)."""
        if getattr(trainer, "_reads_subspace_arguments", False) or getattr(trainer, "_reads_twa_arguments", False):
            return
        if self.twa:
            raise SubspaceConfigError(f"{type(trainer).__name__} does not run TWA (twa=True): use "
                                      "hf_subspace.TWATrainer with hf_subspace.TWATrainingArguments")
        if self.subspace_dim is None:
            return
        model = getattr(trainer, "model", None)
        if model is not None and find_engine(model) is None:
            raise SubspaceConfigError(
                f"{type(trainer).__name__} was given SubspaceTrainingArguments(subspace_dim={self.subspace_dim}) and a plain "
                f"{type(model).__name__}: it does not read the subspace settings, so it would fine-tune all "
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} weights. Use "
                "hf_subspace.SubspaceTrainer (it wraps the model), or wrap the model first with "
                "peft.get_peft_model(model, hf_subspace.SubspaceConfig(dim=...))")

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

    hf_subspace_internal = True  # the trainer's own: not carried into another trainer

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

    hf_subspace_internal = True  # the trainer's own: not carried into another trainer

    def __init__(self, trainer: "SubspaceTrainer"):
        self.trainer = trainer
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = find_engine(self.trainer.model)
        self.start = None
        if engine is None or args.subspace_lr_check_steps <= 0:
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

    hf_subspace_internal = True  # the trainer's own: not carried into another trainer

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
    """A ``transformers.Trainer`` for random-subspace training. See the module docstring.

    ``model`` is a plain model (wrapped from ``args.subspace_*``) or an already-wrapped subspace model.
    ``args.twa=True`` (deprecated) returns a :class:`~hf_subspace.TWATrainer` instead, with a ``FutureWarning``.
    """

    _reads_subspace_arguments = True  # SubspaceTrainingArguments accept this trainer

    def __new__(cls, model=None, args: SubspaceTrainingArguments = None, *targs, **kwargs):
        if not (isinstance(args, SubspaceTrainingArguments) and args.twa):
            return super().__new__(cls)
        if cls is not SubspaceTrainer:
            raise SubspaceConfigError(
                f"{cls.__name__} (a SubspaceTrainer subclass) was given twa=True; SubspaceTrainer now trains random "
                f"subspaces only and TWA is hf_subspace.TWATrainer: derive {cls.__name__} from TWATrainer and give it "
                "hf_subspace.TWATrainingArguments (the same twa_* settings, without twa=True)")
        warnings.warn("SubspaceTrainer with SubspaceTrainingArguments(twa=True) is deprecated and will stop working in "
                      "hf_subspace 0.4: use hf_subspace.TWATrainer with hf_subspace.TWATrainingArguments (the same "
                      "twa_* settings, without twa=True); this run is handed to TWATrainer", FutureWarning,
                      stacklevel=2)
        return TWATrainer(model, as_twa_arguments(args), *targs, **kwargs)  # not a SubspaceTrainer: no __init__

    def __init__(self, model=None, args: SubspaceTrainingArguments = None, *targs, **kwargs):
        if args is None:
            raise ValueError("SubspaceTrainer needs SubspaceTrainingArguments(output_dir=...)")
        if not isinstance(args, SubspaceTrainingArguments):
            raise ValueError(f"args must be SubspaceTrainingArguments, got {type(args).__name__}")
        if model is not None:
            model = wrap_model(model, args)
        super().__init__(model, args, *targs, **kwargs)
        if args.subspace_dim is not None or (model is not None and is_subspace_model(model)):
            from .distributed import refuse_sharded_training

            refuse_sharded_training(self.model, self.accelerator, what="subspace training")
        self.add_callback(_SubspaceInfoCallback(self))
        self.add_callback(_DistributedChecksCallback(self))
        self.add_callback(_LearningRateCheckCallback(self))
        if args.skip_nonfinite_steps:
            self.install_nonfinite_guard(args.max_consecutive_nonfinite_steps)

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

    # -- model card -------------------------------------------------------------------------------------------    # -- training ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``. ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint (one a kill in
        the middle of its save left without ``trainer_state.json`` is passed over), and a checkpoint whose adapter
        was trained with other subspace settings is refused."""
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            _check_resumed_adapter(self.model, str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

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


__all__ = ["SubspaceTrainer", "SubspaceTrainingArguments", "wrap_model",
           # importable from here as before (TWA lives in hf_subspace.twa; checkpoints in hf_subspace.checkpoints)
           "TWA_LR_SCHEDULES", "TWA_OPTIMIZERS", "last_complete_checkpoint", "run_twa_phase", "twa_from_checkpoints"]
