"""Reparameterize any ``torch.nn.Module`` as θ = θ0 + P c.

How it works, and why this way:

* The weights that form θ are chosen by :func:`select_parameters` and laid end to end in a
  :class:`ThetaLayout` (a parameter shared by several modules — tied embeddings — is counted once).
* Each chosen tensor gets a ``torch.nn.utils.parametrize`` parametrization (:class:`SubspaceDelta`), so every
  read of ``module.weight`` *inside the module's forward* returns ``θ0 + δ``. Because the sum is computed where
  the weight is read, non-reentrant activation checkpointing recomputes it correctly, and code that reads a
  weight directly (tied heads, ``cls_token`` parameters) sees the adapted value too.
* ``δ = P c`` for the whole of θ is computed once and cached until ``c`` changes (an optimizer step): all
  layers of all micro-batches of one step slice the same flat vector, so the projection runs once per step
  forward. Its backward (``Pᵀ g``) runs once per ``backward()``. ``c`` gets its gradient through autograd, so
  gradient clipping, gradient accumulation and DDP's all-reduce (of just ``d`` numbers) work unchanged.
* SAID mode (Aghajanyan et al. 2020): one learned scale per tensor, ``θ_i = θ0_i + λ_i P_i c``; the ``m``
  scales are paid from the same budget, so ``c`` has ``dim - m`` entries.
* ``c``, ``λ`` and the projection arithmetic are float32; the delta is cast to each weight's dtype.
"""
from __future__ import annotations

import hashlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .projections import PROJECTION_KINDS, STORED_KINDS, Projection, make_projection

MODES = ("global", "said")


# ----------------------------------------------------------------------------------------------------------------
# choosing θ
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ParamSlot:
    """One tensor of θ: where it lives in the model and where it lives in the flat vector."""

    name: str  # canonical name (first module path + attribute)
    holders: list[tuple[str, str]]  # every (module path, attribute) that holds this tensor (tied weights)
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ThetaLayout:
    """The tensors that form θ, in order, and their offsets in the flat vector of length ``D``."""

    slots: list[ParamSlot] = field(default_factory=list)

    def __post_init__(self):
        offset = 0
        for slot in self.slots:
            slot.offset = offset
            offset += slot.numel
        self.D = offset
        self.index = {slot.name: i for i, slot in enumerate(self.slots)}

    def layout_hash(self) -> str:
        """A short hash of the parameter names and shapes (what a loaded adapter must match)."""
        h = hashlib.sha256()
        for slot in self.slots:
            h.update(f"{slot.name}:{slot.shape};".encode())
        return h.hexdigest()[:16]

    def describe(self) -> list[list]:
        return [[slot.name, list(slot.shape)] for slot in self.slots]


def _strip_parametrization(name: str) -> str:
    """``encoder.dense.parametrizations.weight.original`` -> ``encoder.dense.weight``."""
    return re.sub(r"\.?parametrizations\.([^.]+)\.original\d*$", r".\1", name).lstrip(".")


