"""The GPU check's pieces, run on the CPU where the code is shared: the pipeline record that
`scripts/gpu_check.sh` writes, and the seed-gpu preset it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_ddp.config import load_config
from tests.conftest import REPO


def test_pipeline_record_holds_what_the_acceptance_reads(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu_pipeline` (smoke preset, 1 torchrun process on the CPU): the
    JSON names the card, the wall-clock, whether the data was cached, and the accuracies the
    run's own report gives."""
    common = [sys.executable, "-m", "benchmarks.gpu_pipeline", "--preset", "smoke", "--archive", "",
              "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    for extra in (["--cold"], []):
        proc = subprocess.run([*common, *extra], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    cold = json.loads((tmp_path / "out" / "pipeline-cpu-cold.json").read_text())
    warm = json.loads((tmp_path / "out" / "pipeline-cpu.json").read_text())
    assert (cold["warm_data"], warm["warm_data"]) == (False, True)
    for row in (cold, warm):
        results = json.loads((Path(row["run_dir"]) / "report" / "results.json").read_text())
        assert row["card"] == "cpu" and row["nproc"] == 1 and row["wall_s"] > 0
        assert row["teacher_acc"] == results["teacher"]["test_acc"]
        assert row["student_normal_acc"] == results["student_normal"]["test_acc"]
        assert row["student_kd_acc"] == results["student_kd"]["test_acc"]
        assert row["stages"]["teacher"]["backend"] == "gloo"  # torchrun: a process group, as on the GPU
    assert cold["teacher_acc"] == warm["teacher_acc"]  # the same run, whether the data was prepared first


@pytest.mark.fast
def test_seed_gpu_preset_is_the_seed_recipe_at_a_larger_batch() -> None:
    seed, gpu = load_config("seed"), load_config("seed-gpu")
    assert gpu.optim.batch_size == 4 * seed.optim.batch_size
    assert gpu.lr_for("teacher") == 4 * seed.lr_for("teacher")  # linear scaling
    assert gpu.lr_for("student") == 2 * seed.lr_for("student")  # square-root scaling (validated on the CPU)
    assert gpu.warmup_for("teacher") == seed.warmup_for("teacher") and gpu.warmup_for("student") == 3
    assert gpu.kd.views == gpu.epochs_for("student")  # a fresh cached view every student epoch
    same = ("model", "data")
    assert all(getattr(gpu, s) == getattr(seed, s) for s in same)
    # a quarter of the steps: the teacher needs 30 epochs to reach the seed's accuracy
    assert gpu.epochs_for("student") == seed.epochs_for("student") and gpu.epochs_for("teacher") == 30
    assert gpu.data.loader == "auto"
