"""Shared fixtures: small synthetic data sets made in the test, never downloaded.

Test tiers. `make test` (what CI runs) runs every test. `make test-fast` (`pytest -m fast`)
runs only the tests marked `fast`, in well under 2 minutes on the 2-core dev machine: unit
tests that run in the pytest process. A fast test starts no subprocess (no `run_cli`, no
torchrun, no Slurm) and uses no fixture that runs the pipeline (`smoke_run`, ...), and
takes a few seconds at most. To put a test in the fast tier, decorate it with
`@pytest.mark.fast`, or write `pytestmark = pytest.mark.fast` at the top of a module whose
tests all qualify (tests/test_config.py). A fast test that breaks the rule fails, naming
what it started (the guards below), instead of slowing the tier down unnoticed.
"""

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

# Fixtures that run a whole pipeline (or a cluster): never in a fast test.
PIPELINE_FIXTURES = {"smoke_run", "smoke_run_ddp", "pipeline", "pipeline_run", "slurm_env", "multinode_cluster",
                     "ensemble_runs"}
_running_fast_test: list[str] = []  # the node id of the fast test running now, if one is


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = [f"{item.nodeid} (uses {', '.join(sorted(PIPELINE_FIXTURES & set(item.fixturenames)))})"
            for item in items if item.get_closest_marker("fast") and PIPELINE_FIXTURES & set(item.fixturenames)]
    if slow:
        raise pytest.UsageError("tests marked fast must not run the pipeline: " + "; ".join(slow))


def _no_subprocess_in_fast_tests(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: a fast test that starts a program fails (fork()ed workers, as FFCV's, are fine)."""
    if event == "subprocess.Popen" and _running_fast_test:
        raise RuntimeError(f"{_running_fast_test[0]} is marked fast but starts {args[1]!r}: "
                           "drop its fast marker (tests/conftest.py)")


sys.addaudithook(_no_subprocess_in_fast_tests)


@pytest.fixture(autouse=True)
def _fast_test_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("fast"):
        _running_fast_test.append(request.node.nodeid)
    yield
    _running_fast_test.clear()


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS`, or plain
    `python ARGS` for nproc 0 (torchrun with one process still makes a process group)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return [sys.executable, *launcher, *args]


def run_cli(args: list[str], *, torchrun: int = 0, env: dict[str, str] | None = None,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run `kd-ddp ARGS` (or under torchrun with N processes) as a user would."""
    cmd = torchrun_cmd(torchrun, ["-m", "kd_ddp", *args])
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def run_worker(name: str, args: list[str], *, torchrun: int = 0) -> str:
    """Run tests/workers/NAME.py ARGS (under torchrun with N processes, or plainly for 0) in a
    bare environment; what it printed on stdout. A worker that fails fails the test."""
    cmd = torchrun_cmd(torchrun, [str(REPO / "tests" / "workers" / f"{name}.py"), *args])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str, who: str = "") -> None:
    """A refusal of what the user asked for: exit 2, each fragment in stderr, no traceback.
    `who` (a rank, say) leads the failure message."""
    tail = f"{who}{': ' if who else ''}exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, tail
    assert "Traceback" not in proc.stderr, tail
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr of {tail}"


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
def ensemble_runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir of two seeds (`seeds/1`, `seeds/2`, none of its own), each a finished smoke
    pipeline of an ensemble of two teachers (kd.ensemble=2, 1 epoch a stage), run in this
    process. Read it, or copy it before writing to it: the session shares it."""
    from kd_ddp.cli import run_stage
    from kd_ddp.config import load_config

    run_dir = tmp_path_factory.mktemp("ensemble-runs")
    for seed in (1, 2):
        cfg = load_config("smoke", [f"run.dir={run_dir / 'seeds' / str(seed)}", f"seed={seed}",
                                    f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled",
                                    "kd.ensemble=2", "optim.epochs=1"])
        run_stage(cfg, "pipeline")
    return run_dir


@pytest.fixture(scope="session")
def smoke_run_ddp(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke pipeline run by `torchrun --nproc_per_node=2`."""
    run_dir = tmp_path_factory.mktemp("smoke-ddp")
    run_cli(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], torchrun=2)
    return run_dir
