"""Counting what collectives send (benchmark and test instrumentation, not the library): :class:`CommCounter`.

Moved here from ``hf_subspace.distributed`` (0.2.0). The scripts in this folder import it as ``from _comm import
CommCounter`` (Python puts this folder on ``sys.path``); the tests as ``from benchmarks._comm import CommCounter``
(the checkout's root on ``sys.path``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import TrainerCallback


_WRAPPED_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                        "reduce_scatter_tensor", "reduce_scatter_single", "gather", "broadcast", "_broadcast_coalesced")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    """Bytes sent by collectives, by kind: DDP's gradient buckets (a communication hook) and the collectives called
    outside DDP while :meth:`counting` is entered (``torch.distributed.all_reduce`` & co., and DDP's own buffer
    broadcasts, which go through ``torch.distributed._broadcast_coalesced``).

    A count is the payload of the collective (the bucket's or the input tensor's bytes), not what a ring
    algorithm puts on the wire (``2 (N-1)/N`` times the payload for an all-reduce).

    ``syncs`` holds the bytes of each DDP gradient synchronization (one per optimizer step, also with gradient
    accumulation: DDP skips the accumulation steps); ``outside`` the other collectives, ``{kind: [bytes, ...]}``.
    """

    def __init__(self):
        self.syncs: list[int] = []
        self._current = 0
        self.buckets: list[int] = []
        self.outside: dict[str, list[int]] = {}
        self._in_hook = False

    # -- DDP buckets --------------------------------------------------------------------------------------------
    def hook(self, state, bucket):
        """A DDP communication hook: counts the bucket, then all-reduces it as DDP's default does."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        size = buf.numel() * buf.element_size()
        self.buckets.append(size)
        self._current += size
        if bucket.is_last():
            self.syncs.append(self._current)
            self._current = 0
        self._in_hook = True  # the all_reduce below is this bucket's: not counted again among the outside ones
        try:
            return allreduce_hook(state, bucket)
        finally:
            self._in_hook = False

    def attach(self, ddp_model: nn.Module) -> "CommCounter":
        """Register :meth:`hook` on a ``DistributedDataParallel`` model (before its first backward; once: DDP takes
        one hook)."""
        if getattr(ddp_model, "_hf_subspace_comm_counter", None) is not self:
            ddp_model.register_comm_hook(state=None, hook=self.hook)
            ddp_model._hf_subspace_comm_counter = self
        return self

    # -- collectives outside DDP --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, ddp: bool = True):
        """Count the collectives of :data:`_WRAPPED_COLLECTIVES` called while inside (they still run), and with
        ``ddp`` attach :meth:`hook` to every ``DistributedDataParallel`` built inside (a Trainer's, the TWA phase's
        inner Trainer's)."""
        import torch.distributed as dist

        DDP = torch.nn.parallel.DistributedDataParallel
        ddp_init = DDP.__init__
        if ddp:
            counter = self

            def init(module, *args, **kwargs):
                ddp_init(module, *args, **kwargs)
                counter.attach(module)

            DDP.__init__ = init
        saved = {}
        for name in _WRAPPED_COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                if self._in_hook:
                    return _fn(*args, **kwargs)
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, (torch.Tensor, list, tuple))]
                if _name == "_broadcast_coalesced":  # (group, tensors, bucket size, source)
                    size = _nbytes(args[1])
                elif _name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                               "reduce_scatter_single"):  # (output, input): the whole buffer, not one rank's part
                    # (FSDP2 passes them by keyword: output=..., input=...)
                    size = max((_nbytes(t) for t in tensors[:2]), default=0)
                else:
                    size = _nbytes(args[0] if args else next(iter(kwargs.values()), None))
                self.outside.setdefault(_name, []).append(size)
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        try:
            yield self
        finally:
            DDP.__init__ = ddp_init
            for name, fn in saved.items():
                setattr(dist, name, fn)

    # -- summaries ----------------------------------------------------------------------------------------------
    def bytes_per_sync(self) -> int | None:
        """The bytes of one gradient synchronization (all equal in a steady run; the last one)."""
        return self.syncs[-1] if self.syncs else None

    def summary(self) -> dict:
        return {"ddp_syncs": len(self.syncs), "ddp_bytes_per_sync": self.bytes_per_sync(),
                "ddp_bucket_bytes": self.buckets[: max(1, len(self.buckets) // max(1, len(self.syncs)))],
                "outside": {k: {"calls": len(v), "bytes": sum(v), "first_calls": v[:3]} for k, v in self.outside.items()}}


class CommCountCallback(TrainerCallback):
    """Attaches a :class:`CommCounter` to the Trainer's DDP model when training starts (``trainer.model_wrapped``
    is DDP by then, before the first backward)::

        counter = CommCounter(); trainer.add_callback(CommCountCallback(trainer, counter)); trainer.train()
    """

    def __init__(self, trainer, counter: CommCounter):
        self.trainer, self.counter = trainer, counter

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            self.counter.attach(wrapped)
