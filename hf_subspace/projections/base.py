"""The one interface every subspace map implements.

A projection is a fixed linear map ``P: R^d -> R^D`` (``d`` = subspace dimension, ``D`` = number of
weights in θ). It is fully determined by ``(kind, D, d, seed)`` plus a few kind-specific options, so
every process regenerates the same ``P`` without storing or sending it.

Invariants shared by all kinds:

* ``matvec(c)``: ``c`` has shape ``(d,)``, float32 -> returns ``P c`` of shape ``(D,)``, float32.
* ``rmatvec(g)``: ``g`` has shape ``(D,)`` -> returns ``Pᵀ g`` of shape ``(d,)``, float32; the exact adjoint,
  so ``<P c, g> == <c, Pᵀ g>`` up to float rounding.
* columns have unit length over the whole of θ (``‖P e_i‖ ≈ 1``), not per tensor.
* device-independent: all random state is drawn from CPU generators (:func:`cpu_generator`; CPU random streams
  are the same on every machine) and only then moved to ``device``, so a ``P`` built on a GPU is the ``P``
  rebuilt on a CPU from the same ``(kind, D, d, seed)``.
* the meta device (a model built under ``init_empty_weights``) holds no data, so a projection asked for it
  is built, and kept, on the CPU instead (its state is regenerable and small); it follows the model to a
  real device once the model is materialized.
"""
from __future__ import annotations

import torch


class Projection:
    """Base class: subclasses set ``kind`` and implement ``_matvec`` / ``_rmatvec``."""

    kind: str = "base"

    def __init__(self, D: int, d: int, seed: int = 0, device: torch.device | str | None = None):
        if not isinstance(D, int) or isinstance(D, bool) or D <= 0:
            raise ValueError(f"number of weights D must be a positive integer, got {D!r}")
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise ValueError(f"subspace dimension d must be a positive integer, got {d!r}")
        if d > D:
            raise ValueError(
                f"subspace dimension d={d} is larger than the number of weights D={D}; "
                "a random subspace must be smaller than the space it lives in"
            )
        self.D = D
        self.d = d
        self.seed = int(seed)
        self.device = _storage_device(device)

    # -- public API -------------------------------------------------------------------------------
    def matvec(self, c: torch.Tensor) -> torch.Tensor:
        """``P c``: ``(d,)`` -> ``(D,)`` float32 on ``self.device``."""
        if c.shape != (self.d,):
            raise ValueError(f"{self.kind} projection expects a vector of shape ({self.d},), got {tuple(c.shape)}")
        with torch.autocast(self.device.type, enabled=False):  # the projection arithmetic stays float32
            return self._matvec(c.detach().to(self.device, torch.float32))

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """``Pᵀ g``: ``(D,)`` -> ``(d,)`` float32 on ``self.device``."""
        if g.shape != (self.D,):
            raise ValueError(f"{self.kind} projection expects a vector of shape ({self.D},), got {tuple(g.shape)}")
        with torch.autocast(self.device.type, enabled=False):
            return self._rmatvec(g.detach().to(self.device, torch.float32))

    #: True when :meth:`matvec_rows` / :meth:`rmatvec_rows` are as cheap as their share of the full products;
    #: the engine then computes each tensor's delta on the fly instead of caching the whole ``P c``.
    supports_row_slices: bool = False

    def matvec_rows(self, c: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``P c``: ``(d,)`` -> ``(stop - start,)``."""
        return self.matvec(c)[start:stop]

    def rmatvec_rows(self, g: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``P[start:stop]ᵀ g``: ``(stop - start,)`` -> ``(d,)``."""
        full = torch.zeros(self.D, device=self.device, dtype=torch.float32)
        full[start:stop] = g
        return self.rmatvec(full)

    def matvec_at(self, c: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Entries ``positions`` (int64, any shape) of ``P c``: the rows of an embedding a batch reads."""
        return self.matvec(c)[positions]

    def rmatvec_at(self, g: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``P[positions]ᵀ g`` for ``g`` shaped like ``positions`` (positions distinct): ``-> (d,)``."""
        full = torch.zeros(self.D, device=self.device, dtype=torch.float32)
        full[positions.reshape(-1)] = g.reshape(-1).to(full.device, torch.float32)
        return self.rmatvec(full)

    def to(self, device: torch.device | str) -> "Projection":
        """Move the projection's (regenerable) state to ``device``; returns ``self``.

        Moving to the meta device keeps the state where it is (meta tensors hold no data, and nothing could
        bring it back): a meta model's projection stays usable and follows the model to its real device later.
        """
        device = torch.device(device)
        if device.type == "meta":
            return self
        if device != self.device:
            self.device = device
            self._move(device)
        return self


    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The generated random state, for users who want bit-exact portability (``save_projection=True``)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the generated state with saved tensors (inverse of :meth:`state_tensors`)."""
        for name, value in tensors.items():
            current = getattr(self, name)
            if current.shape != value.shape:
                raise ValueError(
                    f"saved projection tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
                )
            setattr(self, name, value.to(current.device, current.dtype))

    def dense_matrix(self) -> torch.Tensor:
        """Materialize ``P`` as a ``(D, d)`` matrix. Only for tests and small sizes."""
        if self.D * self.d > 50_000_000:
            raise ValueError(f"refusing to materialize a {self.D}x{self.d} projection")
        eye = torch.eye(self.d, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.d)], dim=1)

    # -- for subclasses ---------------------------------------------------------------------------
    def _matvec(self, c: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatvec(self, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _move(self, device: torch.device) -> None:
        for name, value in self.state_tensors().items():
            setattr(self, name, value.to(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(D={self.D}, d={self.d}, seed={self.seed}, device={self.device})"


def _storage_device(device: torch.device | str | None) -> torch.device:
    """Where a projection asked for ``device`` keeps its state: ``device`` itself, or the CPU for ``None`` and meta."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "meta" else device


def cpu_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one named random stream of one seed (CPU streams are the same on every machine)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(stream) * 7_919 + 12_345) % (2**63 - 1))
    return g
