"""kd_ddp.locks between real processes: busy run dirs, waiting cache locks, SIGKILL, lock files."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kd_ddp.locks import LockUnsupported, RunDirBusy, file_lock, lock_run_dir

HOLD = """
import sys, time
from pathlib import Path
from kd_ddp.locks import file_lock, lock_run_dir
if sys.argv[1] == "run-dir":
    lock = lock_run_dir(Path(sys.argv[2]))
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
else:
    with file_lock(Path(sys.argv[2])):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
"""


@contextmanager
def holder(kind: str, path: Path, seconds: float, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Another process that takes the lock and keeps it for `seconds` (or until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_busy_run_dir_names_its_holder_and_sigkill_frees_it(tmp_path: Path) -> None:
    with holder("run-dir", tmp_path, 60) as proc:
        with pytest.raises(RunDirBusy, match=f"in use by pid {proc.pid} on {socket.gethostname()}"):
            lock_run_dir(tmp_path)
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs: only the kernel can release the flock
        proc.wait(timeout=30)
    lock = lock_run_dir(tmp_path)
    lock.release()


def test_stage_locks_of_one_run_dir_are_independent(tmp_path: Path) -> None:
    teacher = lock_run_dir(tmp_path, "train-teacher")
    try:
        lock_run_dir(tmp_path, "report").release()
        with pytest.raises(RunDirBusy):
            lock_run_dir(tmp_path, "train-teacher")  # another holder, even in the same process
    finally:
        teacher.release()


def test_cache_lock_waits_for_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "prepared.lock"
    with holder("file", path, 1.5) as proc:
        start = time.monotonic()
        with file_lock(path):
            waited = time.monotonic() - start  # got it only once the holder let go
        assert waited >= 0.8, waited
        assert proc.wait(timeout=30) == 0


def test_soft_lock_files_work_where_flock_is_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    soft = {"KD_DDP_LOCKS": "soft"}
    monkeypatch.setenv("KD_DDP_LOCKS", "soft")
    with holder("run-dir", tmp_path, 60, soft) as proc:
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid} on {socket.gethostname()}.*delete it"):
            lock_run_dir(tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The holder ran on this host and is gone: filelock breaks its stale lock file.
    lock_run_dir(tmp_path).release()


def test_filesystem_without_flock_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No filesystem on this machine lacks flock (Lustre noflock, NFS without lockd answer
    ENOSYS/ENOLCK), so flock itself is made to fail as it does there."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(LockUnsupported, match=r"does not support flock .*KD_DDP_LOCKS=soft"):
        lock_run_dir(tmp_path)
    with pytest.raises(LockUnsupported, match=str(tmp_path / "x.lock")), file_lock(tmp_path / "x.lock"):
        pass
