"""Count what a piece of code asks of the device: aten ops, host-scalar reads (device→host syncs on a GPU) and ops
whose output shape depends on the data (``nonzero``, ``unique``, ...). Used by the tests and benchmarks/bench_engine.py.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op the dispatcher runs below autograd,
the backward's included, on any device (CPU here): a ``_local_scalar_dense`` is what ``.item()``, ``int(t)``,
``bool(t)`` and ``torch.equal`` end in, and on a GPU each one waits for the queue to drain.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops that read a value back to the host (a sync on an accelerator)
HOST_SCALAR_OPS = frozenset({"_local_scalar_dense", "equal", "is_nonzero", "item"})
#: ops whose output shape depends on the values of their input (a sync, and a graph break under torch.compile)
DATA_DEPENDENT_OPS = frozenset({"nonzero", "nonzero_static_unused", "unique", "_unique", "_unique2", "unique_dim",
                                "unique_consecutive", "masked_select", "bincount", "repeat_interleave",
                                "argwhere", "_assert_async"})


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as n: step()`` then ``n.ops`` (aten ops), ``n.host_reads``, ``n.data_dependent``,
    ``n.by_name`` (a Counter of op names)."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    @property
    def host_reads(self) -> int:
        return sum(n for k, n in self.by_name.items() if k in HOST_SCALAR_OPS)

    @property
    def data_dependent(self) -> int:
        return sum(n for k, n in self.by_name.items() if k in DATA_DEPENDENT_OPS)

    def summary(self) -> dict:
        return {"ops": self.ops, "host_reads": self.host_reads, "data_dependent": self.data_dependent}
