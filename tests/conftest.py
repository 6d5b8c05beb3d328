"""Shared fixtures: small synthetic data sets made in the test, never downloaded."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def run_cli(args: list[str], *, torchrun: int = 0, env: dict[str, str] | None = None,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run `kd-ddp ARGS` (or under torchrun with N processes) as a user would."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", "-m", "kd_ddp", *args]
    else:
        cmd = [sys.executable, "-m", "kd_ddp", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def fake_stage(run_dir: Path, stage: str, acc: float, kd: dict[str, Any] | None = None, **summary: Any) -> None:
    """A finished stage as train.py leaves it: metrics.jsonl and summary.json."""
    d = run_dir / stage
    d.mkdir(parents=True)
    metrics = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "test_acc": acc * e / 2} for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {"stage": stage, "test_acc": acc, "test_loss": 1.1, "epochs": 2, "train_time_s": 3.0,
               "images_per_s": 100.0} | ({"kd": kd} if kd else {}) | summary
    (d / "summary.json").write_text(json.dumps(summary))


@contextlib.contextmanager
def small_tmpfs(target: Path, size: str) -> Iterator[Path]:
    """A real full-able filesystem: a tmpfs of `size` mounted on `target` (root only; else skip)."""
    target.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so the synthetic .beton files are built once."""
    return tmp_path_factory.mktemp("kd-cache")


@pytest.fixture(scope="session")
def smoke_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-process smoke pipeline, shared by tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke-run")
    run_cli(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def smoke_run_ddp(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke pipeline run by `torchrun --nproc_per_node=2`."""
    run_dir = tmp_path_factory.mktemp("smoke-ddp")
    run_cli(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], torchrun=2)
    return run_dir
