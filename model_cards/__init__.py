"""Model card templates (installed as ``hf_subspace.model_cards``)."""
