"""Atomic file writes and checkpoints: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class NoSpaceError(RuntimeError):
    """The disk filled up while writing an output: printed as a message, never as a traceback."""


NO_SPACE_HINT = "free some space or point run.dir / data.cache_dir at a larger filesystem"


def no_space(path: Path, needed: int | None = None) -> NoSpaceError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    need = f"{needed / 1e6:.1f} MB needed, " if needed is not None else ""
    return NoSpaceError(f"no space left on device to write {path} ({need}{free / 1e6:.1f} MB free); {NO_SPACE_HINT}")


def _short_write_on_full_disk(e: OSError, path: Path, size: int | None) -> bool:
    # numpy's tofile reports a full disk as "N requested and M written" with no errno; the
    # free-space check at entry misses it when something else fills the disk meanwhile.
    # Checked before the temp file is removed, so the space it took still counts as used.
    return e.errno is None and size is not None and shutil.disk_usage(path.parent).free < size


@contextlib.contextmanager
def atomic_output(path: Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; then fsync it and rename it into place, so a
    reader sees the old file or the new one, never half. On any failure the temp file is
    removed, and a full disk becomes a NoSpaceError naming `path` (`size`: bytes it needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and shutil.disk_usage(path.parent).free < size:
        raise no_space(path, size)  # before writing a byte: the common case, and the cheapest
    # Unique across hosts, not just processes: ranks on two nodes can share a PID (PID namespaces,
    # containers) and a run dir on shared storage.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(6)}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        full = isinstance(e, OSError) and (e.errno == errno.ENOSPC or _short_write_on_full_disk(e, path, size))
        tmp.unlink(missing_ok=True)
        if full:
            raise no_space(path, size) from None
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with atomic_output(path, len(payload)) as tmp:
        tmp.write_bytes(payload)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_weights_file(path: Path, what: str = "checkpoint") -> Any:
    """A file of tensors and plain data (dicts, lists, numbers, strings), read with
    `torch.load(weights_only=True)`: a file whose pickle asks for anything else (an object of
    some class, a function to call) is refused naming what it asked for, and none of it runs.
    A file that is not a torch file at all raises what torch.load raises."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = re.search(r"GLOBAL ([\w.]+)", str(e))
        if needed is None:
            raise
        raise CheckpointError(
            f"{what} {path} needs more than tensors and plain data to load: its pickle asks for "
            f"{needed.group(1)}. kd-ddp reads checkpoints with torch.load(weights_only=True) and runs no "
            "code a file carries; save the weights alone, torch.save(model.state_dict(), path)") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint kd-ddp wrote (see `load_weights_file`: tensors and plain data only)."""
    try:
        return load_weights_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch raises several types for a truncated zip
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: printed as a message, never as a traceback."""


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a model's tensors (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reserve_space(path: Path) -> None:
    """Allocate every block of an existing (sparse) file now. Writing through a memory map
    into a sparse file on a full disk kills the process with SIGBUS mid-way; reserving the
    blocks up front turns that into an ENOSPC here, before any work is done."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        path.unlink(missing_ok=True)
        raise no_space(path, size) from None
    finally:
        os.close(fd)
