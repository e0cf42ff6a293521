"""The exceptions hf_subspace raises for bad input; each message says what was wrong and how to fix it.

Every one derives from :class:`SubspaceError` *and* from the built-in type it has always been (``ValueError``;
``RuntimeError`` for :class:`ProjectionMismatchError`), so code written as ``except ValueError`` still catches them.

================================ =====================================================================================
:class:`SubspaceConfigError`     bad settings: ``dim``, the projection kind or mode, ``target_modules`` matching
                                 nothing, a module both in θ and in ``modules_to_save``, subspace settings without
                                 ``subspace_dim``
:class:`AdapterMismatchError`    an adapter loaded onto a base it was not trained on (names, shapes, weights)
:class:`CorruptAdapterError`     a saved adapter that cannot be read: truncated, corrupt or missing files
:class:`TWASnapshotError`        TWA snapshots that cannot span a subspace of this model (too few, other names or
                                 shapes)
:class:`ProjectionMismatchError` the processes of one run built different projections
:class:`NonFiniteTrainingError`  too many optimizer steps in a row had a NaN/Inf loss or gradient (a RuntimeError)
================================ =====================================================================================
"""
from __future__ import annotations

import os


class SubspaceError(Exception):
    """Base of every error hf_subspace raises for bad input."""


class SubspaceConfigError(SubspaceError, ValueError):
    """Invalid subspace settings (``SubspaceConfig``, ``SubspaceTrainingArguments``, ``reparameterize``)."""


class AdapterMismatchError(SubspaceError, ValueError):
    """An adapter being loaded onto a base model it was not trained on."""


class CorruptAdapterError(SubspaceError, ValueError):
    """A saved adapter whose files are truncated, corrupt or missing."""


class TWASnapshotError(SubspaceError, ValueError):
    """Weight snapshots that cannot form a TWA subspace of the model: fewer than 2, or another model's."""


class ProjectionMismatchError(SubspaceError, RuntimeError):
    """Ranks of one run built different subspaces (another seed, another library version, another θ)."""


class NonFiniteTrainingError(SubspaceError, RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


def _fix(path: str | None) -> str:
    """How to get a readable copy of the adapter file ``path`` back (None: a file downloaded from the Hub)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    if path is None or os.path.abspath(path).startswith(os.path.abspath(HF_HUB_CACHE) + os.sep):
        return ("download it again: `PeftModel.from_pretrained(base, repo_id, force_download=True)` (or delete its "
                "folder from the Hugging Face cache)")
    return "save the adapter again (`save_pretrained`), or copy or download it again from where it came from"


def corrupt_weights_error(model_id, subfolder, error: BaseException) -> CorruptAdapterError | None:
    """The :class:`CorruptAdapterError` for ``error``, raised by peft while it read the weights of the adapter at
    ``model_id`` (a folder or a Hub id), or None if ``error`` is not about the adapter's files."""
    from safetensors import SafetensorError

    folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    local = os.path.join(folder, "adapter_model.safetensors")
    if isinstance(error, SafetensorError):
        if os.path.isfile(local):
            where, fix = local, _fix(local)
        else:
            where, fix = f"adapter_model.safetensors of {folder!r}", _fix(None)
        return CorruptAdapterError(
            f"the adapter's weights file {where} is truncated or corrupt (safetensors: {error}); {fix}")
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, n))
                                         for n in ("adapter_model.safetensors", "adapter_model.bin")):
        # peft then asks the Hub for the local path and fails with an unrelated message (an invalid repo id)
        return CorruptAdapterError(
            f"the adapter folder {folder} holds adapter_config.json but no weights file (adapter_model.safetensors): "
            f"the save was interrupted or the file was not copied with it; {_fix(local)}")
    return None


def corrupt_config_error(path, error: BaseException) -> CorruptAdapterError:
    """The :class:`CorruptAdapterError` for an ``adapter_config.json`` that is not valid JSON."""
    return CorruptAdapterError(f"the adapter's config file {path} is not valid JSON ({type(error).__name__}: "
                               f"{error}): it is truncated or corrupt; {_fix(str(path))}")


__all__ = ["AdapterMismatchError", "CorruptAdapterError", "ProjectionMismatchError", "SubspaceConfigError",
           "SubspaceError", "TWASnapshotError"]
