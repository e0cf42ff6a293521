"""Which tensors form θ, and where each lives in the flat vector of length ``D``.

* :func:`select_parameters` chooses θ: the floating-point parameters owned directly by the modules that match
  ``target_modules`` (peft's own matching: a regex string, a list of names or suffixes, ``"all-linear"``),
  minus ``exclude_modules`` and anything under ``modules_to_save`` or a peft ``ModulesToSaveWrapper``.
* :class:`ThetaLayout` lays them end to end; a parameter shared by several modules (tied embeddings) is one
  tensor of θ with several holders.

The fingerprint of θ0 (is this the base trained on?) is in :mod:`hf_subspace.fingerprint`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SubspaceConfigError
from .fingerprint import fingerprint_tensors, fingerprints_match  # noqa: F401  (importable from here as before)
from .quantized import UNSUPPORTED_HELP, bnb_kind, is_quantized_weight, logical_shape, unsupported_quantization

ALL_LINEAR = "all-linear"


@dataclass
class ParamSlot:
    """One tensor of θ: where it lives in the model and where it lives in the flat vector."""

    name: str  # canonical name (first module path + attribute)
    holders: list[tuple[str, str]]  # every (module path, attribute) that holds this tensor (tied weights)
    shape: tuple[int, ...]
    offset: int = 0
    #: a bitsandbytes quantized weight: θ0 is its dequantized value and the layer's forward adds δ
    #: (:mod:`hf_subspace.quantized`); ``shape`` is the dequantized ``(out_features, in_features)``
    quantized: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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


# ----------------------------------------------------------------------------------------------------------------
# matching modules: peft's rules, one home
# ----------------------------------------------------------------------------------------------------------------
def _match_config(target_modules, exclude_modules, modules_to_save):
    return SimpleNamespace(target_modules=target_modules, exclude_modules=exclude_modules,
                           modules_to_save=modules_to_save, target_parameters=None,
                           layers_to_transform=None, layers_pattern=None, task_type=None)


def expand_all_linear(model: nn.Module, target_modules, task_type=None):
    """``"all-linear"`` -> the sorted names of every Linear / Conv1D module except the output layer (peft's rule)."""
    if not (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        return target_modules
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg = _match_config(target_modules, None, None)
    cfg.task_type = task_type
    names = sorted(_maybe_include_all_linear_layers(cfg, model).target_modules)
    return names


def module_matches(module_name: str, target_modules=None, exclude_modules=None, modules_to_save=()) -> bool:
    """Whether ``module_name`` is targeted, by peft's ``check_target_module_exists``; ``None`` targets all."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    if under_modules_to_save(module_name, modules_to_save):
        return False
    cfg = _match_config(target_modules if target_modules is not None else [], exclude_modules, None)
    found = check_target_module_exists(cfg, module_name)
    if isinstance(found, _ExcludedModule):
        return False
    return target_modules is None or bool(found)


def under_modules_to_save(module_name: str, modules_to_save) -> bool:
    """Whether ``module_name`` is (inside) one of ``modules_to_save`` — peft's rule for them."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in (modules_to_save or ()))


def _quantized_names(pairs: Sequence[tuple[str, str]], n: int = 3) -> str:
    shown = ", ".join(f"{name!r}: {cls}" for name, cls in pairs[:n])
    return shown + (f" and {len(pairs) - n} more" if len(pairs) > n else "")


def _refuse_unsupported_quantization(pairs: Sequence[tuple[str, str]], what: str) -> None:
    if pairs:
        raise SubspaceConfigError(f"{what} {len(pairs)} layer(s) with quantized weights of an unsupported kind "
                                  f"({_quantized_names(pairs)}): {UNSUPPORTED_HELP}")


def _kbit_frozen(model: nn.Module, trainable) -> bool:
    """Whether ``model`` holds bitsandbytes quantized layers and no trainable floating-point parameter: what
    peft's ``prepare_model_for_kbit_training`` leaves (it freezes every parameter). θ is then chosen as on the
    model before that call (every floating-point parameter), so both orders give the same θ."""
    if not any(bnb_kind(m) is not None for m in model.modules()):
        return False
    return not any(trainable(name, p) for name, (_, _, p) in holder_names(model).items()
                   if p.is_floating_point() and not is_quantized_weight(p))


def _wrapper_prefixes(model: nn.Module) -> list[str]:
    from peft.utils.other import ModulesToSaveWrapper

    return [name for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(attr, tensor)`` for the parameters ``module`` owns directly; one under a subspace parametrization gives
    its ``original`` (θ0)."""
    if isinstance(module, parametrize.ParametrizationList):
        return []  # its `original` is the parametrized module's tensor, listed there
    out = []
    if parametrize.is_parametrized(module):
        # a tensor under someone else's parametrization is not θ0 + δ material: leave it out
        for attr, plist in module.parametrizations.items():
            if all(getattr(p, "is_subspace_layer", False) for p in plist):
                out.append((attr, plist.original))
    return out + list(module.named_parameters(recurse=False))


def select_parameters(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Iterable[str] = (),
    trainable: Callable[[str, torch.Tensor], bool] | None = None,
) -> ThetaLayout:
    """Choose the tensors that form θ.

    By default every trainable floating-point parameter; ``trainable(name, tensor)`` replaces the
    ``requires_grad`` test (the tuner passes what was trainable before its first adapter froze the base).
    ``target_modules`` restricts θ to the parameters owned directly by matching modules (peft's rules: a regex
    string, a list of names or suffixes, or ``"all-linear"``). Modules under ``modules_to_save`` are trained in
    full and left out of θ.
    """
    if isinstance(target_modules, (list, tuple, set)) and len(target_modules) == 0:
        raise SubspaceConfigError("target_modules is an empty list; pass None to reparameterize every trainable "
                                  "parameter")
    target_modules = expand_all_linear(model, target_modules)
    trainable = trainable or (lambda name, p: p.requires_grad)
    if _kbit_frozen(model, trainable):
        trainable = lambda name, p: True  # noqa: E731 (see _kbit_frozen)
    skip = _wrapper_prefixes(model)
    slots: dict[int, ParamSlot] = {}
    order: list[int] = []
    matched_module = False
    quantized: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        if _is_under(module_name, skip) or not module_matches(module_name, target_modules, exclude_modules,
                                                               modules_to_save):
            continue
        bad = unsupported_quantization(module)
        if bad is not None:
            quantized.append((module_name, bad))
            continue
        quantized_weight = bnb_kind(module) is not None
        if quantized_weight:  # θ0 is the dequantized weight (hf_subspace.quantized); always a candidate
            p = module.weight
            matched_module = True
            if id(p) not in slots:
                slots[id(p)] = ParamSlot(name=f"{module_name}.weight" if module_name else "weight", holders=[],
                                         shape=logical_shape(module), quantized=True)
                order.append(id(p))
            slots[id(p)].holders.append((module_name, "weight"))
        for attr, p in own_tensors(module):
            name = f"{module_name}.{attr}" if module_name else attr
            if quantized_weight and attr == "weight":
                continue
            if not p.is_floating_point():
                continue
            matched_module = True
            if not trainable(name, p):
                continue
            if id(p) not in slots:
                slots[id(p)] = ParamSlot(name=name, holders=[], shape=tuple(p.shape))
                order.append(id(p))
            slots[id(p)].holders.append((module_name, attr))
    # a tensor shared with modules outside the match (a tied LM head when only one side is targeted) is one
    # tensor of θ: every holder reads θ0 + δ, or merging (which writes the shared tensor) would change the rest
    chosen = set(slots)
    for module_name, module in model.named_modules():
        if _is_under(module_name, skip):
            continue
        for attr, p in own_tensors(module):
            if id(p) in chosen and (module_name, attr) not in slots[id(p)].holders:
                slots[id(p)].holders.append((module_name, attr))
    _refuse_unsupported_quantization(quantized, "θ would include" if target_modules is None else
                                     f"target_modules={target_modules!r} matches")
    if not order:
        if target_modules is not None and not matched_module:
            raise SubspaceConfigError(
                f"target_modules={target_modules!r} matched no module with floating-point parameters; "
                "module names look like: " + ", ".join(n for n, _ in list(model.named_modules())[1:6])
            )
        raise SubspaceConfigError(
            "the model has no trainable floating-point parameters to reparameterize "
            "(all are frozen, integer, or under modules_to_save)"
        )
    return ThetaLayout([slots[k] for k in order])


def _offloads(module: nn.Module) -> bool:
    """Whether accelerate's hooks on ``module`` offload its weights (CPU or disk offload: they sit on the meta device
    and a hook loads them at each forward)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", ())) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) or getattr(h, "weights_map", None) is not None for h in hooks)


def refuse_offloaded_theta0(model: nn.Module, layout) -> None:
    """Refuse, naming the tensors, a θ whose θ0 accelerate offloads: the adapter computes θ0 + P c where a module's
    forward reads the weight and cannot see weights a hook swaps in, so it would fail at the first forward
    ("Cannot copy out of meta tensor") with c on the meta device."""
    offloaded = []
    for slot in layout.slots:
        for module_name, attr in slot.holders:
            module = model.get_submodule(module_name)
            if original_tensor(model, slot).is_meta and _offloads(module):
                offloaded.append(slot.name)
                break
    if offloaded:
        shown = ", ".join(repr(n) for n in offloaded[:3]) + (f" and {len(offloaded) - 3} more"
                                                              if len(offloaded) > 3 else "")
        raise SubspaceConfigError(
            f"{len(offloaded)} tensors of θ ({shown}) are offloaded by accelerate (CPU or disk offload from "
            "device_map / max_memory / cpu_offload: their weights sit on the meta device and a hook loads them at "
            "each forward). A subspace adapter computes θ0 + P c where the module reads its weight and needs θ0 in "
            "memory: load the base without offload (device_map={'': 'cpu'}, or a device_map / max_memory that keeps "
            "every layer on a device; bf16 halves θ0), or keep the offloaded modules out of θ (target_modules / "
            "exclude_modules)")


def check_targets(model: nn.Module, target_modules, exclude_modules=None, modules_to_save=(),
                  task_type=None) -> None:
    """Refuse, with a :class:`~hf_subspace.errors.SubspaceConfigError` naming the pattern, a ``target_modules``
    entry (each of a list; a regex string as a whole; ``"all-linear"`` and ``None`` are not checked) that

    * matches no module of ``model`` that owns floating-point parameters, or
    * matches a module that ``modules_to_save`` (or an existing ``ModulesToSaveWrapper``) trains in full: a module
      is either in θ or trained in full, and peft would silently leave it out of θ.

    Called when an adapter is created (a loaded adapter keeps what it was saved with).
    """
    if target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        return
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    skip = _wrapper_prefixes(model)
    modules = list(model.named_modules())
    owners = {name for name, module in modules
              if any(p.is_floating_point() for _, p in own_tensors(module))}
    owners |= {name for name, module in modules if bnb_kind(module) is not None}
    quantized = {name: kind for name, module in modules if (kind := unsupported_quantization(module)) is not None}
    for entry in entries:
        in_theta, in_full, empty, in_quantized = [], [], [], []
        for name, _ in modules:
            if not name or not module_matches(name, [entry] if not isinstance(target_modules, str) else entry,
                                              exclude_modules):
                continue
            if name in quantized and not (under_modules_to_save(name, modules_to_save) or _is_under(name, skip)):
                in_quantized.append((name, quantized[name]))
            elif under_modules_to_save(name, modules_to_save) or _is_under(name, skip):
                in_full.append(name)
            elif name in owners:
                in_theta.append(name)
            else:
                empty.append(name)
        what = f"target_modules={entry!r}" if isinstance(target_modules, str) else \
            f"the target_modules entry {entry!r}"
        _refuse_unsupported_quantization(in_quantized, f"{what} matches")
        if in_full:
            head = ("; peft adds 'classifier' and 'score' to it for task_type='SEQ_CLS'" if task_type == "SEQ_CLS"
                    else "")
            if not any(under_modules_to_save(n, modules_to_save) for n in in_full):
                head += "; or another adapter's"
            raise SubspaceConfigError(
                f"{what} matches {_names(in_full)}, which is trained in full (modules_to_save="
                f"{list(dict.fromkeys(modules_to_save or []))!r}{head}): a module is either in θ (target_modules) or "
                "trained in full (modules_to_save), not both. Remove it from one of the two, or keep it out of θ "
                "with exclude_modules")
        if not in_theta:
            if empty:
                raise SubspaceConfigError(
                    f"{what} matches only modules that own no parameters themselves ({_names(empty)}); θ is made of "
                    "the parameters a matched module owns directly: name the layers inside, e.g. "
                    + _layer_names(model, owners))
            raise SubspaceConfigError(
                f"{what} matched no module of this {type(model).__name__} (a list entry matches a module's full "
                "name or its last parts, a string is a regex on the full name); its layers are named e.g. "
                + _layer_names(model, owners))


def _names(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _layer_names(model: nn.Module, owners) -> str:
    """The distinct last parts of the names of the modules that own parameters (what a list entry can name)."""
    last = sorted({name.rsplit(".", 1)[-1] for name in owners if name}, key=str.lower)
    return ", ".join(repr(x) for x in last[:12]) + (", ..." if len(last) > 12 else "")


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


def original_tensor(model: nn.Module, slot: ParamSlot) -> torch.Tensor:
    """The stored tensor of ``slot`` (θ0 — the parametrization's ``original`` once the model is wrapped)."""
    module_name, attr = slot.holders[0]
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def holder_names(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter of ``model`` by its plain name (``module.attr``, parametrizations looked through)."""
    out = {}
    for module_name, module in model.named_modules():
        for attr, p in own_tensors(module):
            out[f"{module_name}.{attr}" if module_name else attr] = (module, attr, p)
    return out
