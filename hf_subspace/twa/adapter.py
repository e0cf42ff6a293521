"""Save a TWA result as a PEFT adapter that holds its basis: base = the snapshot mean, adapter = (basis, c).

The merged model (``trainer.save_model``) is what most users want. The adapter form keeps the subspace: load it
with ``PeftModel.from_pretrained(base, path)`` and it gives the same model, but the coefficients can be trained
further (more TWA epochs, another task's data) or inspected, and the basis shared. It is large: the basis is
``k × D`` floats (k + 1 times the model's size, with the base).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .basis import TrajectoryBasisResult

# the order in which the saved files replace the previous ones: the base's weights and config, then the adapter's
BASE_ORDER = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin", "config.json", "generation_config.json")


def save_twa_adapter(model: nn.Module, result: TrajectoryBasisResult, output_dir: str | os.PathLike,
                     adapter_name: str = "default", training_metrics: dict | None = None,
                     training_data: str | None = None) -> dict[str, str]:
    """Write ``output_dir/base`` (``model`` with θ set to the snapshot mean) and ``output_dir/adapter``.

    Args:
        model: the model TWA produced (``trainer.model`` after a TWA run: plain, merged). Its buffers (BatchNorm
            statistics, recalibrated at the TWA point) go into the base unchanged, so base + adapter reproduces
            ``model`` exactly.
        result: the :class:`TrajectoryBasisResult` of that run (``trainer.twa_result``), with ``coefficients``.
        output_dir: created if needed. Both folders are first written into a temporary folder next to it, then
            each file replaces its previous version (``os.replace``), so a run killed while saving leaves the
            previous base and adapter whole.
        training_metrics, training_data: recorded in the adapter's config and model card (beside the number of
            snapshots and the basis method).

    Returns ``{"base": path, "adapter": path}``. The base is saved with ``save_pretrained`` when the model has it
    (a transformers model), else as ``model.safetensors`` (``safetensors.torch.load_model`` reads it back).
    """
    from .. import hub
    from .._registry import SAVE_ORDER as ADAPTER_ORDER
    from ..atomic import atomic_folder

    coefficients = getattr(result, "coefficients", None)
    if coefficients is None:
        raise ValueError("this TWA result has no trained coefficients (result.coefficients); it comes from "
                         "build_trajectory_basis alone — run the TWA phase first")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if trainable != list(result.names):
        missing = sorted(set(result.names) - set(trainable))[:3]
        raise ValueError("the model's trainable parameters are not the tensors of the TWA basis "
                         f"({len(trainable)} vs {len(result.names)}; e.g. not trainable here: {missing}); "
                         "pass the model the TWA run produced")
    base = copy.deepcopy(model)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name in result.names:
            params[name].copy_(result.mean[name].to(params[name].device, params[name].dtype))
    base_dir = os.path.join(output_dir, "base")
    adapter_dir = os.path.join(output_dir, "adapter")
    # everything is written into a temporary folder next to output_dir, then moved file by file: the base's
    # weights and config, then the adapter's weights and config (a kill during the writes leaves the old pair)
    with atomic_folder(output_dir, order=BASE_ORDER + ADAPTER_ORDER, skip=("README.md",)) as tmp:
        peft_model = _write_pair(base, result, coefficients, os.path.join(tmp, "base"), os.path.join(tmp, "adapter"),
                                 base_dir, adapter_name, training_metrics, training_data)
    hub.write_adapter_cards(peft_model, adapter_dir)  # the card names the final folder and the file's size
    return {"base": base_dir, "adapter": adapter_dir}


def _write_pair(base, result, coefficients, tmp_base: str, tmp_adapter: str, base_dir: str, adapter_name: str,
                training_metrics, training_data):
    from peft import get_peft_model

    from ..engine import find_engine
    from ..tuner import SubspaceConfig

    os.makedirs(tmp_base, exist_ok=True)
    if hasattr(base, "save_pretrained"):
        base.save_pretrained(tmp_base)
    else:
        from safetensors.torch import save_model

        save_model(base, os.path.join(tmp_base, "model.safetensors"))

    # peft reads the base's name from the model: point it at the saved base (the adapter card and config show it)
    if getattr(base, "config", None) is not None and hasattr(base.config, "_name_or_path"):
        base.config._name_or_path = str(base_dir)
    else:
        base.__dict__["name_or_path"] = str(base_dir)
    config = SubspaceConfig(dim=result.k, projection="trajectory", save_projection=True,
                            training_metrics={"twa_snapshots": int(result.num_snapshots),
                                              "twa_basis": result.method, **(training_metrics or {})},
                            training_data=training_data)
    peft_model = get_peft_model(base, config, adapter_name=adapter_name)
    engine = find_engine(peft_model)
    state = engine.adapters[adapter_name]
    got = [slot.name for slot in state.layout.slots]
    if got != list(result.names):
        where = next(((a, b) for a, b in zip(got, result.names) if a != b),
                     f"{len(got)} tensors vs {len(result.names)}")  # same prefix, different lengths
        raise ValueError(f"the adapter's θ does not list the basis tensors in the same order (first difference: "
                         f"{where})")
    state.projection.load_state_tensors({"basis": result.projection.basis})
    state.invalidate()
    with torch.no_grad():
        engine.coeffs[adapter_name].copy_(coefficients.to(engine.coeffs[adapter_name].device))
    peft_model.save_pretrained(tmp_adapter)
    return peft_model
