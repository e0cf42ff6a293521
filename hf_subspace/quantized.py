"""θ over quantized linear layers: bitsandbytes 4-bit (NF4, FP4) ``Linear4bit`` and 8-bit ``Linear8bitLt``.

A quantized weight cannot hold ``θ0 + δ`` (it is packed integers), so it gets no parametrization. Instead the
layer's forward is replaced while an adapter is attached: the weight is dequantized, δ (float32, cast to the
compute dtype) is added and the product runs::

    y = x @ (dequant(W) + Σ λ_i P_i c).T + b            (in the layer's compute dtype)

* Nothing of the layer's size is kept from forward to backward: :class:`_DequantLinear` saves the input ``x`` and
  the d numbers of c the forward used, and its backward dequantizes W and recomputes δ again (one layer at a time),
  as the engine does for plain weights. ``c`` stays float32; the weight gradient ``gᵀx`` exists one layer at a time
  and goes straight into ``Pᵀ``.
* θ0 of such a tensor is the *dequantized* weight: what the layer computes with. The base fingerprint is taken on
  those values (:func:`float_values`), so an adapter loads onto the same checkpoint quantized the same way, or onto
  the model ``model.dequantize()`` returns, with no warning. Onto the unquantized checkpoint it loads with a warning
  stating the difference (:func:`round_trip` quantizes the plain weights the same way to check they are the same
  checkpoint; that check is :func:`hf_subspace.fingerprint.check_quantized_base`).
* With no adapter active (``disable_adapter()``) the layer runs bitsandbytes' own forward. 8-bit layers with an
  adapter compute in floating point on the dequantized weight: LLM.int8()'s activation quantization is not applied,
  so at ``c = 0`` their output differs from bitsandbytes' own by that rounding.
* Merging into quantized weights is refused (it would requantize: lossy, and the merged model would not be the one
  trained). Ship by ``base.dequantize()`` (transformers) then ``PeftModel.from_pretrained(base, dir)
  .merge_and_unload()``: a float model that computes exactly what was trained.
* Other quantizers (torchao tensor subclasses, GPTQ/AWQ/HQQ layers, any layer with an integer weight) are refused
  with their name: :func:`unsupported_quantization`.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SubspaceLayer

#: the attribute of a quantized layer that holds its :class:`~hf_subspace.layer.SubspaceLayer` (a submodule,
#: so peft's ``disable_adapter()`` / ``get_layer_status()`` find it; it has no parameters)
LAYER_ATTR = "subspace_layer"

_BNB_LAYERS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}
_BNB_PARAMS = {"Params4bit": "4bit", "Int8Params": "8bit"}
#: class names of quantized linear layers of other libraries (refused by name)
_OTHER_QUANTIZED = ("QuantLinear", "HQQLinear", "WQLinear", "FP8Linear", "EetqLinear", "MarlinLinear", "QLinear",
                    "Linear4bitLt", "Int8Linear", "Int4Linear")


def _root(cls) -> str:
    return (getattr(cls, "__module__", "") or "").split(".")[0]


def bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or subclass) whose weight is
    quantized, else None."""
    for cls in type(module).__mro__:
        if _root(cls) == "bitsandbytes" and cls.__name__ in _BNB_LAYERS:
            weight = getattr(module, "weight", None)
            if weight is not None and type(weight).__name__ in _BNB_PARAMS:
                if _BNB_PARAMS[type(weight).__name__] == "8bit" and getattr(weight, "has_fp16_weights", False):
                    return None  # an 8-bit layer that trains its float weights: a plain float tensor
                return _BNB_LAYERS[cls.__name__]
    return None


def is_quantized_weight(t) -> bool:
    """Whether ``t`` is a bitsandbytes quantized parameter (``Params4bit`` / quantized ``Int8Params``)."""
    name = type(t).__name__
    return _root(type(t)) == "bitsandbytes" and name in _BNB_PARAMS and not (
        name == "Int8Params" and getattr(t, "has_fp16_weights", False))


def unsupported_quantization(module: nn.Module) -> str | None:
    """A description (``"Int8WeightOnlyLinear (torchao)"``) when ``module`` holds a quantized weight that a subspace
    adapter cannot adapt, else None: a torchao tensor subclass, a bitsandbytes layer other than Linear4bit /
    Linear8bitLt (e.g. ``Embedding4bit``), a known quantized linear class of another library, or any layer whose
    ``weight`` / ``qweight`` is an integer tensor."""
    if bnb_kind(module) is not None:
        return None
    for cls in type(module).__mro__:
        root = _root(cls)
        if root == "torchao" or (root == "bitsandbytes" and cls is not nn.Module):
            return f"{type(module).__name__} ({root})"
    for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        for cls in (type(p), type(getattr(p, "data", p))):
            root = _root(cls)
            if root in ("torchao", "bitsandbytes"):
                return f"{type(module).__name__} ({root} {cls.__name__} {name})"
        if name in ("weight", "qweight") and not (p.is_floating_point() or p.is_complex()):
            return f"{type(module).__name__} ({name} of dtype {str(p.dtype).removeprefix('torch.')})"
    if any(type(module).__name__.startswith(n) for n in _OTHER_QUANTIZED):
        return f"{type(module).__name__} ({_root(type(module))})"
    return None


