"""Which transformers ``AutoModel...`` class builds a model class: what a model card's snippet and a refused load
name (``AutoModelForSequenceClassification.from_pretrained(...)``)."""
from __future__ import annotations


# (auto class, transformers mapping of model type -> class name); the first that lists a class name wins
_AUTO_MAPPINGS = (
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForObjectDetection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("AutoModelForSemanticSegmentation", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)
# used when a class name is in none of transformers' mappings (a custom subclass, an older/newer version)
_AUTO_SUFFIXES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForObjectDetection", "AutoModelForObjectDetection"),
)


def auto_for_class_name(name: str | None) -> str | None:
    """The transformers auto class that builds the class called ``name``; None if no mapping or suffix knows it."""
    if not name:
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover
        modeling_auto = None
    for auto, mapping in _AUTO_MAPPINGS:
        for value in getattr(modeling_auto, mapping, {}).values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return auto
    for suffix, auto in _AUTO_SUFFIXES:
        if name.endswith(suffix):
            return auto
    return None


def auto_class_for(class_name: str | None) -> str:
    """The transformers auto class that builds the class called ``class_name`` (``"AutoModel"`` if none is known)."""
    return auto_for_class_name(class_name) or "AutoModel"
