"""``TWATrainer``: Trainable Weight Averaging through the ``transformers.Trainer``, the trainer half of the
TRL-style pair :class:`~hf_subspace.TWATrainingArguments` + :class:`~hf_subspace.TWATrainer`.

It owns the one-run TWA: the ordinary phase (the Trainer's own run, taking snapshots), then :func:`run_twa_phase`
(the trajectory basis, the move to the snapshots' mean (SWA), BatchNorm recalibration, the k coefficients trained
with SGD and a step-decayed large learning rate, the merge and a second recalibration), and resuming in either phase
(the ordinary one with the snapshots its checkpoint lists, the TWA one from ``<output_dir>/twa/checkpoint-*``).
:func:`twa_from_checkpoints` runs the TWA phase over the ``checkpoint-*`` folders of an earlier run.

Imports: :mod:`hf_subspace.checkpoints`, :mod:`hf_subspace.nonfinite`, the engine and the rest of
:mod:`hf_subspace.twa`; never :mod:`hf_subspace.trainer` (which delegates its deprecated ``twa=True`` here).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from typing import Optional

import torch
from torch import nn
from transformers import Trainer

from ..checkpoints import TWA_PHASE_MARK_FILE, _read_json, last_complete_checkpoint
from ..errors import SubspaceConfigError, TWASnapshotError
from ..nonfinite import NonFiniteMixin
from ..reparam import SubspaceEngine, layout_from_names
from ..tuner.config import is_subspace_model
from .arguments import TWATrainingArguments, as_twa_arguments

logger = logging.getLogger(__name__)

TWA_SNAPSHOT_DIR = "twa_snapshots"
TWA_MANIFEST_FILE = "twa_snapshots.json"
TWA_PHASE_FILE = "phase.json"
TWA_COEFFICIENTS_FILE = "twa_coefficients.safetensors"


class TWATrainer(NonFiniteMixin, Trainer):
    """A ``transformers.Trainer`` that runs one-run TWA: ``train()`` trains the plain ``model`` ordinarily while
    taking snapshots (``args.twa_snapshot_*``), then trains the coefficients of the subspace they span and leaves
    ``trainer.model`` a plain model with the TWA weights (``trainer.twa_result``: the basis, the coefficients and
    the TWA phase's metrics). Everything else is the Trainer you know (evaluation, callbacks, logging, checkpoints,
    resuming with ``resume_from_checkpoint=True`` in either phase).
    """

    _reads_twa_arguments = True  # TWATrainingArguments accept this trainer

    def __init__(self, model=None, args: TWATrainingArguments = None, *targs, **kwargs):
        if args is None:
            raise ValueError("TWATrainer needs TWATrainingArguments(output_dir=...)")
        if not isinstance(args, TWATrainingArguments):
            raise ValueError(f"args must be TWATrainingArguments, got {type(args).__name__}")
        if model is not None and is_subspace_model(model):
            raise SubspaceConfigError("TWATrainer trains the ordinary model and then its trajectory's subspace; pass "
                                      "the plain model, not one already wrapped as a random subspace")
        super().__init__(model, args, *targs, **kwargs)
        from ..distributed import refuse_sharded_training
        from .snapshots import SnapshotCallback

        refuse_sharded_training(self.model, self.accelerator, what="TWA")
        if args.skip_nonfinite_steps:
            self.install_nonfinite_guard(args.max_consecutive_nonfinite_steps)
        self.twa_result = None
        # its store is made when training starts (train()): a fresh one, or the one a resumed checkpoint lists
        self.snapshot_callback = SnapshotCallback(
            every_n_steps=args.twa_snapshot_steps, per_epoch=args.twa_snapshot_steps is None,
            dtype=getattr(torch, args.twa_snapshot_dtype), start_step=args.twa_snapshot_start_step,
            min_snapshots=2,
        )
        self.add_callback(self.snapshot_callback)

    def subspace_info(self) -> dict:
        """Empty: the ordinary phase trains every weight and TWA leaves a plain, merged model (its k and D are in
        ``twa_result``)."""
        return {}

    # -- model card -------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs):
        """After TWA, write our TWA card (library_name: transformers — the result is a merged model)."""
        if self.twa_result is None:
            return super().create_model_card(*args, **kwargs)
        from ..atomic import atomic_write
        from ..hub import twa_card

        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with atomic_write(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(twa_card(self.model, self.twa_result, repo_id=self.args.hub_model_id,
                                 base_model=kwargs.get("finetuned_from")))

    # -- training ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The ordinary phase (``Trainer.train``), then the TWA phase; returns the ordinary phase's ``TrainOutput``.

        ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint (one a kill in the middle of its
        save left without ``trainer_state.json`` is passed over) and resumes in either phase: in the ordinary one
        with the snapshots taken before the checkpoint (listed in its ``twa_snapshots.json``), in the TWA one from
        ``<output_dir>/twa/checkpoint-*`` (the basis is rebuilt from the same snapshots).
        """
        from transformers.trainer_utils import TrainOutput

        from .snapshots import SnapshotStore

        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
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
        from .snapshots import SnapshotStore

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
        """A checkpoint of the ordinary phase also lists the snapshots taken so far (memory ones are written to
        ``<output_dir>/twa_snapshots`` first), before the Trainer writes ``trainer_state.json`` last."""
        if self.args.should_save and self.snapshot_callback.store is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from ..atomic import write_json

            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_json(os.path.join(folder, TWA_MANIFEST_FILE), self._snapshot_manifest(), indent=1)
        return super()._save_checkpoint(model, trial)

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

        from ..atomic import write_json

        phase = {"id": uuid.uuid4().hex, "ordinary": {"global_step": output.global_step,
                                                      "training_loss": output.training_loss,
                                                      "metrics": dict(output.metrics)}}
        if self.args.should_save:
            phase["snapshots"] = self._snapshot_manifest()
            os.makedirs(os.path.join(self.args.output_dir, "twa"), exist_ok=True)
            write_json(os.path.join(self.args.output_dir, "twa", TWA_PHASE_FILE), phase, indent=1)
        return phase


