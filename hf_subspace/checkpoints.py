"""What a ``checkpoint-<step>`` folder is, for every trainer of the library: the lowest floor of the training stack.

It owns the checkpoint folder names (:data:`CHECKPOINT_RE`), which folders count as complete
(:func:`last_complete_checkpoint`: ``trainer_state.json`` is written last, so a save a kill cut short is passed
over), the mark a TWA-phase checkpoint carries (:data:`TWA_PHASE_MARK_FILE`) and a small JSON reader. It imports
nothing of ``hf_subspace``, so :mod:`hf_subspace.nonfinite`, :mod:`hf_subspace.trainer` and
:mod:`hf_subspace.twa` can all use it without importing each other.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

logger = logging.getLogger(__name__)

#: a Trainer checkpoint folder's name; group 1 is its global step
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
#: in each TWA-phase checkpoint: the id of the phase it belongs to
TWA_PHASE_MARK_FILE = "twa_phase.json"


def _read_json(path) -> Optional[dict]:
    """The JSON object in ``path``, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_complete_checkpoint(folder, phase_id: Optional[str] = None) -> Optional[str]:
    """The newest ``checkpoint-<step>`` folder of ``folder`` that holds ``trainer_state.json`` (written last, so a
    checkpoint cut short by a kill is passed over), and for the TWA phase, of phase ``phase_id``."""
    if not os.path.isdir(folder):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                    if (m := CHECKPOINT_RE.fullmatch(name))), reverse=True)
    for _, name in found:
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            logger.warning("passing over %s: it has no trainer_state.json (its save was cut short)", path)
            continue
        if phase_id is not None and (_read_json(os.path.join(path, TWA_PHASE_MARK_FILE)) or {}).get("id") != phase_id:
            continue
        return path
    return None


__all__ = ["CHECKPOINT_RE", "TWA_PHASE_MARK_FILE", "last_complete_checkpoint"]
