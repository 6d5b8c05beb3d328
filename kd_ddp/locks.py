"""File locks for run dirs and shared caches, on local and cluster filesystems.

Both locks are flock(2) locks taken through `filelock`, so the kernel releases them when their
holder dies, even by SIGKILL or OOM kill. `filelock` rather than the ~20 lines of fcntl this
module once held: it tells a busy lock from a filesystem that has no flock, opens the file
without truncating what the holder wrote, copes with a lock file removed between open and
lock, and brings the lock-file fallback below.

Filesystems without a working flock (Lustre mounted `noflock`, NFS without a lock daemon)
make flock fail with ENOSYS, ENOLCK or EOPNOTSUPP. That ends the run with LockUnsupported,
naming the path, unless `KD_DDP_LOCKS=soft`: then the locks are lock files created with
O_EXCL (filelock.SoftFileLock). Those hold on any filesystem, but a holder that dies leaves
its file behind; filelock removes it when the holder was a process of the same host that no
longer runs, and otherwise the message names the file to delete.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout

MODE_VAR = "KD_DDP_LOCKS"  # flock (default) | soft
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


class RunDirBusy(RuntimeError):
    """Another kd-ddp process works in this run dir."""


class LockUnsupported(RuntimeError):
    """The filesystem of a lock file has no working flock: printed as a message, not a traceback."""


def soft_locks() -> bool:
    mode = os.environ.get(MODE_VAR, "flock")
    if mode not in ("flock", "soft"):
        raise LockUnsupported(f"{MODE_VAR}={mode!r}: must be flock or soft")
    return mode == "soft"


def _record_holder(fd: int) -> None:
    """Written into a run-dir lock file once it is held, for the message of whoever finds it busy."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)


def _new_lock(path: Path, timeout: float, record: bool) -> BaseFileLock:
    if soft_locks():
        return SoftFileLock(path, timeout=timeout)
    # No silent soft fallback: a lock file left by a process that died on another node would
    # block every later run; KD_DDP_LOCKS=soft is the user's informed choice.
    return FileLock(path, timeout=timeout, fallback_to_soft=False, on_acquired=_record_holder if record else None)


def _acquire(lock: BaseFileLock, path: Path) -> None:
    try:
        lock.acquire()
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        raise LockUnsupported(
            f"cannot lock {path}: the filesystem does not support flock ({os.strerror(e.errno)}); put run.dir and "
            f"data.cache_dir on a filesystem that does (Lustre: mount with flock), or set {MODE_VAR}=soft "
            "(lock files; one left by a killed process on another node must then be deleted by hand)") from None


def _holder(path: Path) -> str:
    try:
        text = " ".join(path.read_text().split())
    except OSError:
        text = ""
    if text and soft_locks():  # SoftFileLock writes the pid and the host on lines of their own
        pid, _, rest = text.partition(" ")
        host = rest.split(" ")[0] if rest else "?"
        return f"pid {pid} on {host} (lock file {path}: delete it if that process no longer runs)"
    return text or "another process"


def lock_run_dir(run_dir: Path, name: str = "") -> BaseFileLock:
    """Hold an exclusive lock on the run dir (or on one stage of it: `name`) until `.release()`
    or this process ends, so two runs never write the same files. Never waits: a busy lock is a
    RunDirBusy naming its holder."""
    path = run_dir / (f".kd-ddp.{name}.lock" if name else ".kd-ddp.lock")
    lock = _new_lock(path, timeout=0, record=True)
    try:
        _acquire(lock, path)
    except Timeout:
        raise RunDirBusy(f"run dir {run_dir} is in use by {_holder(path)}; wait for it or use another run.dir"
                         ) from None
    return lock


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock that waits for its turn, so concurrent runs sharing a cache build it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _new_lock(path, timeout=-1, record=False)
    _acquire(lock, path)
    try:
        yield
    finally:
        lock.release()