def run_twa_phase(trainer: Trainer, snapshots, model: Optional[nn.Module] = None, names=None,
                  resume_from_checkpoint: Optional[str] = None, phase_id: Optional[str] = None):
    """The TWA phase: basis from ``snapshots``, start at their mean, train the coefficients, merge.

    ``trainer`` supplies the data, collator, metrics and (its ``args``, :class:`TWATrainingArguments` or any
    arguments holding the ``twa_*`` settings) the TWA settings. The model ends as a plain model with
    θ = mean + Qᵀc written into its weights. Returns the :class:`~hf_subspace.twa.TrajectoryBasisResult` with
    ``coefficients`` and ``metrics`` added.

    With ``save_strategy`` set, the phase saves checkpoints (c, optimizer, schedule, RNG) in
    ``<output_dir>/twa/checkpoint-*``, marked with ``phase_id``; ``resume_from_checkpoint`` continues from one.
    The phase starts from ``set_seed(args.seed)``, so a resumed run recalibrates and trains as an uninterrupted one.
    """
    from transformers import set_seed
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    from .basis import build_trajectory_basis
    from .batchnorm import recalibrate_batchnorm

    args = as_twa_arguments(trainer.args)
    model = model if model is not None else trainer.model
    if names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    _check_snapshots_fit(model, snapshots, names)
    sharded = args.world_size > 1 and args.twa_shard_basis
    if sharded:  # no rank holds the whole k x D basis while it is built and trained (hf_subspace.twa.sharded)
        from .sharded import build_sharded_trajectory_basis

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
        from ..distributed import average_batchnorm_statistics

        average_batchnorm_statistics(model)

    engine = SubspaceEngine()
    layout = layout_from_names(model, result.names)
    engine.add_adapter(model, "twa", layout, result.k, result.projection)
    model.requires_grad_(False)
    model.add_module("subspace", engine)
    engine.coeffs["twa"].requires_grad_(True)
    if args.world_size > 1:  # the ranks' snapshots, hence their bases, must agree (they do under DDP)
        from ..distributed import check_projections_match

        check_projections_match(model)

    twa_args = dataclasses.replace(
        args, num_train_epochs=args.twa_epochs, max_steps=-1, learning_rate=args.twa_learning_rate,
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
    # the user's callbacks follow into the phase; the Trainer's and the library's own (marked) stay behind
    internal = (DefaultFlowCallback, PrinterCallback, ProgressCallback)
    user_callbacks = [cb for cb in trainer.callback_handler.callbacks
                      if not isinstance(cb, internal) and not getattr(cb, "hf_subspace_internal", False)]
    inner = _TWAPhaseTrainer(
        engine.coeffs["twa"], phase_id, model=model, args=twa_args, train_dataset=trainer.train_dataset,
        eval_dataset=trainer.eval_dataset, data_collator=trainer.data_collator,
        compute_metrics=trainer.compute_metrics, optimizers=(optimizer, scheduler),
        processing_class=trainer.processing_class, callbacks=user_callbacks,
    )
    if args.skip_nonfinite_steps:
        inner.install_nonfinite_guard(args.max_consecutive_nonfinite_steps)
    train_out = inner.train(resume_from_checkpoint=resume_from_checkpoint)

    result.coefficients = engine.coeffs["twa"].detach().cpu().clone()
    engine.merge(["twa"])
    if sharded:  # after training, rank 0 gets the whole basis (for save_twa_adapter there); the others keep shards
        from ..projections import TrajectoryProjection

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
        from ..distributed import average_batchnorm_statistics

        average_batchnorm_statistics(model)
    result.metrics = dict(train_out.metrics)
    trainer.model = model
    if trainer.eval_dataset is not None:
        result.metrics.update(trainer.evaluate(metric_key_prefix="twa_eval"))
    return result


class _TWAPhaseTrainer(NonFiniteMixin, Trainer):
    """The TWA phase's Trainer: its checkpoints hold the k coefficients (not the model), marked with the phase."""

    _reads_twa_arguments = True  # given TWATrainingArguments for their Trainer settings; the phase is this trainer

    def __init__(self, coefficients: torch.Tensor, phase_id: Optional[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coefficients = coefficients
        self.phase_id = phase_id

    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:
            return
        from ..atomic import save_safetensors, write_json

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


def _twa_optimizer(params, args) -> torch.optim.Optimizer:
    """The TWA phase's optimizer over the coefficients (weight decay pulls c toward 0, i.e. θ toward the mean)."""
    if args.twa_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.twa_learning_rate, weight_decay=args.twa_weight_decay)
    return torch.optim.SGD(params, lr=args.twa_learning_rate, momentum=args.twa_momentum,
                           weight_decay=args.twa_weight_decay)


def _twa_scheduler(optimizer, args, total: int):
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


def twa_from_checkpoints(run_dir, model: nn.Module, args: TWATrainingArguments, train_dataset,
                         eval_dataset=None, data_collator=None, compute_metrics=None, **trainer_kwargs):
    """Post-hoc TWA over the ``checkpoint-*`` folders an earlier Trainer run left in ``run_dir``.

    ``model`` is the architecture to load them into (e.g. the last checkpoint loaded with ``from_pretrained``);
    ``args`` are :class:`TWATrainingArguments` (the deprecated ``SubspaceTrainingArguments`` still work until 0.4,
    with a ``FutureWarning``). Returns ``(trainer, result)``; ``trainer.model`` holds the TWA weights, ready for
    ``save_model``, and ``trainer.twa_result`` is ``result``.
    """
    from .snapshots import load_checkpoint_snapshots

    if not isinstance(args, TWATrainingArguments):
        warnings.warn(f"twa_from_checkpoints with {type(args).__name__} is deprecated and will stop working in "
                      "hf_subspace 0.4: pass hf_subspace.TWATrainingArguments (the same twa_* settings)",
                      FutureWarning, stacklevel=2)
        args = as_twa_arguments(args)
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    try:
        snapshots = load_checkpoint_snapshots(run_dir, names=names)
    except ValueError as e:  # no checkpoints, or another model's: one type for every snapshot problem
        raise TWASnapshotError(str(e)) from e
    trainer = TWATrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, compute_metrics=compute_metrics, **trainer_kwargs)
    trainer.twa_result = run_twa_phase(trainer, snapshots, names=names)
    return trainer, trainer.twa_result


__all__ = ["TWATrainer", "run_twa_phase", "twa_from_checkpoints"]
