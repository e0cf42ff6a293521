"""Register the subspace method with the installed peft — the one place that touches peft's mappings.

peft's ``PeftType`` is a closed enum, so ``peft.register_peft_method`` refuses new names. Its mappings are
plain dicts keyed by type name, and a string key works in every lookup peft does for non-prompt methods
(checked with peft 0.21). Registering twice is harmless.
"""
from __future__ import annotations

import functools
import inspect
import os
import re

from peft import mapping as _mapping

from .tuner import PEFT_TYPE, SubspaceConfig, SubspaceModel
from .tuner.config import is_subspace_model


def register() -> None:
    _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SubspaceConfig
    _mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SubspaceModel
    _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = SubspaceModel.prefix
    _patch_peft_model()
    _patch_loading()
    _patch_base_model_state_dict_keys()


def is_registered() -> bool:
    return _mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is SubspaceModel


# the un-patched PeftModel methods, by name (filled in by the first register())
ORIGINALS: dict = {}

# the order in which a subspace adapter's saved files replace the previous ones (files not named here go first)
SAVE_ORDER = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md")


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _remove_other_format_weights(target: str, written: set) -> None:
    """After a save in one format, delete the same adapter's weights file in the other format left from an earlier
    save: peft loads ``adapter_model.safetensors`` before ``adapter_model.bin``, so a stale one would be loaded
    instead of what was just saved."""
    for rel in written:
        folder, name = os.path.split(rel)
        if name in _WEIGHT_FILES:
            other = _WEIGHT_FILES[1 - _WEIGHT_FILES.index(name)]
            stale = os.path.join(target, folder, other)
            if os.path.join(folder, other) not in written and os.path.isfile(stale):
                os.remove(stale)


