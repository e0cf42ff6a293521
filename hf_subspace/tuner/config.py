"""``SubspaceConfig``: the PEFT config of a random-subspace adapter (θ = θ0 + P c)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..errors import SubspaceConfigError
from ..projections import STORED_KINDS
from ..validation import MODES, validate_dim_fits, validate_subspace_args  # noqa: F401  (importable as before)


class SubspacePeftType(str):
    """The ``peft_type`` of a subspace adapter: the string ``"SUBSPACE"`` that also reads like a member of peft's
    ``PeftType`` enum (``.value``, ``.name``).

    peft's ``PeftType`` is a closed enum, so the method is registered under a string key; peft's own code reads
    ``config.peft_type.value`` in its messages (``get_peft_model(..., mixed=True)``, hotswapping, gradient
    checkpointing checks), which a plain ``str`` would turn into an ``AttributeError``. It compares, hashes and
    serializes (JSON, pickle) as the plain string.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __reduce__(self):
        return (SubspacePeftType, (str.__str__(self),))


PEFT_TYPE = SubspacePeftType("SUBSPACE")
def is_subspace_model(model) -> bool:
    """True if ``model`` (a PeftModel or tuner) holds at least one subspace adapter."""
    cfgs = getattr(model, "peft_config", None)
    return isinstance(cfgs, dict) and any(getattr(c, "peft_type", None) == PEFT_TYPE for c in cfgs.values())


@dataclass
class SubspaceConfig(PeftConfig):
    """Configuration of a subspace adapter.

    Args:
        dim: trainable numbers in total (``d``). In SAID mode one of them goes to each tensor of θ as a scale.
        projection: ``"hashing"`` (count-sketch, default: fastest, exactly orthonormal columns),
            ``"fastfood"``, ``"sparse"`` or ``"dense"``; ``"trajectory"`` for a stored basis (a TWA adapter,
            see :func:`hf_subspace.save_twa_adapter`; needs ``save_projection=True``).
        mode: ``"global"`` (DID: θ = θ0 + P c) or ``"said"`` (θ_i = θ0_i + λ_i P_i c).
        target_modules: which modules' own parameters form θ; ``None`` = every trainable parameter.
            As in PEFT: a string is a regex on the full module name, a list matches names or name suffixes, and
            ``"all-linear"`` means every Linear/Conv1D layer but the output layer (expanded to their names when the
            adapter is created).
        exclude_modules: modules to leave out of θ (same matching rules).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classification head).
        seed: the seed ``P`` is regenerated from.
        save_projection: also save the generated ``P`` (bit-exact portability across library versions).
        projection_options: extra options of the projection kind (e.g. ``{"block": "global"}`` for fastfood).
        projection_format: which format of the kind's ``P`` a seed gives (filled in with the latest when the adapter
            is created; an adapter saved without it is format 1, hf_subspace 0.1.0, and is rebuilt as such).
        check_base_fingerprint: refuse to load onto a base whose weights differ from the one trained on (the
            same weights in another dtype or on another device still load).
        training_data, training_data_ids: what the adapter was trained on, for the model card.

    Filled in when the adapter is created (they let a load refuse a wrong base): ``num_weights`` (D),
    ``layout_hash`` (names and shapes of θ), ``base_fingerprint`` (a sketch of a sample of θ0, dtype-tolerant),
    ``base_model_class``, ``hf_subspace_version``, and ``base_quantization`` for a quantized base: one entry per
    quantization scheme (``{"method": "bitsandbytes", "bits": 4, "quant_type": "nf4", ..., "slots": [indices in
    θ]}``). The fingerprint of a quantized tensor is taken on its dequantized values.
    """

    dim: int = field(default=1000, metadata={"help": "total trainable numbers d"})
    projection: str = field(default="hashing", metadata={"help": "hashing | fastfood | sparse | dense"})
    mode: str = field(default="global", metadata={"help": "global | said"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "None = all"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    seed: int = field(default=0)
    save_projection: bool = field(default=False)
    projection_options: dict = field(default_factory=dict)
    projection_format: Optional[int] = field(default=None, metadata={"help": "format of P (filled in)"})
    check_base_fingerprint: bool = field(default=True)
    num_weights: Optional[int] = field(default=None)
    layout_hash: Optional[str] = field(default=None)
    base_fingerprint: Optional[str] = field(default=None)
    base_quantization: Optional[list] = field(default=None, metadata={"help": "how the tensors of θ were quantized "
                                                                              "in the base trained on (filled in)"})
    hf_subspace_version: Optional[str] = field(default=None)
    training_metrics: Optional[dict] = field(default=None, metadata={"help": "shown on the model card"})
    training_data: Optional[str] = field(default=None, metadata={"help": "what the adapter was trained on, in words "
                                                                         "(shown on the model card)"})
    training_data_ids: Optional[list[str]] = field(default=None, metadata={"help": "Hub ids of the training data "
                                                                                   "sets (the card's `datasets:`)"})
    base_model_class: Optional[str] = field(default=None, metadata={"help": "class of the base model the adapter "
                                                                            "was created on (filled in)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        validate_subspace_args(self.dim, self.projection, self.mode)
        if self.projection in STORED_KINDS and not self.save_projection:
            raise SubspaceConfigError(f"a {self.projection!r} projection is data (a basis), not regenerable from "
                                      "a seed: it needs save_projection=True")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.projection_options is None:
            self.projection_options = {}
        if not isinstance(self.projection_options, dict):
            raise SubspaceConfigError(f"projection_options must be a dict of the projection kind's options (e.g. "
                                      f"{{'block': 'global'}} for fastfood), got {self.projection_options!r}")
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool):
            self.seed = int(self.seed)  # e.g. a numpy integer
        else:
            raise SubspaceConfigError(f"seed must be an integer (P is generated from it), got {self.seed!r} "
                                      f"({type(self.seed).__name__})")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise SubspaceConfigError(f"{name} must be None, a string (a regex on module names) or a list of "
                                          f"module names, got {value!r}")
        if isinstance(self.projection_format, numbers.Integral) and not isinstance(self.projection_format, bool):
            self.projection_format = int(self.projection_format)
        if self.projection_format is not None and (isinstance(self.projection_format, bool)
                                                   or not isinstance(self.projection_format, int)
                                                   or self.projection_format < 1):
            raise SubspaceConfigError(f"projection_format must be a positive integer (1: as hf_subspace 0.1.0 "
                                      f"generated P; None: the latest), got {self.projection_format!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a saved config; ``check_base_fingerprint=False`` here is the opt-out of the base check."""
        check = kwargs.pop("check_base_fingerprint", None)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if check is not None:
            config.check_base_fingerprint = bool(check)
        return config
