"""The whole pipeline through the real CLI: one process, two torchrun processes, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_ddp.metrics_io import read_metrics
from tests.conftest import assert_user_error, run_cli, run_worker


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "report" / "results.json").read_text())


def test_smoke_pipeline_outputs(smoke_run: Path) -> None:
    res = _results(smoke_run)
    for key in ("teacher", "student_normal", "student_kd"):
        assert 0.0 <= res[key]["test_acc"] <= 1.0
    assert res["teacher"]["test_acc"] > 0.5  # synthetic classes are easy; chance is 0.1
    for stage in ("teacher", "student-normal", "student-kd"):
        d = smoke_run / stage
        assert (d / "checkpoint.pt").is_file() and (d / "summary.json").is_file()
        rows = read_metrics(d / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2]
        for r in rows:
            assert {"epoch", "train_loss", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s"} <= set(r)
    for png in ("test_acc.png", "train_loss.png", "final_accuracy.png"):
        assert (smoke_run / "report" / png).stat().st_size > 1000
    md = (smoke_run / "report" / "report.md").read_text()
    assert "| Teacher (CE) |" in md and "test_acc.png" in md


def test_rerun_is_idempotent(smoke_run: Path, cache_dir: Path) -> None:
    before = {s: (smoke_run / s / "checkpoint.pt").stat().st_mtime_ns for s in ("teacher", "student-kd")}
    proc = run_cli(["pipeline", "--preset", "smoke", f"run.dir={smoke_run}", f"data.cache_dir={cache_dir}"])
    assert "already trained" in proc.stderr and "cache is up to date" in proc.stderr
    after = {s: (smoke_run / s / "checkpoint.pt").stat().st_mtime_ns for s in ("teacher", "student-kd")}
    assert before == after


def test_two_process_torchrun_pipeline(smoke_run_ddp: Path) -> None:
    res = _results(smoke_run_ddp)
    assert res["teacher"]["test_acc"] > 0.5
    for stage in ("teacher", "student-normal", "student-kd"):
        summary = json.loads((smoke_run_ddp / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
    manifest = json.loads((smoke_run_ddp / "teacher-logits" / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def test_one_process_torchrun_trains_without_a_group_unless_asked(smoke_run: Path, cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    """`--nproc_per_node=1` (a one-GPU machine) trains as a plain run does, with no process
    group or DDP; `train.one_rank_ddp=true` runs DDP over a group of one (the multi-GPU path,
    tested on one device). All three land on the very weights of the plain one-process run."""
    common = ["train-teacher", "--preset", "smoke", f"data.cache_dir={cache_dir}"]
    run_cli([*common, f"run.dir={tmp_path / 'free'}"], torchrun=1)
    run_cli([*common, f"run.dir={tmp_path / 'group'}", "train.one_rank_ddp=true"], torchrun=1)
    free, group, plain = (json.loads((d / "teacher" / "summary.json").read_text())
                          for d in (tmp_path / "free", tmp_path / "group", smoke_run))
    assert (free["backend"], free["world_size"]) == ("none", 1)
    assert (group["backend"], group["world_size"]) == ("gloo", 1)
    assert plain["backend"] == "none"
    assert free["weights_hash"] == group["weights_hash"] == plain["weights_hash"]


def _eval(run_dir: Path, cache_dir: Path, nproc: int) -> dict:
    args = ["smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.eval_batch_size=48"]
    out = run_worker("eval_teacher", args, torchrun=nproc if nproc > 1 else 0)
    return json.loads(out.strip().splitlines()[-1])


def test_ddp_all_reduced_metrics_match_one_process(smoke_run: Path, cache_dir: Path) -> None:
    one = _eval(smoke_run, cache_dir, 1)
    two = _eval(smoke_run, cache_dir, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # 256 test images split 128/128 in batches of 48: a different batching, the same model
    assert two["test_acc"] == one["test_acc"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def _write_gray_imagefolder(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 4)):
        for c in range(classes):
            d = root / split / f"kind{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((28, 28))
                base[c * 7:(c + 1) * 7, :] = 200  # a horizontal band (flip-invariant) whose row is the class
                img = np.clip(base + rng.normal(30, 25, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(img, "L").save(d / f"{i}.png")


def test_unseen_imagefolder_grayscale_28px(tmp_path: Path, cache_dir: Path) -> None:
    """The issue's acceptance command, on 4 classes of grayscale 28x28 images.

    6,000 training images give 23 steps at the quick batch of 256: fewer leave BatchNorm's
    running statistics (momentum 0.1) too far from the data for eval mode to work. The peak
    LR is 0.05, not the quick preset's 0.2 (tuned on CIFAR-10): on these trivially separable
    bands a one-epoch teacher reaches a test loss of ~0 with logits of ~100, and a KD student
    distilled from such a teacher at 0.2 can diverge (seen with some dropout streams, in the
    old loop too); this test is about the data path, not KD's stability at that LR.
    """
    _write_gray_imagefolder(tmp_path / "gray", classes=4, per_class=1500)
    run_dir = tmp_path / "run"
    run_cli(["pipeline", "--preset", "quick", "data.source=imagefolder", f"data.root={tmp_path / 'gray'}",
             f"run.dir={run_dir}", "optim.epochs=1", "optim.lr=0.05", f"data.cache_dir={cache_dir}"])
    res = _results(run_dir)
    for key in ("teacher", "student_normal", "student_kd"):
        assert res[key]["test_acc"] > 0.5, res  # chance is 0.25
    assert res["teacher"]["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["data.source=imagefolder", "data.root=/nonexistent/dir"], "data.root /nonexistent/dir does not exist"),
    (["kd.alpha=2"], "kd.alpha=2.0: must be in [0, 1]"),
    (["kd.tempreature=2"], "did you mean kd.temperature?"),
])
def test_user_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli(["pipeline", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={tmp_path}", *args],
                   check=False)
    assert_user_error(proc, message)


def test_odd_batch_for_world_size_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    proc = run_cli(["train-teacher", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "optim.batch_size=63"], torchrun=2, check=False)
    assert proc.returncode != 0
    assert "optim.batch_size=63 is not divisible by the world size 2" in proc.stderr


def test_second_pipeline_on_a_busy_run_dir_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    from kd_ddp.locks import lock_run_dir

    held = lock_run_dir(tmp_path)  # as a running pipeline holds it
    try:
        proc = run_cli(["pipeline", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}"],
                       check=False)
    finally:
        held.release()
    assert_user_error(proc, f"run dir {tmp_path} is in use by pid")
    assert not (tmp_path / "teacher").exists()


def test_nonfinite_loss_stops_naming_the_step(tmp_path: Path, cache_dir: Path) -> None:
    proc = run_cli(["train-teacher", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "optim.lr=1e30", "optim.warmup_epochs=0", "tracking.wandb.mode=disabled"], check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss at epoch 1 step" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "teacher" / "summary.json").exists()


def test_metrics_after_two_process_training_equal_a_one_process_evaluation(smoke_run_ddp: Path,
                                                                           cache_dir: Path) -> None:
    """Each rank's last forward updates its own BatchNorm statistics: the end-of-training
    evaluation must use rank 0's (those its checkpoint holds) on every shard, so the logged
    metrics are those of the saved model, whatever the number of processes."""
    logged = json.loads((smoke_run_ddp / "teacher" / "summary.json").read_text())
    assert logged["world_size"] == 2
    one = _eval(smoke_run_ddp, cache_dir, 1)
    assert one["test_acc"] == logged["test_acc"]
    assert one["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-5)


def _masks(run_dir: Path, cache_dir: Path) -> list[str]:
    out = run_worker("dropout_masks", ["smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], torchrun=2)
    return json.loads(out.strip().splitlines()[-1])["masks"]


def test_ranks_draw_different_dropout_masks_reproducibly(tmp_path: Path, cache_dir: Path) -> None:
    first = _masks(tmp_path, cache_dir)
    assert len(first) == 2 and first[0] != first[1]
    assert _masks(tmp_path, cache_dir) == first  # streams derived from (seed, rank): the same every run
