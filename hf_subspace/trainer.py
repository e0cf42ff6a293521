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

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .reparam import SubspaceEngine, find_engine, layout_from_names, validate_subspace_args
from .tuner.config import SubspaceConfig, is_subspace_model

logger = logging.getLogger(__name__)


@dataclass
class SubspaceTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the subspace and TWA settings (all prefixed ``subspace_`` / ``twa_``)."""

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

    def __post_init__(self):
        super().__post_init__()
        if self.subspace_dim is not None:
            validate_subspace_args(self.subspace_dim, self.subspace_projection, self.subspace_mode)
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
        if self.twa_optimizer not in TWA_OPTIMIZERS:
            raise ValueError(f"twa_optimizer must be one of {list(TWA_OPTIMIZERS)}, got {self.twa_optimizer!r}")


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
    if is_subspace_model(model) or args.subspace_dim is None:
        return model
    from peft import get_peft_model

    config = SubspaceConfig(
        dim=args.subspace_dim, projection=args.subspace_projection, mode=args.subspace_mode, seed=args.subspace_seed,
        projection_format=args.subspace_projection_format, target_modules=args.subspace_target_modules, modules_to_save=args.subspace_modules_to_save,
        task_type=_task_type(model),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
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


class _DistributedChecksCallback(TrainerCallback):
    """On several processes, when training starts (the model wrapped): refuse a sharded θ0, and compare every
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


class SubspaceTrainer(Trainer):
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
        self.snapshot_callback = None
        self.twa_result = None
        if args.twa:
            from .twa import SnapshotCallback

            self.snapshot_callback = SnapshotCallback(
                every_n_steps=args.twa_snapshot_steps, per_epoch=args.twa_snapshot_steps is None,
                storage=args.twa_snapshot_storage,
                directory=os.path.join(args.output_dir, "twa_snapshots") if args.twa_snapshot_storage == "disk"
                else None,
                dtype=getattr(torch, args.twa_snapshot_dtype), start_step=args.twa_snapshot_start_step,
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
        return [n for n in names if "subspace.coeffs" not in n and "subspace.scales" not in n]

    # -- model card -------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs):
        """After TWA, write our TWA card (library_name: transformers — the result is a merged model)."""
        if self.twa_result is None:
            return super().create_model_card(*args, **kwargs)
        from .hub import twa_card

        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(twa_card(self.model, self.twa_result, repo_id=self.args.hub_model_id,
                                 base_model=kwargs.get("finetuned_from")))

    # -- training ---------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.twa:
            self.twa_result = run_twa_phase(self, self.snapshot_callback.store)
        return output


def run_twa_phase(trainer: Trainer, snapshots, model: Optional[nn.Module] = None, names=None):
    """The TWA phase: basis from ``snapshots``, start at their mean, train the coefficients, merge.

    ``trainer`` supplies the data, collator, metrics and (``SubspaceTrainingArguments``) the TWA settings.
    The model ends as a plain model with θ = mean + Qᵀc written into its weights. Returns the
    :class:`~hf_subspace.twa.TrajectoryBasisResult` with ``coefficients`` and ``metrics`` added.
    """
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
        weight_decay=args.twa_weight_decay, output_dir=os.path.join(args.output_dir, "twa"),
        save_strategy="no", load_best_model_at_end=False, push_to_hub=False, warmup_steps=0,
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
                _DistributedChecksCallback)
    user_callbacks = [cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, internal)]
    inner = Trainer(
        model=model, args=twa_args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
        data_collator=trainer.data_collator, compute_metrics=trainer.compute_metrics,
        optimizers=(optimizer, scheduler), processing_class=trainer.processing_class, callbacks=user_callbacks,
    )
    train_out = inner.train()

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
    """Raise a ValueError naming the first parameter whose snapshot is missing or has another shape."""
    if len(snapshots) < 2:
        raise ValueError(f"TWA needs at least 2 snapshots to span a subspace, got {len(snapshots)}; record more "
                         "(twa_snapshot_steps) or train longer")
    params = dict(model.named_parameters())
    # a SnapshotStore records its shapes; only a plain list needs its first snapshot looked at
    shapes = getattr(snapshots, "shapes", None) or {k: tuple(v.shape) for k, v in snapshots[0].items()}
    for name in names:
        if name not in shapes:
            raise ValueError(f"the snapshots have no tensor for the model's parameter {name!r}; they were taken "
                             "from another model")
        if tuple(shapes[name]) != tuple(params[name].shape):
            raise ValueError(f"snapshot tensor {name!r} has shape {tuple(shapes[name])} but the model's "
                             f"parameter has shape {tuple(params[name].shape)}: the snapshots come from another model")


def twa_from_checkpoints(run_dir, model: nn.Module, args: SubspaceTrainingArguments, train_dataset,
                         eval_dataset=None, data_collator=None, compute_metrics=None, **trainer_kwargs):
    """Post-hoc TWA over the ``checkpoint-*`` folders an earlier Trainer run left in ``run_dir``.

    ``model`` is the architecture to load them into (e.g. the last checkpoint loaded with ``from_pretrained``).
    Returns ``(trainer, result)``; ``trainer.model`` holds the TWA weights, ready for ``save_model``.
    """
    from .twa import load_checkpoint_snapshots

    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    snapshots = load_checkpoint_snapshots(run_dir, names=names)
    plain_args = dataclasses.replace(args, twa=False, subspace_dim=None)
    trainer = SubspaceTrainer(model=model, args=plain_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=data_collator, compute_metrics=compute_metrics, **trainer_kwargs)
    trainer.args = args
    result = run_twa_phase(trainer, snapshots, names=names)
    return trainer, result
