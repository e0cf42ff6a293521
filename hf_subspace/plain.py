"""Saving a model wrapped by hf_subspace as the plain model it stands for (θ0 + δ under the usual names)."""
from __future__ import annotations

import re
import types

import torch
from torch import nn

from .engine import SubspaceEngine, is_subspace_parametrized

_PARAMETRIZED_KEY = re.compile(r"^(.*?)\.?parametrizations\.([^.]+)\.original$")


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of a model wrapped by hf_subspace, as the plain model would name it.

    Each ``<module>.parametrizations.<attr>.original`` becomes ``<module>.<attr>`` holding θ0 + δ (the adapted
    value, computed once per tensor so tied weights stay one tensor); the engine's ``subspace.*`` entries go; a
    peft ``modules_to_save`` wrapper contributes its active copy under the wrapped module's own name.
    """
    from peft.utils.other import ModulesToSaveWrapper

    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    engine_prefixes = [name for name, m in model.named_modules() if isinstance(m, SubspaceEngine)]
    values: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p + ".") for p in engine_prefixes):
            continue
        match = _PARAMETRIZED_KEY.match(key)
        if match:
            module_name, attr = match.groups()
            module = model.get_submodule(module_name)
            if is_subspace_parametrized(module, attr):
                if id(value) not in values:  # tied holders share their original: one adapted tensor for all
                    values[id(value)] = getattr(module, attr).detach()
                out[f"{module_name}.{attr}" if module_name else attr] = values[id(value)]
                continue
        wrapper_name = next((w for w in wrappers if key.startswith(w + ".")), None)
        if wrapper_name is not None:
            wrapper = wrappers[wrapper_name]
            rest = key[len(wrapper_name) + 1:]
            active = wrapper.active_adapters[0] if wrapper.active_adapters and not wrapper.disable_adapters else None
            source = f"modules_to_save.{active}." if active in wrapper.modules_to_save else "original_module."
            if rest.startswith(source):
                out[f"{wrapper_name}.{rest[len(source):]}"] = value.detach()
            continue
        out[key] = value.detach() if isinstance(value, torch.Tensor) else value
    return out


def _plain_save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a model wrapped by hf_subspace: a plain checkpoint with the adapted weights.

    (The adapter alone — a few kilobytes — is what ``PeftModel.save_pretrained`` writes.)
    """
    if kwargs.get("state_dict") is None:
        kwargs["state_dict"] = plain_state_dict(self)
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def install_plain_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model wrapped by hf_subspace) write plain names."""
    if hasattr(type(model), "save_pretrained") and "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(_plain_save_pretrained, model)


def uninstall_plain_save(model: nn.Module) -> None:
    vars(model).pop("save_pretrained", None)
