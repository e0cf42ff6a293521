"""Trainable Weight Averaging (TWA, Li et al.) building blocks.

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

__all__ = [
    "SnapshotCallback",
    "SnapshotStore",
    "TrajectoryBasisResult",
    "TrajectoryProjection",
    "build_trajectory_basis",
    "effective_rank",
    "flatten_snapshot",
    "load_checkpoint_snapshots",
    "recalibrate_batchnorm",
    "save_twa_adapter",
    "trainable_state",
    "unflatten",
]