UNSUPPORTED_HELP = ("a subspace adapter adapts bitsandbytes Linear4bit (NF4/FP4) and Linear8bitLt layers; other "
                    "quantized weights (torchao, GPTQ, AWQ, HQQ, ...) cannot hold θ0 + P c. Load the base with "
                    "bitsandbytes (BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True) or unquantized, or "
                    "leave these layers out of θ (exclude_modules)")


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``: the shape of the dequantized weight (what θ holds)."""
    return int(module.out_features), int(module.in_features)


# ----------------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The float values of a bitsandbytes quantized weight: 4-bit in the dtype it was quantized from, 8-bit float32.
    Shape ``(out_features, in_features)``."""
    import bitsandbytes as bnb

    if type(weight).__name__ == "Params4bit":
        data, state = weight.data, weight.quant_state
        if state is None:
            raise RuntimeError("this Params4bit weight has no quant_state: it was never quantized (move the layer "
                               "to its device first)")
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference packing
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), state)
        return bnb.functional.dequantize_4bit(data, state)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        raise RuntimeError("this Int8Params weight has no SCB (scales): it was never quantized")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def float_values(t: torch.Tensor) -> torch.Tensor:
    """``t``, dequantized when it is a bitsandbytes quantized weight (what the fingerprint of θ0 is taken on)."""
    return dequantize(t) if is_quantized_weight(t) else t


def scheme(weight: torch.Tensor) -> dict:
    """How a bitsandbytes weight is quantized (recorded in the adapter's config: ``base_quantization``)."""
    if type(weight).__name__ == "Params4bit":
        st = weight.quant_state
        return {"method": "bitsandbytes", "bits": 4, "quant_type": st.quant_type, "blocksize": int(st.blocksize),
                "compress_statistics": bool(st.nested), "dtype": str(st.dtype).removeprefix("torch.")}
    return {"method": "bitsandbytes", "bits": 8}


def describe(s: dict) -> str:
    return (f"{s['bits']}-bit {s['quant_type'].upper()} (bitsandbytes)" if s.get("bits") == 4
            else f"{s.get('bits')}-bit (bitsandbytes LLM.int8)")


@torch.no_grad()
def round_trip(values: torch.Tensor, s: dict) -> torch.Tensor:
    """``values`` quantized as ``s`` describes and dequantized again (in ``values``' dtype): what a layer quantized
    that way from these weights computes with."""
    import bitsandbytes as bnb

    w = values.detach()
    if s.get("bits") == 4:
        dtype = getattr(torch, s.get("dtype", "float32"), torch.float32)
        q, state = bnb.functional.quantize_4bit(w.to(dtype).contiguous(), blocksize=s["blocksize"],
                                                compress_statistics=s["compress_statistics"],
                                                quant_type=s["quant_type"])
        return bnb.functional.dequantize_4bit(q, state).to(values.dtype)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    return bnb.functional.int8_vectorwise_dequant(cb, scb).to(values.dtype)


# ----------------------------------------------------------------------------------------------------------------
# the forward
# ----------------------------------------------------------------------------------------------------------------
def attach(engine, module: nn.Module, slot_name: str) -> None:
    """Make ``module`` (a bitsandbytes quantized linear layer) compute with ``dequant(W) + δ`` of ``slot_name``."""
    if isinstance(module._modules.get(LAYER_ATTR), SubspaceLayer):
        return
    module.add_module(LAYER_ATTR, SubspaceLayer(engine, slot_name))
    # accelerate's hooks wrap ``forward`` and call ``_old_forward``: replace what they call
    attr = "_old_forward" if "_old_forward" in vars(module) else "forward"
    vars(module)["_subspace_replaced"] = (attr, vars(module).get(attr))
    setattr(module, attr, types.MethodType(_forward, module))


def detach(module: nn.Module) -> None:
    """Undo :func:`attach`: bitsandbytes' own forward again."""
    if LAYER_ATTR not in module._modules:
        return
    del module._modules[LAYER_ATTR]
    attr, previous = vars(module).pop("_subspace_replaced", ("forward", None))
    if previous is None:
        vars(module).pop(attr, None)
    else:
        setattr(module, attr, previous)


def attached_layer(module: nn.Module):
    """The :class:`~hf_subspace.layer.SubspaceLayer` of a quantized layer an adapter is attached to, or None."""
    return module._modules.get(LAYER_ATTR)


def _base_forward(module: nn.Module, x, *args, **kwargs):
    attr, previous = vars(module).get("_subspace_replaced", ("forward", None))
    if previous is not None:
        return previous(x, *args, **kwargs)
    return type(module).forward(module, x, *args, **kwargs)


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else x.dtype


