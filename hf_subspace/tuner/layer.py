"""Where peft's tuners keep their layer class (``peft/tuners/<method>/layer.py``): :class:`SubspaceLayer` lives in
:mod:`hf_subspace.layer` (below the engine, which puts one on each tensor of θ) and is importable from here too."""
from ..layer import SubspaceLayer  # noqa: F401

__all__ = ["SubspaceLayer"]
