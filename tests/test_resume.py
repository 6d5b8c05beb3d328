"""Fault tolerance: killed runs resume to the same weights as runs never interrupted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kd_ddp.checkpoint import load_checkpoint, save_checkpoint
from kd_ddp.config import Config, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.metrics_io import read_metrics
from kd_ddp.train import train_stage
from tests.conftest import REPO, assert_user_error, run_cli, torchrun_cmd

# Enough steps per epoch that a signal lands mid-epoch: 3 epochs x 48 steps.
LONG = ["--preset", "smoke", "data.synthetic_train=3072", "optim.batch_size=64", "optim.epochs=3",
        "tracking.wandb.mode=disabled"]


def _args(run_dir: Path, cache_dir: Path) -> list[str]:
    return ["train-teacher", *LONG, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"]


def _launcher(nproc: int) -> int:
    """run_cli's torchrun for NPROC processes: one runs plainly, more under torchrun."""
    return nproc if nproc > 1 else 0


def _cmd(run_dir: Path, cache_dir: Path, nproc: int, extra: list[str] = ()) -> list[str]:
    """The command line of `_args`, with torchrun options EXTRA."""
    return torchrun_cmd(_launcher(nproc), [*extra, "-m", "kd_ddp", *_args(run_dir, cache_dir)])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "teacher" / "checkpoint.pt", weights_only=False)["model"]


