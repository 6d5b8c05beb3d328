"""The report of an ensemble of teachers, from real smoke runs (kd.ensemble=2, two seeds):
each teacher's row, the ensemble's own accuracy, its KD student beside the KD student of one
teacher and the normal student, mean +- std over seeds and the paired gaps, recomputed here
from the summaries. Not fast: the `ensemble_runs` fixture trains two pipelines."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kd_ddp.cli import report_and_print
from kd_ddp.config import load_config
from kd_ddp.report import build_report

ROWS = {"teacher": "Teacher (CE)", "teacher_2": "Teacher 2 (CE)", "ensemble": "Ensemble of teachers",
        "student_normal": "Student (MSE, normal)", "student_kd": "Student (KD)",
        "student_kd_ensemble": "Student (KD, ensemble)"}  # report order
DIRS = {"teacher": "teacher", "teacher_2": "teacher-2", "student_normal": "student-normal",
        "student_kd": "student-kd", "student_kd_ensemble": "student-kd-ensemble"}
GAPS = {"kd_minus_normal": ("student_kd", "student_normal"),
        "kd_ensemble_minus_kd": ("student_kd_ensemble", "student_kd"),
        "kd_ensemble_minus_normal": ("student_kd_ensemble", "student_normal"),
        "ensemble_minus_teacher": ("ensemble", "teacher")}


def accuracies(run_dir: Path) -> dict[str, float]:
    """Each row's final test accuracy, read from the summaries as train.py wrote them."""
    summaries = {key: json.loads((run_dir / d / "summary.json").read_text()) for key, d in DIRS.items()}
    accs = {key: s["test_acc"] for key, s in summaries.items()}
    return accs | {"ensemble": summaries["student_kd_ensemble"]["ensemble"]["test_acc"]}


def report(run_dir: Path, **kw: Any) -> tuple[dict[str, Any], str]:
    cfg = load_config("smoke", [f"run.dir={run_dir}", "tracking.wandb.mode=disabled", "kd.ensemble=2"])
    results = build_report(cfg)
    return results, (run_dir / "report" / "report.md").read_text()


@pytest.fixture()
def one_seed(ensemble_runs: Path, tmp_path: Path) -> Path:
    """A copy of seed 1's run dir: an ensemble run dir of its own, no seeds."""
    run_dir = tmp_path / "run"
    shutil.copytree(ensemble_runs / "seeds" / "1", run_dir)
    return run_dir