def _module_matches(module_name: str, patterns) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches exact names or suffixes."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _under_suffix(name: str, keys: Sequence[str]) -> bool:
    """True if ``name`` or one of its ancestors ends with one of ``keys`` (PEFT's modules_to_save rule)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        ancestor = ".".join(parts[:i])
        if any(ancestor == k or ancestor.endswith("." + k) for k in keys):
            return True
    return False


def select_parameters(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    skip_module_prefixes: Iterable[str] = (),
) -> ThetaLayout:
    """Choose the tensors that form θ.

    By default every trainable floating-point parameter (tensors already reparameterized by this library count
    as trainable). ``target_modules`` restricts θ to the parameters owned directly by matching modules (PEFT's
    matching rules: a regex string, or a list of names/suffixes). Modules under ``skip_module_prefixes``
    (``modules_to_save``) are trained in full and left out of θ.
    """
    skip_module_prefixes = tuple(skip_module_prefixes)
    if isinstance(target_modules, (list, tuple, set)) and len(target_modules) == 0:
        raise ValueError("target_modules is an empty list; pass None to reparameterize every trainable parameter")
    slots: dict[int, ParamSlot] = {}
    order: list[int] = []
    matched_any_module = False
    for module_name, module in model.named_modules():
        if _is_under(module_name, skip_module_prefixes) or _under_suffix(module_name, skip_module_prefixes):
            continue
        if ".modules_to_save." in f".{module_name}." or ".original_module." in f".{module_name}.":
            continue
        if not _module_matches(module_name, target_modules):
            continue
        if exclude_modules is not None and _module_matches(module_name, exclude_modules):
            continue
        own: list[tuple[str, torch.Tensor, bool]] = []
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if any(isinstance(p, SubspaceDelta) for p in plist):
                    own.append((attr, plist.original, True))
        parametrized_attrs = {a for a, _, _ in own}
        for attr, p in module.named_parameters(recurse=False):
            if attr not in parametrized_attrs:
                own.append((attr, p, False))
        for attr, p, ours in own:
            if not p.is_floating_point():
                continue
            if not (p.requires_grad or ours):
                continue
            matched_any_module = True
            key = id(p)
            if key not in slots:
                name = f"{module_name}.{attr}" if module_name else attr
                slots[key] = ParamSlot(name=name, holders=[], shape=tuple(p.shape))
                order.append(key)
            slots[key].holders.append((module_name, attr))
    if not order:
        if target_modules is not None and not matched_any_module:
            raise ValueError(
                f"target_modules={target_modules!r} matched no module with trainable floating-point parameters; "
                "module names look like: " + ", ".join(n for n, _ in list(model.named_modules())[1:6])
            )
        raise ValueError(
            "the model has no trainable floating-point parameters to reparameterize "
            "(all are frozen, integer, or under modules_to_save)"
        )
    return ThetaLayout([slots[k] for k in order])


def fingerprint_parameters(model: nn.Module, layout: ThetaLayout) -> str:
    """A fingerprint of the base weights θ0: a hash of a fixed strided sample of every tensor.

    Two checkpoints of one architecture give different fingerprints; the same checkpoint on another device or
    after a dtype round trip of the sample does not change it (values are rounded to 4 significant digits).
    """
    h = hashlib.sha256()
    for slot in layout.slots:
        t = _get_original(model, slot).detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].double().cpu()
        stats = torch.stack([sample.sum(), sample.abs().sum(), flat.double().abs().sum().cpu() / flat.numel()])
        h.update(("|".join(f"{v:.4g}" for v in sample.tolist() + stats.tolist())).encode())
    return h.hexdigest()[:16]


def _get_original(model: nn.Module, slot: ParamSlot) -> torch.Tensor:
    module_name, attr = slot.holders[0]
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


# ----------------------------------------------------------------------------------------------------------------
# the projected delta
# ----------------------------------------------------------------------------------------------------------------
class _Project(torch.autograd.Function):
    """``c -> P c`` with backward ``g -> Pᵀ g``. Saves no tensors, so one cached output can serve several
    backward passes (gradient accumulation, activation checkpointing)."""

    @staticmethod
    def forward(ctx, c, projection):
        ctx.projection = projection
        return projection.matvec(c)

    @staticmethod
    def backward(ctx, grad):
        return ctx.projection.rmatvec(grad.contiguous()), None


class _ProjectRows(torch.autograd.Function):
    """``c -> (P c)[start:stop]`` with backward ``g -> P[start:stop]ᵀ g``, for projections with cheap row slices."""

    @staticmethod
    def forward(ctx, c, projection, start, stop):
        ctx.projection, ctx.start, ctx.stop = projection, start, stop
        return projection.matvec_rows(c, start, stop)

    @staticmethod
    def backward(ctx, grad):
        return ctx.projection.rmatvec_rows(grad, ctx.start, ctx.stop), None, None, None


class _ProjectAt(torch.autograd.Function):
    """``c -> (P c)[positions]`` with backward ``g -> P[positions]ᵀ g`` (positions distinct)."""

    @staticmethod
    def forward(ctx, c, projection, positions):
        ctx.projection = projection
        ctx.save_for_backward(positions)
        return projection.matvec_at(c, positions)

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return ctx.projection.rmatvec_at(grad, positions), None, None


class AdapterSubspace:
    """One adapter: its layout, projection, and the cached flat ``P c`` (no parameters of its own)."""

    def __init__(self, layout: ThetaLayout, projection: Projection, mode: str):
        self.layout = layout
        self.projection = projection
        self.mode = mode
        self._cache: torch.Tensor | None = None
        self._cache_key = None
        self._cache_c: torch.Tensor | None = None
        self._pieces: list[torch.Tensor] = []

    def _follow_device(self, c: torch.Tensor) -> None:
        if self.projection.device != c.device:
            self.projection.to(c.device)
            self._cache = None

    def flat_delta(self, c: torch.Tensor) -> torch.Tensor:
        """``P c`` of shape ``(D,)`` (float32), recomputed only when ``c`` changed since the last call."""
        self._follow_device(c)
        track = torch.is_grad_enabled() and c.requires_grad
        key = (c.data_ptr(), track)
        # Compare values, not c._version: fused optimizers (AdamW(fused=True), the Trainer's CPU default)
        # update parameters in place without bumping the version counter. d numbers: cheap.
        if self._cache is None or self._cache_key != key or not torch.equal(self._cache_c, c.detach()):
            if track:
                self._cache = _Project.apply(c, self.projection)
            else:
                self._cache = self.projection.matvec(c.detach())
            # one split node for all tensors: its backward concatenates the per-tensor gradients in one pass
            # (slicing the flat vector per tensor would zero-fill a D-sized gradient for every tensor)
            sizes = [slot.numel for slot in self.layout.slots]
            self._pieces = [piece.view(slot.shape) for piece, slot in
                            zip(torch.split(self._cache, sizes), self.layout.slots)]
            self._cache_key = key
            self._cache_c = c.detach().clone()
        return self._cache

    def piece(self, c: torch.Tensor, i: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``λ_i P_i c``: the part of ``P c`` for tensor ``i`` of the layout, in its shape (float32).

        Projections with cheap row slices (hashing) compute it on the fly — one gather forward, one scatter
        backward, nothing of size D kept between layers, and ``λ_i`` applied to the d-sized ``c``. Others slice
        the ``P c`` cached for the step.
        """
        if self.projection.supports_row_slices:
            self._follow_device(c)
            slot = self.layout.slots[i]
            src = c if scale is None else c * scale
            if torch.is_grad_enabled() and src.requires_grad:
                out = _ProjectRows.apply(src, self.projection, slot.offset, slot.offset + slot.numel)
            else:
                out = self.projection.matvec_rows(src, slot.offset, slot.offset + slot.numel)
            return out.view(slot.shape)
        self.flat_delta(c)
        piece = self._pieces[i]
        return piece if scale is None else piece * scale

    def rows(self, c: torch.Tensor, i: int, rows: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (distinct, int64) of ``λ_i P_i c`` reshaped as tensor ``i``: shape ``(len(rows), ...)``.

        With a gather-friendly projection (hashing) only those rows are computed, forward and backward — the
        cost of an embedding's delta then follows the batch's tokens, not the vocabulary.
        """
        slot = self.layout.slots[i]
        if not self.projection.supports_row_slices:
            return self.piece(c, i, scale)[rows]
        self._follow_device(c)
        width = slot.numel // slot.shape[0]
        positions = (rows.to(self.projection.device).unsqueeze(1) * width
                     + torch.arange(width, device=self.projection.device) + slot.offset)
        src = c if scale is None else c * scale
        if torch.is_grad_enabled() and src.requires_grad:
            out = _ProjectAt.apply(src, self.projection, positions)
        else:
            out = self.projection.matvec_at(src, positions)
        return out.view(len(rows), *slot.shape[1:])

    def invalidate(self) -> None:
        self._cache = None
        self._cache_key = None


class SubspaceDelta(nn.Module):
    """The parametrization put on each tensor of θ: ``original -> original + Σ_active λ_i P_i c``.

    It keeps only a weak reference to its :class:`SubspaceEngine` (no module cycle, nothing extra saved).
    """

    def __init__(self, engine: "SubspaceEngine", slot_name: str):
        super().__init__()
        object.__setattr__(self, "_engine_ref", weakref.ref(engine))
        self.slot_name = slot_name

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        engine = self._engine_ref()
        if engine is None:
            return original
        return engine.apply_delta(self.slot_name, original)

    def __deepcopy__(self, memo):
        engine = self._engine_ref()
        new = SubspaceDelta.__new__(SubspaceDelta)
        nn.Module.__init__(new)
        new.slot_name = self.slot_name
        new_engine = memo.get(id(engine)) if engine is not None else None
        object.__setattr__(new, "_engine_ref", weakref.ref(new_engine) if new_engine is not None else (lambda: None))
        return new


class SubspaceEngine(nn.Module):
    """Owns the trainable vectors of every adapter and puts ``θ0 + δ`` into the model's weights.

    Parameters (all float32): ``coeffs[name]`` is ``c`` (shape ``(d_c,)``), ``scales[name]`` the SAID scales
    (shape ``(m,)``, only in SAID mode). Use :meth:`add_adapter` to attach an adapter to a model.
    """

    def __init__(self):
        super().__init__()
        self.coeffs = nn.ParameterDict()
        self.scales = nn.ParameterDict()
        self.adapters: dict[str, AdapterSubspace] = {}
        self.active: list[str] = []
        self.enabled = True
        self.merged: list[str] = []
        #: plain ``nn.Embedding`` layers add the delta to the rows a batch reads instead of the whole table
        self.row_path_embeddings = True
        object.__setattr__(self, "_model_ref", None)

    # -- building ---------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        model: nn.Module,
        name: str,
        dim: int,
        projection: "str | Projection" = "hashing",
        mode: str = "global",
        seed: int = 0,
        target_modules=None,
        exclude_modules=None,
        skip_module_prefixes: Iterable[str] = (),
        projection_options: dict | None = None,
        layout: ThetaLayout | None = None,
    ) -> AdapterSubspace:
        """Reparameterize ``model`` for adapter ``name``; returns its :class:`AdapterSubspace`."""
        prebuilt = projection if isinstance(projection, Projection) else None
        validate_subspace_args(dim, None if prebuilt else projection, mode)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        if layout is None:
            layout = select_parameters(model, target_modules, exclude_modules, skip_module_prefixes)
        n_scales = len(layout.slots) if mode == "said" else 0
        d_c = dim - n_scales
        if d_c <= 0:
            raise ValueError(
                f"SAID mode spends one of the dim={dim} trainable numbers on each of the {n_scales} tensors of θ, "
                f"leaving none for c; use dim > {n_scales} or mode='global'"
            )
        if dim > layout.D:
            raise ValueError(f"dim={dim} is larger than the number of weights in θ (D={layout.D})")
        device = _get_original(model, layout.slots[0]).device
        if prebuilt is not None:
            if (prebuilt.D, prebuilt.d) != (layout.D, d_c):
                raise ValueError(
                    f"the given {prebuilt.kind} projection maps R^{prebuilt.d} -> R^{prebuilt.D}, but this model's θ "
                    f"needs R^{d_c} -> R^{layout.D}"
                )
            proj = prebuilt.to(device)
        else:
            proj = make_projection(projection, layout.D, d_c, seed=seed, device=device, **(projection_options or {}))
        state = AdapterSubspace(layout, proj, mode)
        self.coeffs[name] = nn.Parameter(torch.zeros(d_c, device=device, dtype=torch.float32))
        if n_scales:
            self.scales[name] = nn.Parameter(torch.ones(n_scales, device=device, dtype=torch.float32))
        self.adapters[name] = state
        object.__setattr__(self, "_model_ref", weakref.ref(model))
        for slot in layout.slots:
            for module_name, attr in slot.holders:
                module = model.get_submodule(module_name)
                if not _has_subspace_parametrization(module, attr):
                    parametrize.register_parametrization(module, attr, SubspaceDelta(self, slot.name), unsafe=True)
                    _use_row_path_if_embedding(module, attr)
                _plist(module, attr).original.requires_grad_(False)
        if not self.active:
            self.active = [name]
        return state

    # -- the forward path -------------------------------------------------------------------------------------
    def apply_delta(self, slot_name: str, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        out = original
        for name in self.active:
            if name in self.merged:
                continue
            state = self.adapters.get(name)
            if state is None:
                continue
            i = state.layout.index.get(slot_name)
            if i is None:
                continue
            scale = self.scales[name][i] if name in self.scales else None
            out = out + state.piece(self.coeffs[name], i, scale).to(original.dtype)
        return out

    def rows_delta(self, slot_name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """Rows ``rows`` of the summed active delta of one tensor (float32), or None when nothing applies."""
        if not self.enabled:
            return None
        total = None
        for name in self.active:
            state = self.adapters.get(name)
            if name in self.merged or state is None:
                continue
            i = state.layout.index.get(slot_name)
            if i is None:
                continue
            scale = self.scales[name][i] if name in self.scales else None
            part = state.rows(self.coeffs[name], i, rows, scale)
            total = part if total is None else total + part
        return total

    def slot_delta(self, name: str, i: int) -> torch.Tensor:
        """``λ_i P_i c`` for tensor ``i`` of adapter ``name`` (float32, no autograd)."""
        state = self.adapters[name]
        with torch.no_grad():
            return state.piece(self.coeffs[name], i, self.scales[name][i] if name in self.scales else None)

    # -- merging and removal ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model: nn.Module, names: Sequence[str], sign: float = 1.0, safe: bool = False) -> None:
        """Add (``sign=1``) or subtract (``sign=-1``) the deltas of ``names`` into the base weights θ0."""
        for name in names:
            state = self.adapters[name]
            for i, slot in enumerate(state.layout.slots):
                original = _get_original(model, slot)
                delta = self.slot_delta(name, i)
                if safe and not torch.isfinite(delta).all():
                    raise ValueError(f"NaN or inf in the delta of adapter {name!r}; refusing to merge it")
                original.add_((sign * delta).to(original.dtype))

    def remove_parametrizations(self, model: nn.Module) -> None:
        """Take every subspace parametrization off ``model``, leaving the (possibly merged) θ0 in place."""
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module):
                continue
            for attr in list(module.parametrizations.keys()):
                if _has_subspace_parametrization(module, attr):
                    original = module.parametrizations[attr].original
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                    # remove_parametrizations re-registers the very same Parameter object, so ties survive
                    assert getattr(module, attr) is original

    def delete_adapter(self, model: nn.Module, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.adapters[name]
        del self.coeffs[name]
        if name in self.scales:
            del self.scales[name]
        self.active = [a for a in self.active if a != name]
        if not self.active and self.adapters:
            self.active = [next(iter(self.adapters))]  # as peft does: fall back to the first remaining adapter
        if not self.adapters:
            self.remove_parametrizations(model)

    def set_active(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter {n!r}; have {sorted(self.adapters)}")
        self.active = list(names)

    def invalidate(self) -> None:
        for state in self.adapters.values():
            state.invalidate()

    def _apply(self, fn, recurse=True):
        # model.to(device) moves c; drop caches so P c is recomputed (and P moved) on the new device
        out = super()._apply(fn, recurse)
        self.invalidate()
        return out


# ----------------------------------------------------------------------------------------------------------------
# embeddings: only the rows a batch reads
# ----------------------------------------------------------------------------------------------------------------
def _use_row_path_if_embedding(module: nn.Module, attr: str) -> None:
    """Give a plain ``nn.Embedding``'s parametrized class a forward that adds the delta to the looked-up rows only.

    ``register_parametrization`` gives each module its own subclass, so the override touches this module alone
    and disappears with the parametrization. Subclasses with their own forward (scaled embeddings) keep the
    full path: their forward is not replaced.
    """
    if attr != "weight" or not isinstance(module, nn.Embedding):
        return
    base = type(module).__mro__[1]  # the class before parametrization
    if base.forward is nn.Embedding.forward:
        type(module).forward = _row_path_embedding_forward


def _row_path_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    """``E[ids] = θ0[ids] + δ[ids]`` with ``δ`` computed for the distinct ids only (same values and gradients)."""
    plist = self.parametrizations.weight
    deltas = [p for p in plist if isinstance(p, SubspaceDelta)]
    engine = deltas[0]._engine_ref() if len(plist) == 1 and deltas else None
    if engine is None or not engine.row_path_embeddings or self.max_norm is not None or self.sparse:
        return nn.Embedding.forward(self, input)
    original = plist.original
    out = F.embedding(input, original, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)
    rows, inverse = torch.unique(input, return_inverse=True)
    delta = engine.rows_delta(deltas[0].slot_name, rows)
    if delta is None:
        return out
    pad = None
    if self.padding_idx is not None:  # F.embedding sends no gradient through the padding row: neither do we
        hit = (rows == self.padding_idx).nonzero()
        pad = int(hit[0, 0]) if len(hit) else None
    return out + F.embedding(inverse, delta.to(original.dtype), pad, None, 2.0, self.scale_grad_by_freq, False)


def find_engine(model: nn.Module) -> "SubspaceEngine | None":
    """The :class:`SubspaceEngine` inside ``model`` (a PEFT subspace model or a reparameterized one), or None."""
    for module in model.modules():
        if isinstance(module, SubspaceEngine):
            return module
    return None


def _plist(module: nn.Module, attr: str):
    return module.parametrizations[attr]


def _has_subspace_parametrization(module: nn.Module, attr: str) -> bool:
    return parametrize.is_parametrized(module, attr) and any(
        isinstance(p, SubspaceDelta) for p in module.parametrizations[attr]
    )


def validate_subspace_args(dim, projection, mode) -> None:
    """Raise a ValueError naming the problem for a bad ``dim``, ``projection`` or ``mode``.

    ``projection=None`` skips the kind check (a prebuilt :class:`Projection`, e.g. a trajectory basis).
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"dim must be a positive integer, got {dim!r} ({type(dim).__name__})")
    if dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if projection is not None and projection not in PROJECTION_KINDS and projection not in STORED_KINDS:
        raise ValueError(f"unknown projection kind {projection!r}; choose one of {sorted(PROJECTION_KINDS)} "
                         f"(or {sorted(STORED_KINDS)} for an adapter saved with its basis)")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")


