"""Is this the base an adapter was trained on? The fingerprint of θ0, and the record of how θ was quantized.

:func:`fingerprint_tensors` sketches θ0 in a few numbers that survive a change of dtype or device but not another
checkpoint; :func:`fingerprints_match` compares. :func:`quantization_record` / :func:`check_quantized_base` decide
the load of an adapter onto a base quantized differently from the one trained on.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Sequence

import torch

from .dtensor import is_dtensor, shard_stats
from .errors import AdapterMismatchError
from .quantized import describe, float_values, is_quantized_weight, round_trip, scheme


# ----------------------------------------------------------------------------------------------------------------
# fingerprint of θ0
# ----------------------------------------------------------------------------------------------------------------
FINGERPRINT_SKETCHES = 16
#: half an ulp, relative: the largest rounding error of one value stored in this dtype
_HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def fingerprint_tensors(tensors: Sequence[torch.Tensor]) -> str | None:
    """A dtype-tolerant fingerprint of ``tensors`` (θ0): ``"fp2:<dtype>:<16 numbers>"``; None on the meta device.

    A strided sample of 64 values and the mean absolute value of every tensor form a vector ``s`` (float64);
    the fingerprint is 16 fixed random ±1 sketches of ``s / ‖s‖``. Rounding every weight to a dtype of relative
    precision ``ε`` moves each sketch by about ``ε/√3`` (at most ``ε``), while another checkpoint moves them by
    its relative distance — O(1) for an unrelated one. :func:`fingerprints_match` compares within ``4ε`` of the
    coarser of the two dtypes. A bitsandbytes quantized weight is fingerprinted by its dequantized values (what the
    layer computes with, and what ``model.dequantize()`` gives).
    """
    if any(t.is_meta for t in tensors):
        return None
    tensors = [float_values(t) for t in tensors]  # a quantized weight: its dequantized values (what θ0 is)
    parts, dtypes = [], set()
    for t in tensors:
        dtypes.add(t.dtype)
        if type(t) is not torch.Tensor and is_dtensor(t):
            # FSDP2's shard of θ0: the same sample and mean from the shards (one all-reduce of 65 numbers; a
            # collective: every rank computes the fingerprint). See hf_subspace.dtensor.shard_stats.
            parts.extend(shard_stats(t, 64))
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        parts.append(flat[::step][:64].double().cpu())
        parts.append(_abs_mean(flat).reshape(1).cpu())
    s = torch.cat(parts)
    g = torch.Generator().manual_seed(20_260_101)
    signs = torch.randint(0, 2, (FINGERPRINT_SKETCHES, s.numel()), generator=g, dtype=torch.int8).double() * 2 - 1
    sketch = signs @ (s / s.norm().clamp_min(1e-300))
    coarsest = max(dtypes, key=lambda d: _HALF_ULP.get(d, 0.0))
    return f"fp2:{str(coarsest).removeprefix('torch.')}:" + ",".join(f"{v:.9g}" for v in sketch.tolist())


def _abs_mean(flat: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``flat.double().abs().mean()`` a chunk at a time (float64 sums): no float64 copy of a whole tensor (an LM
    head's would be 8 B per weight), and the same value to float64 rounding."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        total += flat[start:start + chunk].double().abs().sum()
    return total / max(flat.numel(), 1)


def fingerprints_match(saved: str, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` fit the fingerprint ``saved`` (an old-format fingerprint is compared exactly)."""
    if not saved.startswith("fp2:"):
        return _fingerprint_v1(tensors) == saved
    current = fingerprint_tensors(tensors)
    if current is None:
        return True  # nothing to compare on the meta device
    _, saved_dtype, saved_vals = saved.split(":", 2)
    _, cur_dtype, cur_vals = current.split(":", 2)
    eps = max(_HALF_ULP.get(getattr(torch, saved_dtype, None), 2.0**-8),
              _HALF_ULP.get(getattr(torch, cur_dtype, None), 2.0**-8))
    tol = max(4 * eps, 1e-7)
    a = [float(v) for v in saved_vals.split(",")]
    b = [float(v) for v in cur_vals.split(",")]
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def _fingerprint_v1(tensors: Sequence[torch.Tensor]) -> str:
    """The fingerprint of hf_subspace 0.1.0 adapters (4 significant digits: exact only in the dtype saved)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].double().cpu()
        stats = torch.stack([sample.sum(), sample.abs().sum(), flat.double().abs().sum().cpu() / flat.numel()])
        h.update(("|".join(f"{v:.4g}" for v in sample.tolist() + stats.tolist())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# the base an adapter was trained on
# ----------------------------------------------------------------------------------------------------------------
def quantization_record(layout, tensors) -> list | None:
    """``config.base_quantization``: the quantization schemes of θ's tensors and which tensors (indices in θ) each
    covers; None for an unquantized θ."""
    groups: list[dict] = []
    for i, (slot, t) in enumerate(zip(layout.slots, tensors)):
        if not slot.quantized:
            continue
        s = scheme(t)
        group = next((g for g in groups if {k: v for k, v in g.items() if k != "slots"} == s), None)
        if group is None:
            group = {**s, "slots": []}
            groups.append(group)
        group["slots"].append(i)
    return groups or None


def _schemes(config) -> dict[int, dict]:
    return {i: {k: v for k, v in g.items() if k != "slots"} for g in (config.base_quantization or [])
            for i in g["slots"]}


def _describe_base(by_slot: dict[int, dict]) -> str:
    kinds = sorted({describe(s) for s in by_slot.values()})
    return f"{len(by_slot)} tensor(s) of θ quantized {' / '.join(kinds)}" if kinds else "unquantized"


def check_quantized_base(config, layout, tensors) -> bool:
    """The base check of a load where θ is quantized differently from the base the adapter was trained on (True:
    checked here and accepted, with a warning; raises when refused); False when quantized the same way (the plain
    fingerprint check decides).

    * Trained on a quantized base, loaded onto the unquantized checkpoint: its weights, quantized the same way,
      must give the fingerprint trained on (same checkpoint); then it loads with a warning giving the relative
      difference between these weights and the dequantized ones trained on.
    * Trained unquantized (or quantized another way), loaded onto a quantized base: the fingerprint cannot tell the
      checkpoint from its quantization error, so the load is refused with what to do.
    """
    saved = _schemes(config)
    current = {i: scheme(t) for i, t in enumerate(tensors) if is_quantized_weight(t)}
    if saved == current:
        return False
    if saved and not current and fingerprints_match(config.base_fingerprint, tensors):
        return True  # the dequantized weights trained on, in floats (``base.dequantize()``): the trained model
    if saved and not current and all(i < len(tensors) for i in saved):
        tensors = [t.detach() for t in tensors]
        compared = [round_trip(t, saved[i]) if i in saved else t for i, t in enumerate(tensors)]
        if fingerprints_match(config.base_fingerprint, compared):
            num = sum(float((tensors[i].double() - compared[i].double()).pow(2).sum()) for i in saved)
            den = sum(float(tensors[i].double().pow(2).sum()) for i in saved)
            rel = (num / den) ** 0.5 if den > 0 else 0.0
            warnings.warn(
                f"this subspace adapter was trained on a quantized base ({_describe_base(saved)}) and is being "
                f"loaded onto the unquantized weights of the same checkpoint (they match once quantized the same "
                f"way). Its layers now compute with these weights instead of the dequantized ones trained on: they "
                f"differ by the quantization error (relative RMS {rel:.2%} over those tensors), so outputs differ "
                "from the trained model's by about as much as the quantized base's differ from this one's. Load the "
                "base with the same quantization (or `base.dequantize()` of it) to get exactly the trained model",
                stacklevel=3)
            return True
        raise AdapterMismatchError(
            f"this subspace adapter was trained on a quantized base ({_describe_base(saved)}); this base is "
            "unquantized, and its weights quantized the same way do not give the base fingerprint trained on: it "
            "is another checkpoint. Load the base it was trained on (quantized the same way). If you are sure, opt "
            "out with `PeftModel.from_pretrained(base, path, check_base_fingerprint=False)`")
    if fingerprints_match(config.base_fingerprint, tensors):
        return True
    raise AdapterMismatchError(
        f"this subspace adapter was trained on a base that was {_describe_base(saved)}, and this base is "
        f"{_describe_base(current)}: its dequantized weights differ from the weights trained on by the "
        "quantization, so the base fingerprint cannot confirm that it is the same checkpoint. Load the base as it "
        "was trained (same quantization, or unquantized), or, if it is the same checkpoint, opt out with "
        "`PeftModel.from_pretrained(base, path, check_base_fingerprint=False)` — outputs will then differ from the "
        "trained model's by the quantization error")
