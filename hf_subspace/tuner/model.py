"""``SubspaceModel``: the PEFT tuner behind :class:`SubspaceConfig`.

Unlike LoRA-style tuners it does not replace modules: it reparameterizes tensors in place (see
:mod:`hf_subspace.reparam`), so every parameter kind works — Linear, Conv, Embedding (tied or not),
LayerNorm, biases, bare ``nn.Parameter``s. The trainable state lives in ``base_model.subspace``:
``vectors.<adapter>.coeffs`` (c) and ``vectors.<adapter>.scales`` (SAID), which is all an adapter file holds (plus
``modules_to_save`` and, on request, the generated projection). The file names them ``base_model.subspace.coeffs``
and ``base_model.subspace.scales`` (without the adapter name, as PEFT does), as every version has.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, _check_adapters_not_merged, _delete_auxiliary_adapter
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, set_additional_trainable_modules
from peft.utils import other as peft_other

from .._version import __version__
from ..auto_classes import auto_class_for
from ..engine import SubspaceEngine, find_engine, vector_key
from ..errors import AdapterMismatchError, CorruptAdapterError
from ..fingerprint import check_quantized_base, fingerprint_tensors, fingerprints_match, quantization_record
from ..layer import SubspaceLayer
from ..layout import check_targets, expand_all_linear, original_tensor, refuse_offloaded_theta0, select_parameters
from ..plain import install_plain_save, uninstall_plain_save
from ..projections import PROJECTION_KINDS, STORED_KINDS, latest_format
from ..validation import validate_dim_fits
from .config import SubspaceConfig

ENGINE_PREFIX = "base_model.subspace."


class SubspaceModel(BaseTuner):
    """Creates a subspace adapter (θ = θ0 + P c) around a model. Use via ``peft.get_peft_model``."""

    prefix: str = "subspace"
    tuner_layer_cls = SubspaceLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    # -- injection --------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model, config, adapter_name):
        if "subspace" not in self._modules:
            self.subspace = SubspaceEngine()

    def _create_and_replace(self, *args, **kwargs):  # required by BaseTuner; we never replace modules
        raise NotImplementedError("SubspaceModel reparameterizes tensors in place and replaces no modules")

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        """Choose θ for ``adapter_name``, check or record the base, and parametrize its tensors.

        c is d numbers, so ``low_cpu_mem_usage`` changes nothing here: it is created on the base's device.
        """
        config: SubspaceConfig = self.peft_config[adapter_name]
        self._pre_injection_hook(model, config, adapter_name)
        engine: SubspaceEngine = self.subspace
        engine.record_base(model)  # what was trainable before the first adapter froze it: θ of every adapter
        targets = config.target_modules
        if config.layout_hash is None:  # created here (a loaded adapter keeps the θ it was saved with)
            check_targets(model, targets, config.exclude_modules, config.modules_to_save, config.task_type)
        config.target_modules = expand_all_linear(model, config.target_modules, config.task_type)
        layout = select_parameters(model, config.target_modules, config.exclude_modules, config.modules_to_save,
                                   trainable=engine.was_trainable)
        refuse_offloaded_theta0(model, layout)
        self._check_or_record_base(model, config, layout)
        validate_dim_fits(config.dim, config.mode, layout, targets)
        options = dict(config.projection_options)
        if config.projection in PROJECTION_KINDS:
            options["format"] = config.projection_format
        state = engine.add_adapter(model, adapter_name, layout, config.dim, config.projection, config.mode,
                                   config.seed, projection_options=options)
        for slot in state.layout.slots:
            for module_name, _ in slot.holders:
                if module_name not in self.targeted_module_names:
                    self.targeted_module_names.append(module_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_additional_trainable_modules(
            model=model, peft_config=config, model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name, activate_adapter=adapter_name in self.active_adapters,
        )
        install_plain_save(model)

    def _check_or_record_base(self, model, config: SubspaceConfig, layout) -> None:
        """Record what θ is on creation; on load, refuse a base it does not fit."""
        layout_hash = layout.layout_hash()
        engine = self.subspace  # θ0 as loaded: without what other adapters merged into it
        tensors = [engine.unmerged_original(s.name, original_tensor(model, s)) for s in layout.slots]
        if config.layout_hash is None:
            if config.projection in PROJECTION_KINDS and config.projection_format is None:
                config.projection_format = latest_format(config.projection)
            config.num_weights = layout.D
            config.layout_hash = layout_hash
            config.base_fingerprint = fingerprint_tensors(tensors)
            config.base_quantization = quantization_record(layout, tensors)
            config.base_model_class = type(model).__name__
            config.hf_subspace_version = __version__
            return
        if config.projection in PROJECTION_KINDS and config.projection_format is None:
            config.projection_format = 1  # saved by hf_subspace 0.1.0, before formats were recorded
        if config.num_weights != layout.D or config.layout_hash != layout_hash:
            trained_on = config.base_model_class
            hint = " Load it onto the base model it was trained on" + (
                f" ({config.base_model_name_or_path!r})." if config.base_model_name_or_path else ".")
            if trained_on and trained_on != type(model).__name__:
                hint = (f" The adapter was trained on a {trained_on}, and this base is a {type(model).__name__}: "
                        f"load the base with the class it was trained with (e.g. "
                        f"{auto_class_for(trained_on)}.from_pretrained(...)).")
            raise AdapterMismatchError(
                f"this subspace adapter was trained on a base whose θ has D={config.num_weights} weights "
                f"(layout {config.layout_hash}); the model it is being loaded onto gives D={layout.D} "
                f"(layout {layout_hash}) — its parameter names or shapes differ.{hint} First tensors here: "
                + ", ".join(f"{s.name}{list(s.shape)}" for s in layout.slots[:3])
            )
        trained_on = config.base_model_class
        if trained_on and trained_on != type(model).__name__:
            warnings.warn(
                f"this subspace adapter was trained on a {trained_on} and is being loaded onto a "
                f"{type(model).__name__}: θ's parameter names and shapes match, so it loads, but whatever lies "
                f"outside θ (a task head) is not what it was trained with. Load the base with "
                f"{auto_class_for(trained_on)}.from_pretrained(...) to get the model that was trained.",
                stacklevel=2)
        if config.check_base_fingerprint and config.base_fingerprint is not None:
            if check_quantized_base(config, layout, tensors):
                return
            if not fingerprints_match(config.base_fingerprint, tensors):
                expected = (f" ({config.base_model_name_or_path!r} expected)" if config.base_model_name_or_path
                            else "")
                raise AdapterMismatchError(
                    f"the base model's weights differ from those this adapter was trained on (base fingerprint "
                    f"mismatch): it looks like another checkpoint of the same architecture{expected}. Loading it "
                    "would give a silently wrong model. If you are sure, opt out with "
                    "`PeftModel.from_pretrained(base, path, check_base_fingerprint=False)`."
                )

    # -- trainability and adapter switching -------------------------------------------------------------------
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(False)
        for adapter, p in self.subspace.named_vectors():
            cfg = self.peft_config.get(adapter)
            p.requires_grad_(adapter in self.active_adapters and not (cfg is not None and cfg.inference_mode))

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.subspace.adapters]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; have {sorted(self.subspace.adapters)}")
        if self.subspace.merged_slots:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            self.unmerge_adapter()
        peft_other._set_adapter(self.model, names, inference_mode=inference_mode)  # may refuse: change nothing before
        self.subspace.set_active(names)
        for adapter, p in self.subspace.named_vectors():
            p.requires_grad_(adapter in names and not inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters: their c and λ, and their ``modules_to_save`` copies."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter, p in self.subspace.named_vectors():
            if adapter in names:
                p.requires_grad_(requires_grad)
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.set_requires_grad(adapter_names=names, requires_grad=requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass  # c and λ are created in float32 and stay so

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft calls this around every forward and ``generate``: a mixed-adapter batch (``adapter_names=[...]``, one
        adapter per sample, which LoRA supports) is refused — every tensor of θ holds one θ0 + δ for the whole batch,
        and ignoring the argument would silently run every sample through the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"{type(self).__name__} does not support mixed adapter batches (adapter_names="
                f"{_short(kwargs['adapter_names'])}): a subspace adapter adds one δ to each weight for the whole "
                "batch. Run one forward per adapter instead (set_adapter, or disable_adapter() for '__base__')")
        yield

    # -- merging ----------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) into θ0; merging twice adds nothing."""
        self._check_merge_allowed()
        names = list(adapter_names or self.active_adapters)
        if self.subspace.merged_slots:  # peft's warnings (check_adapters_to_merge), once for the model
            merged = sorted({a for a, _ in self.subspace.merged_slots})  # (in some tensors, by per-layer merges)
            todo = [n for n in names if n not in self.subspace.merged_adapters]
            if todo:
                warnings.warn(f"Already following adapters were merged {','.join(merged)}. "
                              f"You are now additionally merging {','.join(todo)}.")
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        self.subspace.merge(names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        if not self.subspace.merged_slots:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.subspace.unmerge()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """The plain model back: deltas merged (or not), parametrizations and ``modules_to_save`` wrappers removed,
        and every parameter's ``requires_grad`` as it was before the first adapter."""
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        elif self.subspace.merged_slots:
            self.unmerge_adapter()
        self.subspace.remove_parametrizations(self.model)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                active = module.active_adapters[0] if module.active_adapters else None
                replacement = module.modules_to_save[active] if (merge and active in module.modules_to_save) \
                    else module.original_module
                setattr(parent, child, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self.subspace.restore_requires_grad(self.model)
        uninstall_plain_save(self.model)
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter, as peft does: a merged one is refused (peft's message); deleting an active one makes
        the remaining active ones (or, if none, the first remaining name) active and trainable; deleting an inactive
        one changes nothing else — in particular what is merged stays merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        _check_adapters_not_merged(self.model, adapter_name)
        was_active = adapter_name in self.subspace.active
        only_active = self.subspace.active == [adapter_name]
        self.subspace.delete_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        new_active = list(self.subspace.active)
        if only_active and new_active:
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{new_active[0]}.")
        _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=new_active)
        if was_active:
            for adapter, p in self.subspace.named_vectors():
                cfg = self.peft_config.get(adapter)
                p.requires_grad_(adapter in new_active and not (cfg is not None and cfg.inference_mode))
        self.active_adapter = (new_active[0] if len(new_active) == 1 else new_active) if new_active else []

    def _check_merge_allowed(self):
        """Tied weights are merged once (they are one tensor of θ); under FSDP or DeepSpeed ZeRO-3 θ0 is sharded
        and merging is refused, as PEFT does."""
        from ..distributed import refuse_sharded_merge

        refuse_sharded_merge(self.model)

    # -- state dict -------------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = {}
        for field in ("coeffs", "scales"):  # written as '<field>.<adapter>': PEFT saves it as 'base_model.subspace.<field>'
            key = f"{ENGINE_PREFIX}{vector_key(field, adapter_name)}"
            for k, saved in ((key, f"{ENGINE_PREFIX}{field}.{adapter_name}"),
                             (key.removeprefix("base_model."), f"subspace.{field}.{adapter_name}")):
                if k in state_dict:
                    out[saved] = state_dict[k]
        engine = _find_engine(model)
        if config.base_fingerprint is None and config.layout_hash is not None:
            # created on the meta device: fingerprint θ0 now that it holds the weights trained on
            tensors = [engine.unmerged_original(s.name, engine.original(s.name))
                       for s in engine.adapters[adapter_name].layout.slots]
            config.base_fingerprint = fingerprint_tensors(tensors)
        if getattr(config, "save_projection", False):
            proj = engine.adapters[adapter_name].projection
            for name, t in proj.state_tensors().items():
                out[f"{ENGINE_PREFIX}projection_{name}.{adapter_name}"] = t.detach().cpu().contiguous()
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        engine = _find_engine(model)
        out = {}
        saved_projection = {}
        for k, v in state_dict.items():
            stem = k.removeprefix("base_model.").removeprefix("subspace.")
            if stem in ("coeffs", "scales"):
                out[f"{ENGINE_PREFIX}{vector_key(stem, adapter_name)}"] = v
            elif stem.startswith("projection_"):
                saved_projection[stem.removeprefix("projection_")] = v
            else:
                out[k] = v
        if saved_projection:
            engine.adapters[adapter_name].projection.load_state_tensors(saved_projection)
            engine.adapters[adapter_name].invalidate()
        elif config.projection in STORED_KINDS:
            raise CorruptAdapterError(f"this {config.projection!r} adapter's file holds no projection tensors; its "
                                      "basis cannot be regenerated from a seed, so the adapter cannot be loaded")
        expected = f"{ENGINE_PREFIX}{vector_key('coeffs', adapter_name)}"
        if expected not in out:
            raise CorruptAdapterError("the adapter file holds no subspace coefficients (expected key "
                                      "'subspace.coeffs'): it is not this adapter's weights file")
        c = engine.coeffs[adapter_name]
        if out[expected].shape != c.shape:
            raise CorruptAdapterError(
                f"the saved coefficient vector has shape {tuple(out[expected].shape)}, but this config gives "
                f"{tuple(c.shape)}: the adapter file and adapter_config.json do not belong together"
            )
        engine.adapters[adapter_name].invalidate()
        return out


def _short(value, n: int = 4) -> str:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return repr(items[:n])[:-1] + (", ...]" if len(items) > n else "]")


def _find_engine(model) -> SubspaceEngine:
    engine = find_engine(model)
    if engine is None:
        raise ValueError("no subspace adapter found in this model")
    return engine