def reparameterize(model: nn.Module, dim: int, projection: str = "hashing", mode: str = "global", seed: int = 0,
                   target_modules=None, exclude_modules=None, modules_to_save: Sequence[str] = (),
                   projection_options: dict | None = None) -> SubspaceEngine:
    """Reparameterize ``model`` in place without PEFT: freeze everything, train ``engine.parameters()``.

    Returns the :class:`SubspaceEngine`, also registered on the model as ``model.subspace`` so that
    ``model.to()``, ``model.parameters()`` and ``model.state_dict()`` include it. Parameters under
    ``modules_to_save`` stay trainable in full and are left out of θ.
    """
    if isinstance(getattr(model, "subspace", None), SubspaceEngine):
        raise ValueError("this model is already reparameterized (it has a `subspace` engine)")
    engine = SubspaceEngine()
    engine.add_adapter(model, "default", dim, projection, mode, seed, target_modules, exclude_modules,
                       skip_module_prefixes=modules_to_save, projection_options=projection_options)
    for pname, p in model.named_parameters():
        if not _under_suffix(pname.rpartition(".")[0], modules_to_save):
            p.requires_grad_(False)
    model.add_module("subspace", engine)
    return engine


def layout_from_names(model: nn.Module, names: Sequence[str]) -> ThetaLayout:
    """A layout holding exactly the parameters ``names`` (as ``model.named_parameters()`` spells them), in order.

    Tied parameters keep every holder, so writing the delta into one updates all uses.
    """
    params = dict(model.named_parameters())
    by_id: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            by_id.setdefault(id(p), []).append((module_name, attr))
    slots = []
    for name in names:
        if name not in params:
            raise ValueError(f"parameter {name!r} is not in the model (it has e.g. {list(params)[:3]})")
        p = params[name]
        slots.append(ParamSlot(name=name, holders=by_id[id(p)], shape=tuple(p.shape)))
    return ThetaLayout(slots)