def _forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
    layer = self._modules[LAYER_ATTR]
    engine, slot_name = layer._engine, layer.slot_name
    live = engine._live(slot_name)
    if not live:
        return _base_forward(self, x, *args, **kwargs)
    inp_dtype = x.dtype
    dtype = compute_dtype(self, x)
    x = x.to(dtype)
    pieces = [state.piece(engine.coeffs[name], i, engine._scale(name, i)) for name, state, i in live]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in pieces)):
        y = _DequantLinear.apply(x, self, engine, slot_name, _terms(engine, live), dtype, *pieces)
    else:
        y = F.linear(x, _adapted(self, dtype, pieces))
    bias = self.bias
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(inp_dtype)


def _adapted(module: nn.Module, dtype: torch.dtype, pieces) -> torch.Tensor:
    """``dequant(W)`` in ``dtype`` plus each piece cast to ``dtype``, added in place (one weight-sized tensor)."""
    w = dequantize(module.weight)
    w = w.to(dtype) if w.dtype != dtype else w  # dequantize returns a new tensor: ours to add into
    for p in pieces:
        w.add_(p.detach().to(w.device, dtype))
    return w


def _terms(engine, live) -> tuple:
    """What the backward needs to recompute δ (as the engine's ``_register_saved`` keeps it): per live adapter
    the d numbers of c (and λ) this forward used, or the piece of a flat ``P c`` that is kept for the step anyway."""
    s = engine.scratch
    snapshots = getattr(s, "snapshots", None)
    if snapshots is None:
        snapshots = {}
    terms = []
    for name, state, i in live:
        if name not in snapshots:
            lam = engine.scales[name].detach().clone() if name in engine.scales else None
            snapshots[name] = (engine.coeffs[name].detach().clone(), lam)
        c, lam = snapshots[name]
        view = None if state.projection.supports_row_slices else state.scratch.pieces[i].detach()
        terms.append((name, state, i, c, None if lam is None else lam[i], view))
    return tuple(terms)


class _DequantLinear(torch.autograd.Function):
    """``x @ (dequant(W) + Σ pieces).T`` in ``dtype``; saves ``x`` only and recomputes the weight in the backward.

    Every piece (``λ_i P_i c`` of one adapter, float32) gets the same gradient ``gᵀ x`` (float32), which autograd
    carries into ``Pᵀ``."""

    @staticmethod
    def forward(ctx, x, module, engine, slot_name, terms, dtype, *pieces):
        w = _adapted(module, dtype, pieces)
        ctx.module, ctx.engine, ctx.slot_name, ctx.terms, ctx.dtype = module, engine, slot_name, terms, dtype
        ctx.save_for_backward(x)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        needs_w = any(ctx.needs_input_grad[6:])
        grad_x = grad_w = None
        with torch.no_grad():
            if needs_x:
                pieces = [state.piece(c, i, lam) if view is None else (view if lam is None else view * lam)
                          for _, state, i, c, lam, view in ctx.terms]  # as the forward computed them
                w = _adapted(ctx.module, ctx.dtype, pieces)
                del pieces
                grad_x = grad.to(ctx.dtype) @ w
                del w
            if needs_w:
                g2 = grad.reshape(-1, grad.shape[-1])
                x2 = x.reshape(-1, x.shape[-1])
                grad_w = (g2.t().float() @ x2.float())
        return (grad_x, None, None, None, None, None, *[grad_w if n else None for n in ctx.needs_input_grad[6:]])


# ----------------------------------------------------------------------------------------------------------------
# quantizing a model already in memory (the examples: a GGUF base dequantized by transformers, a tiny model)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_linear_layers(model: nn.Module, bits: int = 4, quant_type: str = "nf4",
                           compute_dtype: torch.dtype | None = None, skip_output_layer: bool = True) -> nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by a bitsandbytes ``Linear4bit`` (``bits=4``,
    ``quant_type`` ``"nf4"`` / ``"fp4"``) or ``Linear8bitLt`` (``bits=8``) holding the same weights quantized on
    their device, as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` would (its defaults:
    blocksize 64, no double quantization, LLM.int8 threshold 6.0; the output layer — ``get_output_embeddings()`` —
    stays in floating point). For a model that is already in memory; returns ``model``."""
    import bitsandbytes as bnb

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    keep = set()
    if skip_output_layer and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        if out is not None:
            keep.add(id(out))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or id(child) in keep:
                continue
            w = child.weight
            if bits == 4:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype or w.dtype, quant_type=quant_type,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(w.data.detach().clone().cpu(), requires_grad=False,
                                               quant_type=quant_type, module=new)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(w.data.detach().clone().cpu(), requires_grad=False,
                                               has_fp16_weights=False)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.detach().clone().cpu(), requires_grad=child.bias.requires_grad)
            new = new.to(w.device)  # bitsandbytes quantizes when the layer is moved to its device
            new.train(child.training)
            setattr(parent, name, new)
    return model


def keep_layers_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference packing on every 4-bit layer of ``model`` (and undo it where done).

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode with an input that needs no gradient repacks its
    weight in place for a faster kernel that autograd cannot differentiate, and keeps it packed: after one
    evaluation, every later training step would get no gradient through such a layer — zero gradients for c,
    silently, whether or not the layer is in θ (through ``o_proj`` every attention weight is cut off)."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if bnb_kind(module) != "4bit":
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            with torch.no_grad():
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = module.weight.quant_state
