"""Deprecated alias of :mod:`hf_subspace.demo.examples`, where this example code moved after 0.2.0 (it is not the
library); kept for one release, it warns once on import."""
import sys
import warnings

from .demo import examples as _moved

warnings.warn("hf_subspace.examples_support moved to hf_subspace.demo.examples; import it from there (this alias goes away in "
              "the next release)", FutureWarning, stacklevel=2)
sys.modules[__name__] = _moved  # the alias is the module itself: same objects, __all__, settings
