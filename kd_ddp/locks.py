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

No lock waits forever: a run-dir lock never waits, and a cache lock waits at most
`KD_DDP_LOCK_WAIT_S` seconds, saying every minute who holds it. Its holder (pid, host, since
when) is what the messages name: a flock holder writes it into the lock file; a soft lock file
holds the pid and the host as filelock writes them, and its mtime is when it was taken.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout

from kd_ddp.config import ConfigError

log = logging.getLogger(__name__)

MODE_VAR = "KD_DDP_LOCKS"  # flock (default) | soft
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}
WAIT_VAR = "KD_DDP_LOCK_WAIT_S"
# Long enough for another run to build a data cache this one then reuses; short enough that a
# lock file stranded by a dead process on another host costs half an hour, not the job's limit.
DEFAULT_WAIT_S = 1800.0
REPORT_EVERY_S = 60.0  # how often a waiter logs who it waits for


class RunDirBusy(RuntimeError):
    """Another kd-ddp process works in this run dir."""


class LockUnsupported(RuntimeError):
    """The filesystem of a lock file has no working flock: printed as a message, not a traceback."""


class LockWaitTimeout(RuntimeError):
    """A lock stayed held past KD_DDP_LOCK_WAIT_S: printed as a message naming its holder."""


def soft_locks() -> bool:
    mode = os.environ.get(MODE_VAR, "flock")
    if mode not in ("flock", "soft"):
        raise LockUnsupported(f"{MODE_VAR}={mode!r}: must be flock or soft")
    return mode == "soft"


def wait_bound() -> float:
    """Seconds a cache lock may be waited for (KD_DDP_LOCK_WAIT_S)."""
    text = os.environ.get(WAIT_VAR, "")
    if not text:
        return DEFAULT_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{WAIT_VAR}={text!r}: give the seconds to wait for a held lock (default "
                          f"{DEFAULT_WAIT_S:.0f})")
    return seconds


def _stamp(seconds: float) -> str:
    """A wall-clock time with its UTC offset: holder and reader may be hosts in different zones."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _record_holder(fd: int) -> None:
    """Written into a flock lock file once it is held, for the message of whoever finds it busy."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_stamp(time.time())}".encode(), 0)


def _new_lock(path: Path, timeout: float) -> BaseFileLock:
    if soft_locks():
        return SoftFileLock(path, timeout=timeout)
    # No silent soft fallback: a lock file left by a process that died on another node would
    # block every later run; KD_DDP_LOCKS=soft is the user's informed choice.
    return FileLock(path, timeout=timeout, fallback_to_soft=False, on_acquired=_record_holder)


def _acquire(lock: BaseFileLock, path: Path, timeout: float) -> None:
    try:
        lock.acquire(timeout=timeout)
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        raise LockUnsupported(
            f"cannot lock {path}: the filesystem does not support flock ({os.strerror(e.errno)}); put run.dir and "
            f"data.cache_dir on a filesystem that does (Lustre: mount with flock), or set {MODE_VAR}=soft "
            "(lock files; one left by a killed process on another node must then be deleted by hand)") from None


def _soft_holder(path: Path) -> str:
    """The holder of a soft lock file: filelock writes its pid and host on lines of their own (then
    a start token), once, when it creates the file, so the file's mtime is when it was taken."""
    try:
        lines = path.read_text().split("\n")
        since = _stamp(path.stat().st_mtime)
    except OSError:
        return "another process"
    if len(lines) < 2 or not lines[0].isdigit():
        return f"a process that recorded no pid, since {since}"
    host = lines[1].partition("?pidns-")[0] or "?"  # filelock appends a container's PID namespace
    return f"pid {lines[0]} on {host} since {since}"


def _holder(path: Path) -> str:
    """Who holds the lock at `path`: pid, host and since when, as far as its lock file says."""
    if soft_locks():
        return _soft_holder(path)
    try:
        text = " ".join(path.read_text().split())
    except OSError:
        text = ""
    return text or "another process"


def _how_to_clear(path: Path) -> str:
    if soft_locks():
        # filelock deletes a lock file whose holder is gone only when that holder ran on this host
        return f"delete the lock file {path} if that process no longer runs"
    return "the kernel frees this lock when that process ends: stop it if it should not run"


def lock_run_dir(run_dir: Path, name: str = "") -> BaseFileLock:
    """Hold an exclusive lock on the run dir (or on one stage of it: `name`) until `.release()`
    or this process ends, so two runs never write the same files. Never waits: a busy lock is a
    RunDirBusy naming its holder."""
    path = run_dir / (f".kd-ddp.{name}.lock" if name else ".kd-ddp.lock")
    lock = _new_lock(path, timeout=0)
    try:
        _acquire(lock, path, timeout=0)
    except Timeout:
        raise RunDirBusy(f"run dir {run_dir} is in use by {_holder(path)} ({_how_to_clear(path)}); wait for it "
                         "or use another run.dir") from None
    return lock


def _wait_for(lock: BaseFileLock, path: Path, bound: float) -> None:
    """Take `lock`, waiting at most `bound` seconds, in slices that each end with a log line
    naming the holder, so that a long wait shows in the log what it waits for."""
    start = time.monotonic()
    timeout = 0.0  # the first try does not wait: a busy lock is logged at once
    while True:
        try:
            _acquire(lock, path, timeout)
            return
        except Timeout:
            waited = time.monotonic() - start
        if waited >= bound:
            raise LockWaitTimeout(
                f"gave up after {waited:.0f} s waiting for the lock {path}, held by {_holder(path)}: "
                f"{_how_to_clear(path)}; if it is still working (another run building this cache, say), wait for "
                f"it or set {WAIT_VAR} to wait longer (now {bound:.0f} s)") from None
        log.warning("waiting for %s, held by %s (%.0f s so far; %s=%.0f s at most)", path, _holder(path),
                    waited, WAIT_VAR, bound)
        timeout = min(REPORT_EVERY_S, bound - waited)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock that waits for its turn, so concurrent runs sharing a cache build it
    once; a turn that does not come within KD_DDP_LOCK_WAIT_S is a LockWaitTimeout."""
    bound = wait_bound()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _new_lock(path, timeout=0)
    _wait_for(lock, path, bound)
    try:
        yield
    finally:
        lock.release()
