from .config import PEFT_TYPE, SubspaceConfig
from .model import SubspaceModel

__all__ = ["PEFT_TYPE", "SubspaceConfig", "SubspaceModel"]