def _metrics(run_dir: Path) -> list[dict]:
    rows = read_metrics(run_dir / "teacher" / "metrics.jsonl")
    return [{k: r[k] for k in ("epoch", "train_loss", "test_loss", "test_acc", "lr")} for r in rows]


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_tree(proc: subprocess.Popen[str], sig: int) -> None:
    """Signal torchrun and its workers at once, as a scheduler or the OOM killer would.
    (torchrun's workers are not in its process group, so killpg alone would miss them.)"""
    import psutil  # a dependency of wandb

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _wait_for_epochs(run_dir: Path, n: int, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    path = run_dir / "teacher" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach {n} epochs")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[int, Path]:
    """Uninterrupted runs, 1 and 2 processes."""
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"ref{nproc}")
        run_cli(_args(run_dir, cache_dir), torchrun=_launcher(nproc))
        runs[nproc] = run_dir
    return runs


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    assert _metrics(a) == _metrics(b)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, cache_dir: Path,
                                                           reference: dict[int, Path], nproc: int) -> None:
    proc = _start(_cmd(tmp_path, cache_dir, nproc))
    _wait_for_epochs(tmp_path, 1, proc)
    time.sleep(0.3)  # into epoch 2
    _signal_tree(proc, signal.SIGKILL)
    proc.wait()
    assert len(_metrics(tmp_path)) < 3
    done = run_cli(_args(tmp_path, cache_dir), torchrun=_launcher(nproc))
    assert "resuming at epoch" in done.stderr
    _assert_same_run(tmp_path, reference[nproc])


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(tmp_path: Path, cache_dir: Path,
                                                          reference: dict[int, Path], nproc: int) -> None:
    proc = _start(_cmd(tmp_path, cache_dir, nproc))
    _wait_for_epochs(tmp_path, 1, proc)
    time.sleep(0.3)
    _signal_tree(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpointed at epoch" in err
    state = torch.load(tmp_path / "teacher" / "checkpoint.pt", weights_only=False)
    assert state["step_in_epoch"] > 0  # a mid-epoch checkpoint, not an epoch-end one
    run_cli(_args(tmp_path, cache_dir), torchrun=_launcher(nproc))
    _assert_same_run(tmp_path, reference[nproc])


def test_torchrun_restarts_a_killed_worker_and_finishes(tmp_path: Path, cache_dir: Path,
                                                       reference: dict[int, Path]) -> None:
    proc = _start(_cmd(tmp_path, cache_dir, 2, ["--max-restarts=1"]))
    _wait_for_epochs(tmp_path, 1, proc)
    time.sleep(0.3)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "kd_ddp"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert pids, "no torchrun workers found"
    os.kill(pids[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming at epoch" in err
    _assert_same_run(tmp_path, reference[2])


def test_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path: Path, cache_dir: Path) -> None:
    args = ["train-student", "--mode", "normal", "--preset", "smoke", f"run.dir={tmp_path}",
            f"data.cache_dir={cache_dir}", "optim.epochs=1", "tracking.wandb.mode=disabled"]
    run_cli(args)
    proc = run_cli([*args, "model.student_width=8"], check=False)
    assert_user_error(proc, "student-normal/checkpoint.pt was made with another config",
                      "model: checkpoint has ['student_cnn', 4, 16, 0.25], this run needs ['student_cnn', 8, 16, 0.25]")
    assert len(read_metrics(tmp_path / "student-normal" / "metrics.jsonl")) == 1  # the finished run is left as it was


def test_teacher_checkpoint_of_another_size_is_refused(smoke_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    shutil.copytree(smoke_run / "teacher", tmp_path / "teacher")
    proc = run_cli(["cache-logits", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "model.teacher_width=16", "tracking.wandb.mode=disabled"], check=False)
    assert_user_error(proc, "does not hold a teacher_cnn of this config's size")
    assert not (tmp_path / "teacher-logits" / "logits.npy").exists()


def test_truncated_checkpoint_is_refused_clearly(smoke_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    shutil.copytree(smoke_run / "teacher", tmp_path / "teacher")
    ckpt = tmp_path / "teacher" / "checkpoint.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(ckpt.stat().st_size // 2)
    common = ["--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled"]
    used = run_cli(["cache-logits", *common], check=False)  # a later stage reading the teacher
    (tmp_path / "teacher" / "summary.json").unlink()
    resumed = run_cli(["train-teacher", *common], check=False)  # the stage resuming from it
    for proc in (used, resumed):
        assert_user_error(proc, f"checkpoint {ckpt} is unreadable", "delete it to start over")


def test_resume_with_another_precision_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    """A checkpoint carries its precision's state (an fp16 run's GradScaler): resuming it in
    another precision is refused with what differs, not a traceback from GradScaler."""
    args = ["train-student", "--mode", "normal", "--preset", "smoke", f"run.dir={tmp_path}",
            f"data.cache_dir={cache_dir}", "optim.epochs=1", "tracking.wandb.mode=disabled"]
    run_cli([*args, "train.amp=bf16"])
    proc = run_cli([*args, "train.amp=fp16"], check=False)
    assert_user_error(proc, "precision: checkpoint has 'bfloat16', this run needs 'float16'")


# -- the metrics record and the checkpoint agree after any kill (in process) -----------------


def _in_process(run_dir: Path, cache_dir: Path, *overrides: str) -> tuple[Config, DistEnv, object]:
    cfg = load_config("smoke", [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled",
                                "tracking.progress=false", "data.loader=device", *overrides])
    env = DistEnv()
    return cfg, env, prepare_data(cfg, env)


@pytest.mark.fast
@pytest.mark.parametrize("epochs", [1, 2])
def test_a_kill_between_the_checkpoint_and_metrics_jsonl_resumes_with_the_last_epochs_record(
        tmp_path: Path, cache_dir: Path, epochs: int) -> None:
    """The last epoch's checkpoint is written and metrics.jsonl not yet (what a kill between
    the two leaves; with one epoch an empty file): the rerun's summary reports the last epoch,
    and metrics.jsonl holds every epoch again."""
    cfg, env, data = _in_process(tmp_path, cache_dir, f"optim.epochs={epochs}")
    done = train_stage(cfg, env, data, "teacher")
    out = tmp_path / "teacher"
    metrics = (out / "metrics.jsonl").read_text()
    lines = metrics.splitlines(keepends=True)
    assert len(lines) == epochs
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))
    (out / "summary.json").unlink()
    again = train_stage(cfg, env, data, "teacher")
    assert (again["test_acc"], again["test_loss"]) == (done["test_acc"], done["test_loss"])
    assert again["test_acc"] == json.loads(lines[-1])["test_acc"]
    assert (out / "metrics.jsonl").read_text() == metrics


@pytest.mark.fast
def test_a_checkpoint_without_records_resumes_from_what_metrics_jsonl_holds(tmp_path: Path, cache_dir: Path) -> None:
    """A checkpoint saved before checkpoints held their records: metrics.jsonl's lines are taken,
    a half-written last line dropped; the last epoch's record lost, the summary's test metrics
    come from evaluating the checkpoint, which are the ones that epoch recorded."""
    cfg, env, data = _in_process(tmp_path, cache_dir)
    done = train_stage(cfg, env, data, "teacher")
    out = tmp_path / "teacher"
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    state.pop("history")
    save_checkpoint(ckpt, state)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    (out / "summary.json").unlink()
    again = train_stage(cfg, env, data, "teacher")
    assert (again["test_acc"], again["test_loss"]) == (done["test_acc"], done["test_loss"])
    assert (out / "metrics.jsonl").read_text() == lines[0]
