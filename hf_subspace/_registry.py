"""Register the subspace method with the installed peft — the one place that touches peft's mappings.

peft's ``PeftType`` is a closed enum, so ``peft.register_peft_method`` refuses new names. Its mappings are
plain dicts keyed by type name, and a string key works in every lookup peft does for non-prompt methods
(checked with peft 0.21). Registering twice is harmless.
"""
from __future__ import annotations

from peft import mapping as _mapping

from .tuner import PEFT_TYPE, SubspaceConfig, SubspaceModel


def register() -> None:
    _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SubspaceConfig
    _mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SubspaceModel
    _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = SubspaceModel.prefix


def is_registered() -> bool:
    return _mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is SubspaceModel
