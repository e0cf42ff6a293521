"""Saving a model wrapped by hf_subspace as the plain model it stands for (θ0 + δ under the usual names)."""
from __future__ import annotations

import re
import types

import torch
from torch import nn

from .engine import SubspaceEngine, is_subspace_parametrized
from .errors import SubspaceConfigError
from .quantized import attached_layer

_PARAMETRIZED_KEY = re.compile(r"^(.*?)\.?parametrizations\.([^.]+)\.original$")


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of a model wrapped by hf_subspace, as the plain model would name it.

    Each ``<module>.parametrizations.<attr>.original`` becomes ``<module>.<attr>`` holding θ0 + δ (the adapted
    value, computed once per tensor so tied weights stay one tensor); the engine's ``subspace.*`` entries go; a
    peft ``modules_to_save`` wrapper contributes its active copy under the wrapped module's own name.
    """
    from peft.utils.other import ModulesToSaveWrapper

    quantized = [name for name, m in model.named_modules() if attached_layer(m) is not None]
    if quantized:
        raise ValueError(
            f"cannot write the adapted weights of {len(quantized)} quantized layer(s) ({quantized[0]!r}, ...) as a "
            "plain checkpoint: θ0 + δ of a 4-bit / 8-bit weight is not a quantized weight. Save the adapter "
            "(`peft_model.save_pretrained(dir)`: c, the seed, the config), or dequantize the base and merge "
            "(`base.dequantize()`, `PeftModel.from_pretrained(base, dir).merge_and_unload().save_pretrained(...)`)")
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


def _get_parameter_or_buffer(self, target: str):
    """transformers' ``get_parameter_or_buffer`` on a wrapped model: a tensor of θ is found under its plain name
    (``transformer.wte.weight``) as the parameter holding θ0 (``...parametrizations.weight.original``), so
    ``tie_weights()`` (which accelerate calls, e.g. FSDP2 with ``cpu_ram_efficient_loading``) works."""
    module_name, _, attr = target.rpartition(".")
    try:
        module = self.get_submodule(module_name) if module_name else self
    except AttributeError:
        module = None
    if module is not None and is_subspace_parametrized(module, attr):
        return module.parametrizations[attr].original
    return type(self).get_parameter_or_buffer(self, target)


def _tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
    """transformers' ``tie_weights`` on a wrapped model (accelerate calls it, e.g. FSDP2 with
    ``cpu_ram_efficient_loading``).

    Tied tensors of θ already share one θ0 (one tensor of θ with several holders): those ties are in place and kept.
    Tying a tensor of θ to anything else would change θ under the adapter (or leave one side reading θ0 without δ),
    which is refused. Ties between tensors outside θ are made as transformers makes them.
    """
    if not hasattr(self, "get_expanded_tied_weights_keys"):
        return type(self).tie_weights(self, missing_keys, recompute_mapping)
    tied = dict(self.all_tied_weights_keys) if not recompute_mapping else \
        self.get_expanded_tied_weights_keys(all_submodels=True)

    def theta0(name):
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.get_submodule(module_name) if module_name else self
        except AttributeError:
            return None, None, attr
        original = module.parametrizations[attr].original if is_subspace_parametrized(module, attr) else None
        return module, original, attr

    plain = []
    for target, source in tied.items():
        parent, target_theta0, attr = theta0(target)
        _, source_theta0, _ = theta0(source)
        if target_theta0 is None and source_theta0 is None:
            plain.append((parent, attr, target, source))
        elif target_theta0 is not source_theta0:
            raise SubspaceConfigError(
                f"tie_weights() would tie {target} to {source}, but "
                f"{target if target_theta0 is not None else source} is a tensor of the subspace adapter's θ and the "
                "other is not the same tensor: tying them now would change θ under the adapter. Tie the weights "
                "before wrapping the model (get_peft_model)")
    if len(plain) == len(tied):
        return type(self).tie_weights(self, missing_keys, recompute_mapping)
    for parent, attr, target, source in plain:  # transformers' own tying, for the pairs outside θ
        if parent is None:
            continue
        source_param = self.get_parameter_or_buffer(source)
        setattr(parent, attr, source_param)
        self._adjust_bias(parent, source_param)
        if missing_keys is not None:
            missing_keys.discard(target)


def _resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, *args, **kwargs):
    """transformers' ``resize_token_embeddings`` on a wrapped model: refused with a clear error when it would change
    the shape of a tensor of θ (the adapter's P maps onto θ as it was when the adapter was created); a call that
    keeps the size (or only returns the embeddings) works as usual."""
    embeddings = self.get_input_embeddings()
    if new_num_tokens is not None or pad_to_multiple_of is not None:
        current = embeddings.num_embeddings if hasattr(embeddings, "num_embeddings") else \
            embeddings.parametrizations.weight.original.shape[0]
        wanted = current if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of is not None:
            wanted = -(-wanted // int(pad_to_multiple_of)) * int(pad_to_multiple_of)
        adapted = [m for m in (embeddings, self.get_output_embeddings()) if m is not None
                   and is_subspace_parametrized(m, "weight")]
        if wanted != current and adapted:
            raise SubspaceConfigError(
                f"resize_token_embeddings({wanted}) would change the embedding matrix from {current} rows to "
                f"{wanted}, but it is a tensor of the subspace adapter's θ: P was generated for θ's size when the "
                "adapter was created. Resize the base model's embeddings first, then wrap it (get_peft_model), or "
                "keep the embeddings out of θ (exclude_modules)")
    return type(self).resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, *args, **kwargs)


_INSTANCE_METHODS = {"save_pretrained": _plain_save_pretrained, "get_parameter_or_buffer": _get_parameter_or_buffer,
                     "tie_weights": _tie_weights, "resize_token_embeddings": _resize_token_embeddings}


def install_plain_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model wrapped by hf_subspace) write plain names, and
    ``get_parameter_or_buffer`` / ``tie_weights`` / ``resize_token_embeddings`` understand its tensors of θ."""
    for name, method in _INSTANCE_METHODS.items():
        if hasattr(type(model), name) and name not in vars(model):
            setattr(model, name, types.MethodType(method, model))


def uninstall_plain_save(model: nn.Module) -> None:
    for name in _INSTANCE_METHODS:
        vars(model).pop(name, None)