def test_an_ensemble_run_dir_reports_every_teacher_the_ensemble_and_its_student(
        one_seed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accs = accuracies(one_seed)
    ens = json.loads((one_seed / "student-kd-ensemble" / "summary.json").read_text())["ensemble"]
    assert ens["size"] == 2 and [m["stage"] for m in ens["members"]] == ["teacher", "teacher-2"]
    results, md = report(one_seed)

    table = [line for line in md.splitlines() if line.startswith("| ") and "| test accuracy |" not in line]
    assert [line.split(" | ")[0][2:] for line in table[:len(ROWS)]] == list(ROWS.values())  # report order
    for key, name in ROWS.items():
        assert results[key]["test_acc"] == accs[key]
        assert f"| {name} | {accs[key]:.4f} |" in md
    assert results["ensemble"] | {"members": None} == {
        "size": 2, "rule": ens["rule"], "test_acc": ens["test_acc"], "test_loss": ens["test_loss"], "members": None}
    assert results["ensemble"]["members"] == ens["members"]
    for gap, (a, b) in GAPS.items():  # paired: both sides from this run dir
        assert results[gap] == pytest.approx(accs[a] - accs[b], abs=1e-12)
    assert f"KD (ensemble) minus KD student: {accs['student_kd_ensemble'] - accs['student_kd']:+.4f}" in md
    assert f"Ensemble minus teacher 1: {accs['ensemble'] - accs['teacher']:+.4f}" in md
    assert "## Ensemble of 2 teachers" in md and f"| teacher-2 | {ens['members'][1]['seed']} |" in md
    assert "Across seeds" not in md and results["seeds"] == {} and "paired_gaps" not in results
    assert json.loads((one_seed / "report" / "results.json").read_text()) == json.loads(json.dumps(results))
    with Image.open(one_seed / "report" / "final_accuracy.png") as im:  # six bars, wider than three
        assert im.size[0] > 800

    report_and_print(load_config("smoke", [f"run.dir={one_seed}", "tracking.wandb.mode=disabled", "kd.ensemble=2"]))
    printed = [line for line in capsys.readouterr().out.splitlines() if "test_acc" in line]
    assert [(line[:22].strip(), line.split()[-1]) for line in printed] == [
        (name, f"{accs[key]:.4f}") for key, name in ROWS.items()]


def test_seeds_mean_std_and_paired_gaps(ensemble_runs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(ensemble_runs, run_dir)
    per_seed = {f"seeds/{s}": accuracies(run_dir / "seeds" / str(s)) for s in (1, 2)}
    results, md = report(run_dir)

    seeds = results["seeds"]
    for key, name in ROWS.items():
        values = [accs[key] for accs in per_seed.values()]
        assert seeds[key]["values"] == values and seeds[key]["n"] == 2
        assert seeds[key]["mean"] == pytest.approx(statistics.fmean(values))
        assert seeds[key]["std"] == pytest.approx(statistics.stdev(values))
        assert f"| {name} | {statistics.fmean(values):.4f} +- {statistics.stdev(values):.4f} | 2 |" in md
    assert "train_time_s" not in seeds["ensemble"] and "train_time_s" in seeds["teacher_2"]

    expected = [{"dir": d, **{gap: accs[a] - accs[b] for gap, (a, b) in GAPS.items()}} for d, accs in per_seed.items()]
    assert results["paired_gaps"] == [pytest.approx(row) for row in expected]
    for gap in GAPS:
        values = [row[gap] for row in expected]
        assert seeds[gap]["values"] == pytest.approx(values)
        assert seeds[gap]["mean"] == pytest.approx(statistics.fmean(values))
        assert seeds[gap]["std"] == pytest.approx(statistics.stdev(values))
    kd_ens = [row["kd_ensemble_minus_kd"] for row in expected]
    assert (f"| KD (ensemble) minus KD student | {statistics.fmean(kd_ens):+.4f} +- "
            f"{statistics.stdev(kd_ens):.4f} | 2 | |") in md
    assert "Paired gaps per seed" in md
    for row in expected:
        assert f"| {row['dir']} | " + " | ".join(f"{row[g]:+.4f}" for g in GAPS) + " |" in md
    assert json.loads((run_dir / "report" / "results.json").read_text())["paired_gaps"] == results["paired_gaps"]
    # the run dir has no runs of its own: the single-run rows (and curves) are the first seed's
    assert results["student_kd_ensemble"]["test_acc"] == per_seed["seeds/1"]["student_kd_ensemble"]


def test_without_the_ensemble_the_report_is_that_of_one_teacher(ensemble_runs: Path, tmp_path: Path) -> None:
    """The same real runs less teacher-2 and the ensemble's student: the report of one teacher,
    its rows, keys and plot as before ensembles (tests/test_report.py checks the bytes)."""
    run_dir = tmp_path / "run"
    shutil.copytree(ensemble_runs, run_dir)
    for seed in (1, 2):
        for d in ("teacher-2", "teacher-logits-2", "student-kd-ensemble", "report"):
            shutil.rmtree(run_dir / "seeds" / str(seed) / d)
    results, md = report(run_dir)
    assert set(results) == {"teacher", "student_normal", "student_kd", "kd_minus_normal", "config", "seeds",
                            "sweep", "variants", "machines"}
    assert set(results["seeds"]) == {"teacher", "student_normal", "student_kd", "kd_minus_normal"}
    assert "nsemble" not in md and "Paired gaps" not in md and "Teacher 2" not in md
    with Image.open(run_dir / "report" / "final_accuracy.png") as im:
        assert im.size[0] < 800
