"""Weight snapshots for TWA: record them during training, keep them in memory or on disk, or read them back
from the ``checkpoint-*`` folders a :class:`transformers.Trainer` leaves.

A snapshot is a dict ``name -> tensor`` of the trainable floating-point parameters (θ). BatchNorm running
statistics are buffers, not parameters, so they are never part of a snapshot: TWA recalibrates them instead
(:func:`hf_subspace.twa.recalibrate_batchnorm`).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from transformers import TrainerCallback

from ..atomic import save_safetensors
from ..checkpoints import CHECKPOINT_RE as _CHECKPOINT_RE
from .basis import name_difference

STORAGE_KINDS = ("memory", "disk")
STORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_FILE_RE = re.compile(r"snapshot-(\d+)\.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------------------------
class SnapshotStore:
    """An ordered list of snapshots with identical names and shapes, stored as ``dtype``.

    Args:
        storage: ``"memory"`` (tensors kept in RAM) or ``"disk"`` (one safetensors file per snapshot).
        directory: folder for ``"disk"`` (created if missing; must hold no snapshot files yet — use
            :meth:`open` to read an existing one). Default: a new temporary folder.
        dtype: storage precision: float32 (default), bfloat16 or float16 halve the size; reads are float32.
        max_snapshots: keep at most this many: adding one more drops the oldest (and deletes its file).

    Reading: ``store[i]`` is a float32 dict (fresh tensors); ``store.get_tensor(i, name)`` reads one tensor
    (float32; for a float32 in-memory store it is the stored tensor itself — do not modify it in place).
    """

    def __init__(self, storage: str = "memory", directory: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, max_snapshots: int | None = None):
        if storage not in STORAGE_KINDS:
            raise ValueError(f"unknown storage {storage!r}; choose one of {list(STORAGE_KINDS)}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"snapshot dtype must be one of {[str(d) for d in STORE_DTYPES]}, got {dtype}")
        if max_snapshots is not None and (isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int)
                                          or max_snapshots < 2):
            raise ValueError(f"max_snapshots must be an integer ≥ 2 or None, got {max_snapshots!r}")
        self.storage = storage
        self.dtype = dtype
        self.max_snapshots = max_snapshots
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.steps: list[int] = []
        self._items: list = []  # dicts (memory) or file paths (disk)
        self._indices: list[int] = []  # each item's number (its file name's)
        self._persisted: dict[int, Path] = {}  # memory storage: items written by persist()
        self._next_index = 0
        self.directory: Path | None = None
        if storage == "disk":
            self.directory = Path(directory) if directory is not None else Path(
                tempfile.mkdtemp(prefix="hf_subspace_snapshots_"))
            self.directory.mkdir(parents=True, exist_ok=True)
            if any(_FILE_RE.fullmatch(p.name) for p in self.directory.iterdir()):
                raise ValueError(
                    f"{self.directory} already holds snapshot files; read them with SnapshotStore.open(directory) "
                    "or choose an empty folder"
                )

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "SnapshotStore":
        """Read a folder written by a ``storage="disk"`` store (snapshots in the order they were added)."""
        directory = Path(directory)
        files = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _FILE_RE.fullmatch(p.name)))
        if not files:
            raise ValueError(f"no snapshot-*.safetensors files in {directory}")
        store = cls.__new__(cls)
        store.storage, store.directory, store.max_snapshots = "disk", directory, None
        store.names, store.shapes, store.steps, store._items = [], {}, [], []
        store._indices, store._persisted = [], {}
        with safe_open(str(files[0][1]), framework="pt") as f:
            store.dtype = f.get_tensor(next(iter(f.keys()))).dtype
        for index, path in files:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in json.loads(meta["names"])}
            store._check_layout(shapes, len(store))
            store.steps.append(int(meta.get("step", -1)))
            store._items.append(path)
            store._indices.append(index)
        store._next_index = files[-1][0] + 1
        return store

    # -- writing ----------------------------------------------------------------------------------------------
    def add(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        """Append a snapshot (copied, cast to the store's dtype). Names and shapes must match the first one."""
        if not state:
            raise ValueError("cannot add an empty snapshot")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"snapshot tensor {name!r} is not floating point ({what})")
        self._check_layout({name: tuple(t.shape) for name, t in state.items()}, len(self))
        copy = {name: _copy_as(t, self.dtype) for name, t in state.items()}
        if self.storage == "memory":
            self._items.append(copy)
        else:
            self._items.append(self._write(copy, self.directory, self._next_index, step))
        self._indices.append(self._next_index)
        self._next_index += 1
        self.steps.append(int(step))
        if self.max_snapshots is not None and len(self) > self.max_snapshots:
            self.remove(0)

    def _write(self, tensors: Mapping[str, torch.Tensor], directory: Path, index: int, step: int) -> Path:
        """Snapshot number ``index`` as ``directory/snapshot-<index>.safetensors`` (atomically, with its step and
        names), the file :meth:`open` and :meth:`restore` read."""
        path = directory / f"snapshot-{index:06d}.safetensors"
        save_safetensors(tensors, path, metadata={"step": str(int(step)), "names": json.dumps(self.names)})
        return path

    def remove(self, i: int) -> None:
        """Drop snapshot ``i`` (and its file)."""
        item = self._items.pop(i)
        self.steps.pop(i)
        self._persisted.pop(self._indices.pop(i), None)
        if self.storage == "disk":
            Path(item).unlink(missing_ok=True)

    def _check_layout(self, shapes: Mapping[str, tuple[int, ...]], index: int) -> None:
        if not self.names:
            self.names, self.shapes = list(shapes), dict(shapes)
            return
        if set(shapes) != set(self.names):
            what = name_difference(shapes, self.names)
            raise ValueError(f"snapshot {index} does not have the same names as the first snapshot: it {what}")
        for name in self.names:
            if tuple(shapes[name]) != self.shapes[name]:
                raise ValueError(f"tensor {name!r} has shape {self.shapes[name]} in the first snapshot but "
                                 f"{tuple(shapes[name])} in snapshot {index}")

    # -- resuming ---------------------------------------------------------------------------------------------
    def persist(self, directory: str | os.PathLike) -> dict:
        """Make every snapshot durable in ``directory`` and return a manifest of them (for a Trainer checkpoint).

        A disk store's files already are (``directory`` must be its own); a memory store writes the snapshots not
        written yet, each atomically, as ``snapshot-<n>.safetensors``. :meth:`restore` rebuilds the store from the
        manifest.
        """
        directory = Path(directory)
        if self.storage == "disk":
            if directory.resolve() != self.directory.resolve():
                raise ValueError(f"a disk store persists in its own folder {self.directory}, not {directory}")
            files = [Path(p).name for p in self._items]
        else:
            directory.mkdir(parents=True, exist_ok=True)
            files = []
            for index, item, step in zip(self._indices, self._items, self.steps):
                if index not in self._persisted:
                    self._persisted[index] = self._write(item, directory, index, step)
                files.append(self._persisted[index].name)
        return {"storage": self.storage, "dtype": str(self.dtype).removeprefix("torch."), "next_index": self._next_index,
                "snapshots": [{"file": f, "step": s} for f, s in zip(files, self.steps)]}

    @classmethod
    def restore(cls, manifest: Mapping, directory: str | os.PathLike, storage: str | None = None,
                max_snapshots: int | None = None) -> "SnapshotStore":
        """The store as :meth:`persist` described it: the snapshots it lists, read from ``directory``.

        ``storage`` (default: the manifest's) may differ from the one that wrote it. A disk store keeps the listed
        files in place and deletes the other ``snapshot-*.safetensors`` files of the folder: they were taken after
        the checkpoint being resumed, and the resumed run takes them again.
        """
        directory = Path(directory)
        storage = storage or manifest.get("storage", "memory")
        dtype = getattr(torch, manifest.get("dtype", "float32"))
        entries = list(manifest.get("snapshots", []))
        missing = [e["file"] for e in entries if not (directory / e["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the checkpoint lists {len(entries)} TWA snapshots in {directory}, but {len(missing)} of them are "
                f"missing (first: {missing[0]}); they cannot be retaken without redoing the run from its start")
        store = cls.__new__(cls)
        cls.__init__(store, storage="memory", dtype=dtype, max_snapshots=max_snapshots)
        store.storage = storage
        if storage == "disk":
            store.directory = directory
            listed = {e["file"] for e in entries}
            for p in directory.iterdir():
                if _FILE_RE.fullmatch(p.name) and p.name not in listed:
                    p.unlink()
        for e in entries:
            path = directory / e["file"]
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = json.loads(meta["names"])
                state = {name: f.get_tensor(name) for name in names}
            store._check_layout({n: tuple(t.shape) for n, t in state.items()}, len(store))
            index = int(_FILE_RE.fullmatch(path.name).group(1))
            if storage == "disk":
                store._items.append(path)
            else:
                store._items.append({n: _copy_as(t, dtype) for n, t in state.items()})
                store._persisted[index] = path
            store._indices.append(index)
            store.steps.append(int(e["step"]))
        store._next_index = max([int(manifest.get("next_index", 0))] + [i + 1 for i in store._indices])
        return store

    # -- reading ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self._items[i]
        if self.storage == "memory":
            return {name: t.to(torch.float32, copy=True) for name, t in item.items()}
        with safe_open(str(item), framework="pt") as f:
            return {name: f.get_tensor(name).to(torch.float32) for name in self.names}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def get_tensor(self, i: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of snapshot ``i`` as float32, without reading the rest of the snapshot."""
        item = self._items[i]
        if self.storage == "memory":
            return item[name].to(torch.float32)
        with safe_open(str(item), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory is not None else ""
        return f"SnapshotStore({len(self)} snapshots, {len(self.names)} tensors, {self.dtype}, {self.storage}{where})"


def _copy_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = t.detach().to("cpu", dtype)
    if out.data_ptr() == t.data_ptr():
        out = out.clone()
    return out.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# recording during training
# ----------------------------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``model``'s floating-point parameters that require grad: θ, keyed by parameter name.

    Buffers — BatchNorm running statistics included — are not parameters and are therefore left out; TWA does
    not average them but recalibrates them on data. A parameter shared by several modules appears once.
    """
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad and p.is_floating_point()
    }


class SnapshotCallback(TrainerCallback):
    """Record :func:`trainable_state` of the model during a :class:`transformers.Trainer` run into ``.store``.

    Args:
        every_n_steps: record after every ``every_n_steps``-th optimizer step. If None, record per epoch.
        per_epoch: with ``every_n_steps=None``, record at the end of every epoch.
        storage, directory, dtype, max_snapshots: see :class:`SnapshotStore`.
        start_step: record nothing before this optimizer step (the first, far-from-converged part of a run
            spends directions of the subspace on a path training has left).
        min_snapshots: when training starts, raise :class:`~hf_subspace.TWASnapshotError` if the run cannot record
            this many (TWATrainer's one-run TWA asks for 2).

    A per-epoch snapshot is taken at the epoch's last optimizer step, before that step's checkpoint is saved.

    In a multi-process run every process records its own copy (all hold the same weights); give each process
    its own ``directory`` when storing on disk.
    """

    hf_subspace_internal = True  # a TWATrainer's own: not carried into its TWA phase

    def __init__(self, every_n_steps: int | None = None, per_epoch: bool = True, storage: str = "memory",
                 directory: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 max_snapshots: int | None = None, start_step: int = 0, min_snapshots: int = 0):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps <= 0):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        if every_n_steps is None and not per_epoch:
            raise ValueError("SnapshotCallback would record nothing: set every_n_steps or per_epoch=True")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        self.every_n_steps = every_n_steps
        self.per_epoch = per_epoch
        self.start_step = start_step
        self.min_snapshots = min_snapshots
        self.store = SnapshotStore(storage=storage, directory=directory, dtype=dtype, max_snapshots=max_snapshots)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        """Fail now, not after the whole run, when it cannot record ``min_snapshots`` snapshots."""
        if not self.min_snapshots or not state.max_steps or state.max_steps <= 0:
            return
        done, last = state.global_step, state.max_steps
        first = max(done + 1, self.start_step, 1)
        if self.every_n_steps is not None:
            n = self.every_n_steps
            coming = max(0, last // n - (first - 1) // n) if first <= last else 0
            how = f"every {n} steps from step {max(self.start_step, 1)} to step {last}"
        else:
            try:  # the Trainer's optimizer steps per epoch; unknown for an iterable dataset: no check
                per_epoch = math.ceil(len(train_dataloader) / max(1, args.gradient_accumulation_steps))
            except TypeError:
                return
            if per_epoch <= 0:
                return
            # epochs end at per_epoch, 2·per_epoch, ... below the last step, and the run ends at the last step
            coming = (max(0, (last - 1) // per_epoch - (first - 1) // per_epoch) if first <= last else 0) + (
                first <= last)
            how = (f"one per epoch (epochs of {per_epoch} steps; the run ends at step {last}) from step "
                   f"{max(self.start_step, 1)}")
        if len(self.store) + coming < self.min_snapshots:
            from ..errors import TWASnapshotError

            raise TWASnapshotError(
                f"this run would record only {len(self.store) + coming} weight snapshot(s) ({how}), and TWA needs at "
                f"least {self.min_snapshots} to span a subspace: lower twa_snapshot_steps or twa_snapshot_start_step, "
                "or train for more steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps is not None:
            if state.global_step % self.every_n_steps == 0:
                self._record(kwargs.get("model"), state.global_step)
        elif self.per_epoch and ((state.epoch and float(state.epoch).is_integer())
                                 or (state.max_steps and state.global_step >= state.max_steps)):
            # the last step of an epoch, or of the run: record now, before the Trainer saves this step's checkpoint
            # (on_epoch_end comes after it, and a run resumed from that checkpoint starts the next epoch)
            self._record(kwargs.get("model"), state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.every_n_steps is None and self.per_epoch and (not self.store.steps
                                                              or self.store.steps[-1] != state.global_step):
            self._record(kwargs.get("model"), state.global_step)  # an epoch cut short (max_steps)

    def _record(self, model, step: int) -> None:
        if step < self.start_step:
            return
        if model is None:
            raise ValueError("SnapshotCallback needs the model, but the Trainer passed none to the callback")
        self.store.add(trainable_state(getattr(model, "module", model)), step)


# ----------------------------------------------------------------------------------------------------------------
# the post-hoc path: Trainer checkpoints
# ----------------------------------------------------------------------------------------------------------------
def load_checkpoint_snapshots(
    run_dir_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    names: Sequence[str] | None = None,
    storage: str = "memory",
    directory: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> SnapshotStore:
    """Read the weights of a Trainer run's ``checkpoint-<step>`` folders into a :class:`SnapshotStore`.

    ``run_dir_or_paths`` is a run's ``output_dir`` (its ``checkpoint-*`` subfolders are used) or a list of
    checkpoint folders. Checkpoints are sorted by step. Each must hold ``model.safetensors``, a sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``.

    Kept: floating-point tensors, only those in ``names`` if given (every one must be present), never BatchNorm
    buffers (``running_mean``, ``running_var``, ``num_batches_tracked``). A checkpoint is a state dict, so
    without ``names`` other floating buffers and frozen weights are kept too; pass
    ``names=list(trainable_state(model))`` to get exactly θ.
    """
    checkpoints = _find_checkpoints(run_dir_or_paths)
    store = SnapshotStore(storage=storage, directory=directory, dtype=dtype)
    for step, folder in checkpoints:
        store.add(_read_checkpoint(folder, names), step)
    return store


def _find_checkpoints(run_dir_or_paths) -> list[tuple[int, Path]]:
    if isinstance(run_dir_or_paths, (str, os.PathLike)):
        run_dir = Path(run_dir_or_paths)
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir} is not a folder")
        folders = [p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.fullmatch(p.name)]
        where = str(run_dir)
        found = sorted(p.name for p in run_dir.iterdir())
    else:
        folders = [Path(p) for p in run_dir_or_paths]
        where = "the given paths"
        found = [str(p) for p in folders]
    steps = [_CHECKPOINT_RE.fullmatch(p.name) for p in folders]
    if all(steps):
        pairs = sorted((int(m.group(1)), p) for m, p in zip(steps, folders))
    else:
        pairs = [(int(m.group(1)) if m else i, p) for i, (m, p) in enumerate(zip(steps, folders))]
    if len(pairs) < 2:
        shown = ", ".join(found[:10]) + (" ..." if len(found) > 10 else "") if found else "nothing"
        raise ValueError(
            f"need at least 2 checkpoints to build a trajectory, found {len(pairs)} checkpoint-* folder(s) in "
            f"{where} (it holds: {shown}); train with save_strategy='steps' or 'epoch' and save_total_limit=None"
        )
    return pairs


def _keep(name: str, t_is_float: bool, names: set | None) -> bool:
    if name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS or not t_is_float:
        return False
    return names is None or name in names


def _read_checkpoint(folder: Path, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The kept tensors of one checkpoint folder (safetensors read lazily: only kept tensors are loaded)."""
    wanted = set(names) if names is not None else None
    if (folder / "model.safetensors").is_file():
        state = _read_safetensors([folder / "model.safetensors"], wanted)
    elif (folder / "model.safetensors.index.json").is_file():
        state = _read_safetensors(_shards(folder / "model.safetensors.index.json"), wanted)
    elif (folder / "pytorch_model.bin").is_file():
        state = _read_bins([folder / "pytorch_model.bin"], wanted)
    elif (folder / "pytorch_model.bin.index.json").is_file():
        state = _read_bins(_shards(folder / "pytorch_model.bin.index.json"), wanted)
    else:
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise ValueError(f"{folder} holds no model weights (model.safetensors, model.safetensors.index.json, "
                         f"pytorch_model.bin); it holds: {', '.join(files) or 'nothing'}")
    if wanted is not None:
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"checkpoint {folder} has no floating-point tensor named {missing[0]!r} "
                             f"({len(missing)} of {len(names)} names missing)")
        state = {n: state[n] for n in names}
    if not state:
        raise ValueError(f"checkpoint {folder} has no floating-point weights to snapshot")
    return state


def _shards(index_file: Path) -> list[Path]:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    return [index_file.parent / f for f in dict.fromkeys(weight_map.values())]


def _read_safetensors(files: list[Path], wanted: set | None) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS or (wanted is not None and name not in wanted):
                    continue
                t = f.get_tensor(name)
                if t.is_floating_point():
                    state[name] = t
    return state


def _read_bins(files: list[Path], wanted: set | None) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        state.update({n: t for n, t in loaded.items()
                      if isinstance(t, torch.Tensor) and _keep(n, t.is_floating_point(), wanted)})
    return state
