"""The version of hf_subspace: its one home (the package, adapter configs and fingerprints read it here)."""
__version__ = "0.3.0"