def _patch_peft_model() -> None:
    """Give subspace adapters our model card on save and on push (other methods are untouched).

    * ``create_or_update_model_card`` writes our card instead of PEFT's.
    * ``save_pretrained`` runs PEFT's unchanged, then rewrites the card of every adapter folder it saved: PEFT
      writes the card before the adapter file, so only now can the card state the file's exact size. The save is
      atomic per file: PEFT writes into a new temporary folder next to ``save_directory``, then each file is
      ``os.replace``d into place, weights (``adapter_model.safetensors``) before ``adapter_config.json`` of every
      adapter, the card last (see :data:`SAVE_ORDER`). A process killed during the save leaves the previous
      files whole and loadable (and a ``.<name>.<hex>.tmp`` folder, safe to delete); killed between the renames
      (microseconds), it leaves the new weights beside the previous config — loadable, and the same model
      whenever the config did not change (a re-save, a Trainer checkpoint). Other processes of a multi-process
      run (``is_main_process=False``) and models without a subspace adapter use PEFT's save as it is.
    * ``push_to_hub`` takes exactly the arguments of the original (bound with its signature, so a wrong or unknown
      one raises ``TypeError`` as it would there) plus the ``api=`` hook of :func:`hf_subspace.hub.push_to_hub`,
      which does the work.
    """
    from peft import PeftModel

    if getattr(PeftModel, "_hf_subspace_patched", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_save = PeftModel.save_pretrained
    original_push = PeftModel.push_to_hub
    ORIGINALS.update(create_or_update_model_card=original_card, save_pretrained=original_save,
                     push_to_hub=original_push)
    save_signature = inspect.signature(original_save)
    push_signature = inspect.signature(original_push)

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        from . import hub

        if is_subspace_model(self):
            return hub.write_adapter_card(self, output_dir)
        return original_card(self, output_dir)

    @functools.wraps(original_save)
    def save_pretrained(self, *args, **kwargs):
        if not is_subspace_model(self):
            return original_save(self, *args, **kwargs)
        from . import hub
        from .atomic import atomic_folder

        bound = save_signature.bind(self, *args, **kwargs)  # a TypeError here is the one the original raises
        bound.apply_defaults()
        if bound.arguments.get("save_embedding_layers") == "auto":
            # "auto" looks the base's config.json up on the Hub to see whether the vocabulary was resized (a LoRA
            # concern: then the embeddings are saved whole). A subspace adapter never saves them — another
            # vocabulary changes θ's layout hash and fails the load — so no lookup: offline it only warned
            bound.arguments["save_embedding_layers"] = False
        target = bound.arguments["save_directory"]
        if not bound.arguments.get("is_main_process", True) or os.path.isfile(target):
            return original_save(self, *args, **kwargs)  # writes no file / raises PEFT's error
        selected = bound.arguments.get("selected_adapters")
        cards = bool(hub._subspace_names(self, selected))  # the cards are rewritten below, in place
        with atomic_folder(target, order=SAVE_ORDER, skip=("README.md",) if cards else ()) as tmp:
            bound.arguments["save_directory"] = tmp
            result = original_save(*bound.args, **bound.kwargs)
            written = {os.path.relpath(os.path.join(root, f), tmp) for root, _, files in os.walk(tmp) for f in files}
        _remove_other_format_weights(target, written)
        if cards:
            hub.write_adapter_cards(self, target, selected_adapters=selected)
        return result

    @functools.wraps(original_push)
    def push_to_hub(self, *args, **kwargs):
        if not is_subspace_model(self):
            return original_push(self, *args, **kwargs)
        from . import hub

        api = kwargs.pop("api", None)
        bound = push_signature.bind(self, *args, **kwargs)  # TypeError for what the original would refuse
        arguments = dict(bound.arguments)  # only what was passed: hub.push_to_hub has the same defaults
        arguments.pop(next(iter(push_signature.parameters)))  # self
        for name, param in push_signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
                raise TypeError(f"push_to_hub() of a subspace adapter takes no extra positional arguments, "
                                f"got {arguments[name]!r}")
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                arguments.pop(name, None)
        return hub.push_to_hub(self, api=api, **arguments)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub
    PeftModel._hf_subspace_patched = True


def _patch_loading() -> None:
    """Name the file when a saved adapter cannot be read (:class:`~hf_subspace.errors.CorruptAdapterError`, a
    ValueError, raised from peft's own error):

    * ``PeftConfigMixin.from_json_file`` (every peft config is read with it): an ``adapter_config.json`` that is
      not JSON raises it, naming the file. The file cannot tell which method wrote it, so this applies to every
      peft method; for them nothing else changes: the error is still an instance of what json raised
      (``json.JSONDecodeError`` / ``UnicodeDecodeError``, with its attributes: ``pos``, ``lineno``, ...), so a
      LoRA user's ``except json.JSONDecodeError`` still catches it.
    * ``PeftModel.load_adapter`` (which ``PeftModel.from_pretrained`` calls): for a subspace adapter, a truncated or
      corrupt ``adapter_model.safetensors`` (safetensors' ``SafetensorError``), and a local folder without a
      weights file (peft then asks the Hub for the path and fails with an unrelated message).
    """
    import json

    from peft import PeftModel
    from peft.config import PeftConfigMixin

    from .errors import SubspaceError, corrupt_config_error, corrupt_weights_error

    if "load_adapter" in ORIGINALS:
        return
    original_json = PeftConfigMixin.from_json_file.__func__
    original_load = PeftModel.load_adapter
    ORIGINALS.update(from_json_file=original_json, load_adapter=original_load)
    load_signature = inspect.signature(original_load)

    @functools.wraps(original_json)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            return original_json(cls, path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _also_as(corrupt_config_error(path_json_file, e), e) from e

    @functools.wraps(original_load)
    def load_adapter(self, *args, **kwargs):
        try:
            bound = load_signature.bind(self, *args, **kwargs)
        except TypeError:
            return original_load(self, *args, **kwargs)  # raises the original's TypeError
        try:
            return original_load(self, *args, **kwargs)
        except SubspaceError:
            raise
        except Exception as e:
            config = self.peft_config.get(bound.arguments.get("adapter_name"))
            if getattr(config, "peft_type", None) != PEFT_TYPE:
                raise
            error = corrupt_weights_error(bound.arguments.get("model_id"),
                                          bound.arguments.get("kwargs", {}).get("subfolder"), e)
            if error is None:
                raise
            raise error from e

    PeftConfigMixin.from_json_file = classmethod(from_json_file)
    PeftModel.load_adapter = load_adapter


_PARAMETRIZED_KEY = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _patch_base_model_state_dict_keys() -> None:
    """``peft.get_base_model_state_dict`` / ``set_base_model_state_dict`` speak the base model's own keys.

    Both translate each state-dict key of the wrapped model with ``peft.utils.save_and_load._peft_key_to_original_key``
    (which strips LoRA's ``base_layer`` infix). A subspace adapter keeps θ0 at ``<module>.parametrizations.<attr>
    .original``: for a model holding a subspace adapter, a key ending so under one of our parametrizations becomes
    ``<module>.<attr>``. Every other model (LoRA, ...) and every other key go through peft's function unchanged.
    """
    from peft.utils import save_and_load

    if "_peft_key_to_original_key" in ORIGINALS:
        return
    original = save_and_load._peft_key_to_original_key
    ORIGINALS["_peft_key_to_original_key"] = original

    @functools.wraps(original)
    def _peft_key_to_original_key(model, peft_key: str) -> str:
        key = original(model, peft_key)
        if not is_subspace_model(model):
            return key
        match = _PARAMETRIZED_KEY.search(peft_key)
        if match is None:
            return key
        from .engine import is_subspace_parametrized

        module_path = peft_key[:match.start()]
        try:
            module = model.base_model.model.get_submodule(module_path)
        except AttributeError:
            return key
        if not is_subspace_parametrized(module, match.group(2)):
            return key
        return _PARAMETRIZED_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}", key)

    save_and_load._peft_key_to_original_key = _peft_key_to_original_key


_DUAL_ERRORS: dict = {}


def _also_as(error: BaseException, original: BaseException) -> BaseException:
    """``error`` (ours) re-made as an instance of both its class and ``type(original)``, carrying ``original``'s
    attributes: whoever catches the original type (or reads its fields) sees no difference."""
    key = (type(error), type(original))
    cls = _DUAL_ERRORS.get(key)
    if cls is None:
        cls = type(type(error).__name__, key, {"__module__": type(error).__module__,
                                               "__str__": lambda self: self._message})
        _DUAL_ERRORS[key] = cls
    dual = cls.__new__(cls, *original.args)
    dual.args = original.args
    for name, value in vars(original).items():
        setattr(dual, name, value)
    for name in ("encoding", "object", "start", "end", "reason"):  # UnicodeDecodeError keeps them in C slots
        if hasattr(original, name):
            try:
                setattr(dual, name, getattr(original, name))
            except (AttributeError, TypeError):
                pass
    dual._message = str(error)
    return dual
