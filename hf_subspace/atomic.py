"""Atomic file writes: write a temporary file in the target's folder, fsync it, then ``os.replace`` it into place.

A process killed in the middle of a save leaves the previous file as it was (or no file, if there was none),
never a torn one: a reader sees the old bytes or the new ones. Temporary names start with a dot and end with
``.tmp`` (``.adapter_model.safetensors.1a2b3c4d.tmp``), so they match none of the patterns the library and
transformers look for (``snapshot-*.safetensors``, ``*.safetensors``, ``checkpoint-*``, ``README.md``); a kill
can leave one behind, which is safe to delete.

* :func:`atomic_path` — a context manager giving a temporary path to write by name (any writer that takes a
  file name); committed on a clean exit, deleted on an exception.
* :func:`atomic_write` — the same as an open file object (``mode`` ``"w"`` or ``"wb"``).
* :func:`write_text`, :func:`write_json`, :func:`save_safetensors` — one-call helpers.
* :func:`atomic_folder` — a temporary folder next to a target folder; on a clean exit each of its files
  replaces its counterpart in the target (:func:`replace_files_from`), in a given order. Used to save PEFT
  adapters (see :mod:`hf_subspace._registry`) and TWA adapters: every file is whole, old or new; a loader that
  reads several files of the folder can meet new ones beside old ones only if the process dies during the
  renames themselves (microseconds per file), and the order puts weights before the config that names them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from typing import Iterator, Mapping, Sequence

TMP_SUFFIX = ".tmp"


def temp_name(path: str | os.PathLike) -> str:
    """A fresh temporary name in ``path``'s folder: ``.<name>.<8 hex>.tmp`` (not created)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _reserve(path: str) -> str:
    """Create an empty temporary file next to ``path`` (mode 0o666 less the umask, as ``open`` would give)."""
    for _ in range(100):
        tmp = temp_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def fsync_path(path: str) -> None:
    """Flush ``path``'s data to disk (a file; a folder on POSIX, where that records renames in it)."""
    if os.path.isdir(path):
        if os.name != "posix":
            return
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def commit(tmp: str, path: str) -> None:
    """``os.replace(tmp, path)`` after fsyncing ``tmp``; then fsync the folder so the rename survives a crash."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``, on an exception it is removed.

    ``with atomic_path(p) as tmp: writer(tmp)`` — for writers that take a file name (``safetensors``'
    ``save_file``, ``torch.save``, ``matplotlib``'s ``savefig`` with an explicit ``format``).
    """
    path = os.fspath(path)
    tmp = _reserve(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = None):
    """``open(path, mode)`` that writes a temporary file and replaces ``path`` with it when the block ends cleanly.

    ``mode``: ``"w"`` (text; ``encoding`` and ``newline`` as for :func:`open`) or ``"wb"``. On an exception
    ``path`` is left untouched and the temporary file removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else encoding,
                  newline=None if binary else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` atomically; returns ``path`` as a str."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, obj, **dump_kwargs) -> str:
    """``json.dump(obj)`` to ``path`` atomically (``dump_kwargs`` go to :func:`json.dumps`)."""
    return write_text(path, json.dumps(obj, **dump_kwargs))


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
    return os.fspath(path)


def _move(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with atomic_path(dst) as tmp:  # another filesystem: copy next to dst, then replace
            shutil.copyfile(src, tmp)
        os.unlink(src)


def replace_files_from(src_dir: str, dst_dir: str, order: Sequence[str] = (), skip: Sequence[str] = ()) -> list[str]:
    """Move every file under ``src_dir`` to the same relative path under ``dst_dir``, one ``os.replace`` each.

    Each file of ``dst_dir`` is thus either its old version or its new one, never a torn mix. Files whose name is
    in ``order`` go in that order after the others (put the file that makes a folder "complete" last); names in
    ``skip`` are not moved. Subfolders are created as needed. Returns the destination paths, in the order moved.
    """
    rank = {name: i for i, name in enumerate(order)}
    found = []
    for root, _, files in os.walk(src_dir):
        for name in files:
            if name in skip:
                continue
            rel = os.path.relpath(os.path.join(root, name), src_dir)
            found.append((rank.get(name, -1), rel.count(os.sep), rel))
    moved = []
    for _, _, rel in sorted(found):
        src, dst = os.path.join(src_dir, rel), os.path.join(dst_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fsync_path(src)
        _move(src, dst)
        moved.append(dst)
    for folder in {os.path.dirname(p) for p in moved}:
        fsync_path(folder)
    return moved


def temp_folder(path: str | os.PathLike) -> str:
    """Create a fresh folder ``.<name>.<8 hex>.tmp`` next to ``path`` (inside it if its parent is not writable)."""
    path = os.path.abspath(os.fspath(path))
    for _ in range(100):
        tmp = temp_name(path)
        try:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
        except PermissionError:
            os.makedirs(path, exist_ok=True)
            tmp = os.path.join(path, os.path.basename(temp_name(path)))
            os.mkdir(tmp)
            return tmp
    raise FileExistsError(f"could not create a temporary folder next to {path}")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, order: Sequence[str] = (), skip: Sequence[str] = ()) -> Iterator[str]:
    """Yield a new temporary folder; on a clean exit move its files into ``path`` (created if needed) with
    :func:`replace_files_from` (``order``, ``skip`` as there) and remove it; on an exception just remove it.

    Files of ``path`` that the new save does not write are left as they are.
    """
    path = os.fspath(path)
    tmp = temp_folder(path)
    try:
        yield tmp
        os.makedirs(path, exist_ok=True)
        replace_files_from(tmp, path, order=order, skip=skip)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
