"""kd_ddp.locks between real processes: busy run dirs, waiting cache locks, SIGKILL, lock files."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from kd_ddp.config import ConfigError, load_config
from kd_ddp.data import prepared_dir
from kd_ddp.locks import LockUnsupported, LockWaitTimeout, RunDirBusy, file_lock, lock_run_dir
from tests.conftest import assert_user_error, run_cli

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
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid} on {socket.gethostname()}.*delete the lock file"):
            lock_run_dir(tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The holder ran on this host and is gone: filelock breaks its stale lock file.
    lock_run_dir(tmp_path).release()


# A soft lock file as filelock 4.3 writes it (pid, host, process start token) on a node that
# then died: this host cannot tell that pid 48213 of gpu-node-17 no longer runs.
FOREIGN = "48213\ngpu-node-17\n3530985319583715208790976022759982096453778390634234676086\n"
TAKEN = 1_780_000_000  # when that node took it (its mtime), 2026-05-28 UTC


def foreign_soft_lock(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FOREIGN)
    os.utime(path, (TAKEN, TAKEN))
    return path


def since(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


@pytest.mark.fast
def test_soft_lock_of_a_dead_host_ends_the_wait_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_DDP_LOCKS", "soft")
    monkeypatch.setenv("KD_DDP_LOCK_WAIT_S", "1.5")
    path = foreign_soft_lock(tmp_path / "cache" / "prepared.lock")
    start = time.monotonic()
    with pytest.raises(LockWaitTimeout) as e, file_lock(path):
        pass
    assert 1.5 <= time.monotonic() - start < 30
    assert f"held by pid 48213 on gpu-node-17 since {since(TAKEN)}" in str(e.value)
    assert f"delete the lock file {path} if that process no longer runs" in str(e.value)
    assert path.read_text() == FOREIGN  # not ours to break: the user decides


@pytest.mark.fast
def test_busy_soft_run_dir_names_holder_host_and_since(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_DDP_LOCKS", "soft")
    foreign_soft_lock(tmp_path / ".kd-ddp.lock")
    busy = f"in use by pid 48213 on gpu-node-17 since {since(TAKEN)} (delete the lock file"
    with pytest.raises(RunDirBusy, match=re.escape(busy)):
        lock_run_dir(tmp_path)


def test_flock_wait_is_bounded_and_logs_its_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KD_DDP_LOCK_WAIT_S", "2")
    path = tmp_path / "cache" / "prepared.lock"
    with holder("file", path, 60) as proc:
        taken = time.time()
        with pytest.raises(LockWaitTimeout) as e, file_lock(path):
            pass
    holder_text = f"pid {proc.pid} on {socket.gethostname()} since "
    assert holder_text in str(e.value) and "the kernel frees this lock when that process ends" in str(e.value)
    stamp = str(e.value).split(holder_text)[1].split(" ")[0].rstrip(":")
    assert abs(datetime.fromisoformat(stamp).timestamp() - taken) < 30
    assert "KD_DDP_LOCK_WAIT_S" in str(e.value)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waiting and holder_text in waiting[0]  # said at once, not only when giving up
    with file_lock(path):  # the holder is gone: the lock is free again
        pass


@pytest.mark.fast
def test_bad_wait_bound_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_DDP_LOCK_WAIT_S", "ten minutes")
    with pytest.raises(ConfigError, match="KD_DDP_LOCK_WAIT_S='ten minutes'"), file_lock(tmp_path / "x.lock"):
        pass


def test_stranded_data_cache_lock_is_exit_2_with_its_holder(tmp_path: Path) -> None:
    """The reported case, end to end: `prepare-data` with soft locks finds the data-cache lock
    file of a process that died on another host; it stops after the bound, with the message."""
    cache = tmp_path / "cache"
    cfg = load_config("smoke", [f"data.cache_dir={cache}"])
    lock = foreign_soft_lock(prepared_dir(cfg).with_name(prepared_dir(cfg).name + ".lock"))
    start = time.monotonic()
    proc = run_cli(["prepare-data", "--preset", "smoke", f"data.cache_dir={cache}", f"run.dir={tmp_path / 'run'}"],
                   env={"KD_DDP_LOCKS": "soft", "KD_DDP_LOCK_WAIT_S": "2"}, check=False, timeout=300)
    assert_user_error(proc, f"kd-ddp: error: gave up after 2 s waiting for the lock {lock}, held by",
                      f"held by pid 48213 on gpu-node-17 since {since(TAKEN)}",
                      f"delete the lock file {lock} if that process no longer runs")
    assert time.monotonic() - start < 200
    assert lock.read_text() == FOREIGN and not prepared_dir(cfg).exists()  # nothing half-written


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
