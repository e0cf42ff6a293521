"""What makes a subspace request valid — ``dim`` (d), the projection kind, the mode — and whether d fits θ.

The one home of these checks: :class:`~hf_subspace.SubspaceConfig`, :func:`~hf_subspace.reparameterize`,
:class:`~hf_subspace.SubspaceTrainingArguments` and the engine's ``add_adapter`` call them. Each raises a
:class:`~hf_subspace.errors.SubspaceConfigError` (a ValueError) that names the problem and the fix.
"""
from __future__ import annotations

from .errors import SubspaceConfigError
from .projections import PROJECTION_KINDS, STORED_KINDS

MODES = ("global", "said")


def validate_subspace_args(dim, projection, mode) -> None:
    """Raise a :class:`~hf_subspace.errors.SubspaceConfigError` (a ValueError) naming the problem for a bad
    ``dim``, ``projection`` or ``mode``.

    ``projection=None`` skips the kind check (a prebuilt :class:`Projection`, e.g. a trajectory basis).
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise SubspaceConfigError(f"dim must be a positive integer (d, the number of trainable coefficients, e.g. "
                                  f"dim=1000), got {dim!r} ({type(dim).__name__})")
    if dim <= 0:
        raise SubspaceConfigError(f"dim must be a positive integer (d, the number of trainable coefficients, e.g. "
                                  f"dim=1000), got {dim}")
    if projection is not None and projection not in PROJECTION_KINDS and projection not in STORED_KINDS:
        raise SubspaceConfigError(f"unknown projection kind {projection!r}; choose one of "
                                  f"{sorted(PROJECTION_KINDS)} (or {sorted(STORED_KINDS)} for an adapter saved with "
                                  "its basis)")
    if mode not in MODES:
        raise SubspaceConfigError(f"unknown mode {mode!r}; choose one of {list(MODES)}")


def validate_dim_fits(dim: int, mode: str, layout, target_modules=None, *, what: str | None = None) -> None:
    """Raise a :class:`~hf_subspace.errors.SubspaceConfigError` if ``dim`` does not fit θ (``layout``): more than
    its D weights, or (SAID) no more than its number of tensors. ``what`` says what θ is in the message (by default
    from ``target_modules``: the tensors of the matching modules, or all trainable tensors of the model)."""
    if what is None:
        what = (f"the {len(layout.slots)} tensors of the modules matching target_modules={target_modules!r}"
                if target_modules is not None else f"all {len(layout.slots)} trainable tensors of the model")
    if dim > layout.D:
        raise SubspaceConfigError(
            f"dim={dim} is larger than the number of weights in θ, D={layout.D} ({what}): a subspace cannot have "
            f"more dimensions than the space it lies in; use dim ≤ {layout.D}"
            + (" or target more modules" if target_modules is not None else ""))
    if mode == "said" and dim <= len(layout.slots):
        raise SubspaceConfigError(
            f"SAID mode spends one of the dim={dim} trainable numbers on each of the {len(layout.slots)} tensors "
            f"of θ ({what}), leaving none for c; use dim > {len(layout.slots)} or mode='global'")
