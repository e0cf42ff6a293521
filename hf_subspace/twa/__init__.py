"""Trainable Weight Averaging (TWA, Li et al.): the TRL-style pair and its building blocks.

The pair: :class:`TWATrainingArguments` + :class:`TWATrainer` (one-run TWA: an ordinary run with snapshots, then
the coefficients of their subspace, resumable in either phase); :func:`twa_from_checkpoints` does the TWA phase
over an earlier run's ``checkpoint-*`` folders, :func:`run_twa_phase` over any snapshots.

The building blocks:

Record snapshots of θ during an ordinary run (:class:`SnapshotCallback`) or read them from Trainer checkpoints
(:func:`load_checkpoint_snapshots`); build the mean (SWA point) and an orthonormal basis of the trajectory
(:func:`build_trajectory_basis`, giving a :class:`~hf_subspace.projections.trajectory.TrajectoryProjection`);
train the coefficients; recalibrate BatchNorm statistics (:func:`recalibrate_batchnorm`).
"""
from ..projections.trajectory import TrajectoryProjection
from .adapter import save_twa_adapter
from .basis import TrajectoryBasisResult, build_trajectory_basis, effective_rank, flatten_snapshot, unflatten
from .batchnorm import recalibrate_batchnorm
from .snapshots import SnapshotCallback, SnapshotStore, load_checkpoint_snapshots, trainable_state
from .arguments import TWATrainingArguments
from .trainer import TWATrainer, run_twa_phase, twa_from_checkpoints

__all__ = [
    "SnapshotCallback",
    "SnapshotStore",
    "TrajectoryBasisResult",
    "TrajectoryProjection",
    "TWATrainer",
    "TWATrainingArguments",
    "build_trajectory_basis",
    "effective_rank",
    "flatten_snapshot",
    "load_checkpoint_snapshots",
    "recalibrate_batchnorm",
    "run_twa_phase",
    "save_twa_adapter",
    "trainable_state",
    "twa_from_checkpoints",
    "unflatten",
]
