"""hf_subspace: train Hugging Face models in a low-dimensional subspace of their weights, θ = θ0 + P c.

Importing it registers the ``SUBSPACE`` method with peft, so ``peft.get_peft_model(model, SubspaceConfig(...))``
and ``PeftModel.from_pretrained(base, path)`` work.
"""
from ._version import __version__  # noqa: E402,F401

import logging as _logging


class _DropBitsandbytesKernelHint(_logging.Filter):
    """bitsandbytes (imported by peft when installed) logs at import, on CPUs with AVX-512 BF16, that an optional
    faster 4-bit kernel (the ``kernels`` package) is not installed; it then uses its own. Nothing is wrong and
    nothing is downloaded, so that one message is dropped; every other bitsandbytes message still shows."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelHint())

from .projections import PROJECTION_KINDS, Projection, make_projection  # noqa: E402
from .engine import SubspaceEngine, find_engine  # noqa: E402
from .layout import ThetaLayout, select_parameters  # noqa: E402
from .reparam import plain_state_dict, reparameterize  # noqa: E402
from .tuner import SubspaceConfig, SubspaceModel  # noqa: E402
from .trainer import SubspaceTrainer, SubspaceTrainingArguments  # noqa: E402
from .twa import TWATrainer, TWATrainingArguments, save_twa_adapter, twa_from_checkpoints  # noqa: E402
from .distributed import ProjectionMismatchError, check_projections_match  # noqa: E402
from .fsdp import install_accelerate_hook as _install_accelerate_hook, shard_model  # noqa: E402
from .errors import (AdapterMismatchError, CorruptAdapterError, NonFiniteTrainingError,  # noqa: E402
                     SubspaceConfigError, SubspaceError, TWASnapshotError)
from . import _registry  # noqa: E402

_registry.register()
_install_accelerate_hook()  # accelerate's FSDP2 preparation hands subspace models to hf_subspace.shard_model


def get_subspace_model(model, config: SubspaceConfig, adapter_name: str = "default", **kwargs):
    """Shortcut for ``peft.get_peft_model(model, config)``."""
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


__all__ = [
    "AdapterMismatchError",
    "CorruptAdapterError",
    "NonFiniteTrainingError",
    "PROJECTION_KINDS",
    "Projection",
    "ProjectionMismatchError",
    "SubspaceConfig",
    "SubspaceConfigError",
    "SubspaceEngine",
    "SubspaceError",
    "SubspaceModel",
    "SubspaceTrainer",
    "SubspaceTrainingArguments",
    "TWASnapshotError",
    "TWATrainer",
    "TWATrainingArguments",
    "save_twa_adapter",
    "twa_from_checkpoints",
    "ThetaLayout",
    "check_projections_match",
    "find_engine",
    "get_subspace_model",
    "make_projection",
    "plain_state_dict",
    "reparameterize",
    "select_parameters",
    "shard_model",
]
