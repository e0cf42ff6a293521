"""Example and data code, outside the library: what the examples, benchmarks, tests and the CLI's demo tasks share.

* :mod:`hf_subspace.demo.data` — offline models and data sets (PyPI / Debian packages, no Hub);
* :mod:`hf_subspace.demo.examples` — the example scripts' arguments, run and saved result;
* :mod:`hf_subspace.demo.vision` — EfficientNet-Lite0 offline and an RT-DETR detector on it.

Nothing in the core package imports from here (tests/test_imports.py checks it); only the CLI's demo tasks do.
This ``__init__`` imports none of its submodules, so loading one does not load the others.
"""
