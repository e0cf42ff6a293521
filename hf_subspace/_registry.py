"""Register the subspace method with the installed peft — the one place that touches peft's mappings.

peft's ``PeftType`` is a closed enum, so ``peft.register_peft_method`` refuses new names. Its mappings are
plain dicts keyed by type name, and a string key works in every lookup peft does for non-prompt methods
(checked with peft 0.21). Registering twice is harmless.
"""
from __future__ import annotations

from peft import mapping as _mapping

from .tuner import PEFT_TYPE, SubspaceConfig, SubspaceModel
from .tuner.config import is_subspace_model


def register() -> None:
    _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SubspaceConfig
    _mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SubspaceModel
    _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = SubspaceModel.prefix
    _patch_peft_model()


def is_registered() -> bool:
    return _mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is SubspaceModel


def _patch_peft_model() -> None:
    """Give subspace adapters our model card on save and on push (other methods are untouched)."""
    from peft import PeftModel

    if getattr(PeftModel, "_hf_subspace_patched", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    def create_or_update_model_card(self, output_dir: str):
        from . import hub

        if is_subspace_model(self):
            return hub.write_adapter_card(self, output_dir)
        return original_card(self, output_dir)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        from . import hub

        if is_subspace_model(self):
            allowed = {"token", "private", "commit_message", "revision", "create_pr", "api"}
            return hub.push_to_hub(self, repo_id, **{k: v for k, v in kwargs.items() if k in allowed})
        return original_push(self, repo_id, *args, **kwargs)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push_to_hub
    PeftModel._hf_subspace_patched = True
