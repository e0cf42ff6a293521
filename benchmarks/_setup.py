"""What every benchmark script does before importing torch: find the checkout, set quiet offline defaults.

Imported first (``import _setup``) by the scripts in this folder, which Python puts on ``sys.path`` when one of
them is run as ``python benchmarks/<script>.py``.
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
