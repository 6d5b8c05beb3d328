"""A failure only rank 0 sees (run dir a file, run dir busy, W&B preflight) ends every rank.

The ranks are started the way a multi-task Slurm job starts them: separate processes, each
with the rendezvous variables set and no torchrun, which would kill the other ranks as soon
as one exits and so hide a rank left waiting in a barrier for the process group's timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_ddp.locks import lock_run_dir
from launch.ports import pick_port
from tests.conftest import REPO, assert_user_error

WORLD = 2
PROMPTLY_S = 240  # start-up of two torch processes on a busy 2-core machine; the group timeout is 60 min


def rank_env(rank: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    """The variables Slurm's tasks get from launch/slurm.py (submitit), without torchrun's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    return env | {"PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                  "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                  "LOCAL_WORLD_SIZE": str(WORLD)} | extra


def run_ranks(args: list[str], extra: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """`kd-ddp ARGS` in WORLD rank processes; a rank still running after PROMPTLY_S fails the test."""
    port = pick_port(os.getpid())
    procs = [subprocess.Popen([sys.executable, "-m", "kd_ddp", *args], cwd=REPO, env=rank_env(r, port, extra or {}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    deadline = time.monotonic() + PROMPTLY_S
    done = []
    try:
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still runs {PROMPTLY_S} s after the start: stranded")
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def assert_every_rank_exits_2_with(done: list[subprocess.CompletedProcess[str]], message: str) -> None:
    for rank, proc in enumerate(done):
        assert_user_error(proc, f"kd-ddp: error: {message}", who=f"rank {rank}")


def smoke(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return ["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache}", *overrides]


def test_run_dir_that_is_a_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    done = run_ranks(smoke(run_dir, tmp_path / "cache"))
    assert_every_rank_exits_2_with(done, f"run.dir {run_dir} is an existing file")
    assert run_dir.read_text() == "not a directory"


def test_busy_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = lock_run_dir(run_dir)  # another run working in it: this test's process
    try:
        done = run_ranks(smoke(run_dir, tmp_path / "cache"))
    finally:
        lock.release()
    assert_every_rank_exits_2_with(done, f"run dir {run_dir} is in use by pid {os.getpid()}")
    assert sorted(p.name for p in run_dir.iterdir()) == [".kd-ddp.lock"]  # nothing written beside the lock


def test_wandb_online_without_api_key(tmp_path: Path) -> None:
    home = tmp_path / "home"  # no ~/.netrc, and no WANDB_API_KEY below
    home.mkdir()
    no_key = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_IDENTITY_TOKEN_FILE": "", "NETRC": str(home / ".netrc")}
    done = run_ranks(smoke(tmp_path / "run", tmp_path / "cache", "tracking.wandb.mode=online"), no_key)
    assert_every_rank_exits_2_with(done, "tracking.wandb.mode=online but no W&B API key was found")


def test_bad_lock_setting_fails_on_every_rank_alike(tmp_path: Path) -> None:
    """A failure every rank sees: each reports its own, none waits for the others."""
    done = run_ranks(smoke(tmp_path / "run", tmp_path / "cache"), {"KD_DDP_LOCK_WAIT_S": "forever"})
    assert_every_rank_exits_2_with(done, "KD_DDP_LOCK_WAIT_S='forever': give the seconds to wait")
    assert not (tmp_path / "run").exists()
