"""The local report: statistics over seeds, the KD gap, variants and the sweep heat map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_ddp.config import load_config
from kd_ddp.report import build_report
from tests.conftest import REPO, fake_stage

pytestmark = pytest.mark.fast  # in-process unit tests (tests/conftest.py)

NORMAL = (0.50, 0.52, 0.51)
KD = (0.60, 0.63, 0.60)  # gaps 0.10, 0.11, 0.09: mean 0.10, std 0.01


@pytest.fixture()
def report(tmp_path: Path) -> tuple[Path, dict]:
    run_dir = tmp_path / "results"
    for i, base in enumerate((run_dir, run_dir / "seeds" / "1", run_dir / "seeds" / "2")):
        fake_stage(base, "teacher", 0.86 + 0.01 * i, machine="Test CPU (2 CPUs), 1 rank(s), torch 0")
        fake_stage(base, "student-normal", NORMAL[i], train_time_s=100.0 + i)
        fake_stage(base, "student-kd", KD[i], {"alpha": 0.5, "temperature": 4.0, "teacher": "cached"})
    fake_stage(run_dir / "variants" / "live-teacher", "student-kd", 0.605,
               {"alpha": 0.5, "temperature": 4.0, "teacher": "live"}, train_time_s=400.0)
    for alpha in (0.1, 0.5, 0.9):
        for temp in (2.0, 4.0):
            fake_stage(run_dir / "sweep" / f"a{alpha}-t{temp}", "student-kd", 0.5 + alpha / 10 + temp / 100,
                       {"alpha": alpha, "temperature": temp})
    cfg = load_config("smoke", [f"run.dir={run_dir}", "tracking.wandb.mode=disabled"])
    return run_dir / "report", build_report(cfg)


def test_seed_statistics_and_the_kd_gap(report: tuple[Path, dict]) -> None:
    out, results = report
    seeds = results["seeds"]
    assert seeds["student_normal"]["mean"] == pytest.approx(0.51) and seeds["student_normal"]["n"] == 3
    assert seeds["student_normal"]["train_time_s"] == pytest.approx(101.0)
    assert seeds["kd_minus_normal"]["mean"] == pytest.approx(0.10)
    assert seeds["kd_minus_normal"]["std"] == pytest.approx(0.01)
    md = (out / "report.md").read_text()
    assert "| Student (MSE, normal) | 0.5100 +- 0.0100 | 3 | 101 |" in md
    assert "| KD minus normal student | +0.1000 +- 0.0100 | 3 | |" in md
    assert "Machine: Test CPU (2 CPUs), 1 rank(s), torch 0." in md
    assert json.loads((out / "results.json").read_text())["seeds"] == seeds


def test_variants_and_sweep_are_reported(report: tuple[Path, dict]) -> None:
    out, results = report
    assert [(v["name"], v["teacher"], v["test_acc"]) for v in results["variants"]] == [("live-teacher", "live", 0.605)]
    md = (out / "report.md").read_text()
    assert "| live-teacher | live | 0.5 | 4 | 2 | 0.6050 | 400 |" in md
    assert len(results["sweep"]) == 6 and "## KD sweep" in md
    for png in ("final_accuracy.png", "kd_sweep.png", "test_acc.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_default_cell_is_outlined_on_the_heat_map(tmp_path: Path, report: tuple[Path, dict]) -> None:
    """The run dir's own KD student (0.5, 4) is outlined on the heat map, whatever the config
    the report is built with says; a KD student whose setting is not in the grid gives none."""
    out, _ = report
    red = lambda: int(np.all(np.asarray(Image.open(out / "kd_sweep.png").convert("RGB")).astype(int) * [1, -1, -1]
                             > [200, -60, -60], axis=-1).sum())
    assert red() > 100
    cfg = load_config("smoke", [f"run.dir={out.parent}", "tracking.wandb.mode=disabled", "kd.alpha=0.3"])
    build_report(cfg)
    assert red() > 100
    summary = out.parent / "student-kd" / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"kd": {"alpha": 0.3, "temperature": 4.0}}))
    build_report(cfg)
    assert red() == 0


def test_header_says_how_the_kd_student_was_trained_not_what_the_config_says(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fake_stage(run_dir, "teacher", 0.8)
    fake_stage(run_dir, "student-kd", 0.6, {"alpha": 0.5, "temperature": 4.0, "teacher": "cached", "views": 8,
                                            "cache_dtype": "float16"}, amp="bfloat16")
    cfg = load_config("smoke", [f"run.dir={run_dir}", "tracking.wandb.mode=disabled", "kd.alpha=0.9",
                                "kd.temperature=2", "kd.teacher=live", "kd.views=3", "train.amp=off"])
    results = build_report(cfg)
    md = (run_dir / "report" / "report.md").read_text()
    assert ("Preset `smoke`, seed 0. KD student: alpha=0.5, T=4.0, teacher logits cached (8 views, float16), "
            "precision bfloat16 autocast.\n") in md
    assert results["config"] | results["student_kd"]["kd"] == {
        "preset": "smoke", "seed": 0, "alpha": 0.5, "temperature": 4.0, "kd_teacher": "cached", "teacher": "cached",
        "views": 8, "cache_dtype": "float16", "amp": "bfloat16"}
    # a summary from before views, cache_dtype and amp were recorded: those are left out
    summary = run_dir / "student-kd" / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"kd": {"alpha": 0.1, "temperature": 8.0,
                                                                           "teacher": "live"}}))
    summary.write_text(json.dumps({k: v for k, v in json.loads(summary.read_text()).items() if k != "amp"}))
    build_report(cfg)
    md = (run_dir / "report" / "report.md").read_text()
    assert "Preset `smoke`, seed 0. KD student: alpha=0.1, T=8.0, teacher logits live.\n" in md


def test_committed_results_regenerate(tmp_path: Path) -> None:
    """`kd-ddp report --preset seed run.dir=results` rebuilds the published table and plots
    from the committed files alone (no checkpoints, caches or W&B logs in results/)."""
    committed = REPO / "results"
    shutil.copytree(committed, tmp_path / "results", ignore=shutil.ignore_patterns("report"))
    cfg = load_config("seed", [f"run.dir={tmp_path / 'results'}", "tracking.wandb.mode=disabled"])
    build_report(cfg)
    for name in ("report.md", "results.json"):
        assert (tmp_path / "results" / "report" / name).read_text() == (committed / "report" / name).read_text(), name
    pngs = sorted(p.name for p in (committed / "report").glob("*.png"))
    assert {"test_acc.png", "final_accuracy.png"} <= set(pngs)
    for name in pngs:  # pixels, not bytes: tolerate a font rasterizer's last bit
        new = np.asarray(Image.open(tmp_path / "results" / "report" / name).convert("RGB"), dtype=np.float32)
        old = np.asarray(Image.open(committed / "report" / name).convert("RGB"), dtype=np.float32)
        assert new.shape == old.shape and np.abs(new - old).mean() < 1.0, name
