"""Inputs a user gets wrong, through the real CLI: exit code 2 and a message, no traceback;
and data preparation's progress bars, which belong on a terminal and never in a log."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from kd_ddp.data import ffcv_available
from tests.conftest import REPO, assert_user_error, run_cli
from tests.test_data import write_imagefolder

QUIET = ["tracking.wandb.mode=disabled"]


def test_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    for run_dir in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        proc = run_cli(["report", "--preset", "smoke", f"run.dir={run_dir}", *QUIET], check=False)
        assert_user_error(proc, f"run.dir {run_dir} is an existing file")
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_single_class_imagefolder_is_refused(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "data", ["cats"], 3, 8, "RGB")
    proc = run_cli(["prepare-data", "--preset", "smoke", "data.source=imagefolder", f"data.root={tmp_path / 'data'}",
                    f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}", *QUIET], check=False)
    assert_user_error(proc, "needs at least two class sub-directories (one per class), found only 'cats'")


def on_a_terminal(args: list[str], timeout: float = 300) -> str:
    """Run `kd-ddp ARGS` with stdout and stderr on a pseudo-terminal; all it wrote there."""
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0 columns: tqdm draws nothing
    proc = subprocess.Popen([sys.executable, "-m", "kd_ddp", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=child, stderr=child, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(child)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    return out.decode(errors="replace")


@pytest.mark.skipif(not ffcv_available(), reason="FFCV not installed (its DatasetWriter draws the bar)")
def test_data_preparation_bars_only_on_a_terminal_and_only_when_asked(tmp_path: Path) -> None:
    def prepare(name: str, *extra: str) -> list[str]:
        return ["prepare-data", "--preset", "smoke", f"data.cache_dir={tmp_path / name}",
                f"run.dir={tmp_path / name / 'run'}", *QUIET, *extra]

    shown = on_a_terminal(prepare("tty"))
    assert "100%|" in shown and "512/512" in shown  # FFCV's bar for the 512 training images
    assert "%|" not in on_a_terminal(prepare("tty-off", "tracking.progress=false"))
    logged = run_cli(prepare("log")).stderr  # stderr is a pipe, as under nohup, Slurm or CI
    assert "prepared 512 train / 256 test images" in logged and "%|" not in logged and "it/s" not in logged
