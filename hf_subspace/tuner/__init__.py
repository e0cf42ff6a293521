"""The PEFT tuner of the subspace method: :class:`SubspaceConfig` (``peft_type`` ``SUBSPACE``) and
:class:`SubspaceModel`, laid out as peft's own tuners are (config, layer, model)."""
from .config import PEFT_TYPE, SubspaceConfig
from .model import SubspaceModel

__all__ = ["PEFT_TYPE", "SubspaceConfig", "SubspaceModel"]
