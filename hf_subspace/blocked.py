"""Huge LM heads in θ (a tied 50k x 768 LM head) in row blocks: their adapted weight never exists whole.

A plain ``nn.Linear`` that is the model's output embedding (``get_output_embeddings()``) or shares its weight with
another module (a tied head), whose weight is in θ, has at least :data:`MIN_ELEMENTS` entries and uses a
projection with cheap row slices (hashing) gets a forward that computes ``y = x (θ0 + δ)ᵀ`` a block of output rows at a time, and
a backward that recomputes each block of ``θ0 + δ`` for ``∂L/∂x`` and takes ``Pᵀ`` of that block's weight
gradient at once. Peak extra memory is one block (``BLOCK_ELEMENTS`` weights) instead of the adapted weight plus
its whole gradient (for GPT-2's head: two 154 MB tensors in float32). Values and gradients are those of the plain
path (gradients up to the order of summation over blocks). Under autocast the blocks are multiplied as autocast
would multiply the whole weight: input and block cast to the autocast dtype, each block of ``θ0 + δ`` computed in
float32 first. Block offsets are host integers and nothing reads a value back from the device. Without autograd,
with several parametrizations, or for other kinds, the plain path runs. Second derivatives through such a layer
are refused (``once_differentiable``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .products import run
from .layer import override_forward, sole_subspace_layer

#: weights at least this large take the blocked path (16M entries: 64 MB in float32)
MIN_ELEMENTS = 1 << 24
#: weights per block (4M: 16 MB in float32)
BLOCK_ELEMENTS = 1 << 22


def output_heads(model: nn.Module) -> set[int]:
    """``id`` of the model's output embedding (a transformers model's LM head), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    return {id(head)} if isinstance(head, nn.Module) else set()


def use_blocked_path_if_huge_linear(module: nn.Module, attr: str, numel: int, head: bool = True) -> None:
    """Give a plain, huge ``nn.Linear``'s parametrized class the blocked forward (this module alone).

    Only heads (``head``: the output embedding, or a weight shared with another module): an ordinary linear's
    adapted weight exists for a moment anyway, one tensor at a time, and blocking it would multiply its ops by
    its number of blocks (Llama-2-7B's MLPs: 11 blocks each, ~100 ops a block), which a GPU pays in launches.
    """
    if head and attr == "weight" and isinstance(module, nn.Linear) and numel >= MIN_ELEMENTS:
        override_forward(module, nn.Linear, blocked_linear_forward)


def blocked_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    layer = sole_subspace_layer(self)
    engine = None if layer is None else layer.engine
    if engine is None or not engine.blocked_linears:
        return nn.Linear.forward(self, x)
    original, slot_name = self.parametrizations.weight.original, layer.slot_name
    live = engine._live(slot_name)
    if (not live or not all(state.projection.supports_row_slices for _, state, _ in live)
            or not engine.needs_grad(live, original) or original.requires_grad):
        return nn.Linear.forward(self, x)
    names = [name for name, _, _ in live]
    coeffs = [engine.coeffs[n] for n in names]
    scales = [engine._scale(n, i) for n, _, i in live]
    terms = [(state, i, lam is not None) for (_, state, i), lam in zip(live, scales)]
    flat_scales = [lam for lam in scales if lam is not None]
    kind = x.device.type
    cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    y = BlockedLinear.apply(x, original, terms, cast, len(coeffs), *coeffs, *flat_scales)
    return y if self.bias is None else y + self.bias.to(y.dtype)


def _block_weight(original, terms, coeffs, scales, r0, r1):
    """Rows ``r0:r1`` of ``θ0 + Σ λ P c`` (no autograd)."""
    width = original.shape[1]
    w = original[r0:r1]
    for (state, i, _), c, lam in zip(terms, coeffs, scales):
        slot = state.layout.slots[i]
        src = c if lam is None else c * lam
        a = slot.offset + r0 * width
        part = run(state.projection, "matvec_rows", src, a, a + (r1 - r0) * width).view(r1 - r0, width)
        w = w + part.to(original.device, original.dtype)
    return w


def _blocks(rows: int, width: int):
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class BlockedLinear(torch.autograd.Function):
    """``y = x (θ0 + Σ λ_a P_a c_a)ᵀ`` computed and differentiated a block of rows at a time."""

    @staticmethod
    def forward(ctx, x, original, terms, cast, n_coeffs, *params):
        coeffs = [p.detach() for p in params[:n_coeffs]]
        it = iter(p.detach() for p in params[n_coeffs:])
        scales = [next(it) if has else None for _, _, has in terms]
        rows, width = original.shape
        with torch.autocast(x.device.type, enabled=False):
            xc = x if cast is None else x.to(cast)  # what autocast's linear would multiply
            y = xc.new_empty(*x.shape[:-1], rows)
            for r0, r1 in _blocks(rows, width):
                w = _block_weight(original, terms, coeffs, scales, r0, r1)
                y[..., r0:r1] = torch.matmul(xc, (w if cast is None else w.to(cast)).t())
        ctx.save_for_backward(xc, *coeffs, *[s for s in scales if s is not None])
        ctx.original, ctx.terms, ctx.n_coeffs, ctx.cast, ctx.x_dtype = original, terms, n_coeffs, cast, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        with torch.autocast(gy.device.type, enabled=False):
            return BlockedLinear._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x, *rest = ctx.saved_tensors
        coeffs, it = rest[:ctx.n_coeffs], iter(rest[ctx.n_coeffs:])
        scales = [next(it) if has else None for _, _, has in ctx.terms]
        original = ctx.original
        rows, width = original.shape
        need_x = ctx.needs_input_grad[0]
        cast = ctx.cast
        # under autocast each block's ∂L/∂x is a low-precision product, summed over blocks in float32
        gx = torch.zeros(x.shape, dtype=x.dtype if cast is None else torch.float32, device=x.device) if need_x else None
        gy = gy if cast is None else gy.to(cast)
        gc = [torch.zeros_like(c) for c in coeffs]
        gl = [None if lam is None else torch.zeros_like(lam) for lam in scales]
        x2 = x.reshape(-1, width)
        gy2 = gy.reshape(-1, rows)
        for r0, r1 in _blocks(rows, width):
            g = gy2[:, r0:r1]
            if need_x:
                w = _block_weight(original, ctx.terms, coeffs, scales, r0, r1)
                if cast is None:
                    gx.view(-1, width).addmm_(g, w)
                else:
                    gx.view(-1, width).add_(g @ w.to(cast))
            gw = (g.t() @ x2).float().reshape(-1)  # this block's weight gradient, then its Pᵀ at once
            for k, ((state, i, _), c, lam) in enumerate(zip(ctx.terms, coeffs, scales)):
                slot = state.layout.slots[i]
                a = slot.offset + r0 * width
                pt = state.projection.rmatvec_rows(gw, a, a + gw.numel())  # autocast is off here
                gc[k] += pt if lam is None else pt * lam
                if lam is not None:
                    gl[k] += torch.dot(pt, c)  # ∂L/∂λ = <P c, ∂L/∂W> = <c, Pᵀ ∂L/∂W>
        if gx is not None and gx.dtype != ctx.x_dtype:
            gx = gx.to(ctx.x_dtype)
        return (gx, None, None, None, None, *gc, *[g for g in gl if g is not None])
