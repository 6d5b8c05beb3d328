"""benchmarks/ensemble.py's core at its smallest size: its figures are real measurements."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import ensemble as bench
from benchmarks import gpu_summary

TINY = ["model.teacher_width=4", "model.teacher_hidden=8", "model.student_width=2", "model.student_hidden=8",
        "optim.batch_size=32", "train.eval_batch_size=64", "kd.views=1", "data.loader=torch", "train.threads=1"]


@pytest.mark.fast
def test_ensemble_benchmark_core(tmp_path: Path) -> None:
    r = bench.run(tmp_path, train_images=64, test_images=32, repeats=1, epochs=2, sizes=(1, 3), overrides=TINY)
    rows = {row["n"]: row for row in r["rows"]}
    assert sorted(rows) == [1, 3]
    # one cache per member, each views x samples x classes fp16 (+ the .npy header): linear in N
    per_member = rows[1]["cache_bytes"]
    assert per_member >= 1 * 64 * 10 * 2
    assert rows[3]["cache_bytes"] == 3 * per_member
    assert [m["bytes"] for m in r["members"]] == [per_member] * 3
    assert rows[1]["cache_build_s"] < rows[3]["cache_build_s"]
    # every figure measured: positive and finite
    for row in r["rows"]:
        for key in ("cache_build_s", "epoch_cached_s", "epoch_live_s", "cached_over_normal", "live_over_normal",
                    "live_over_cached", "cached_setup_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["n"], key, row[key])
    # the combination is timed where the stage makes it: once per ensemble stage, none for one teacher
    assert rows[1]["cached_combine_s"] == 0.0
    assert rows[3]["cached_combine_s"] > 0
    assert all(len(v) == 1 and v[0] > 0 for v in r["samples"].values())  # epochs after the first, 1 repeat
    assert r["epoch_normal_s"] > 0 and all(t > 0 for t in r["teacher_train_s"])
    text = bench.markdown(r)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 2  # the header, a row per N

    # the GPU check's `ensemble` step: its summary reads the same record back, target by N
    (tmp_path / "check" / "ensemble").mkdir(parents=True)
    (tmp_path / "check" / "ensemble" / "results.json").write_text(json.dumps(r))
    figs = gpu_summary.figures(tmp_path / "check", "ensemble")
    assert figs["device"] == "cpu" and figs["amp"] == r["amp"] in ("off", "bfloat16") and figs["preset"] == "quick"
    for n in (1, 3):
        assert figs[f"cached_{n}_over_normal"] == round(rows[n]["cached_over_normal"], 3)
        assert figs[f"live_{n}_over_normal"] == round(rows[n]["live_over_normal"], 3)
    targets = gpu_summary.targets("ensemble", figs)
    assert [t["figure"] for t in targets] == ["cached_3_over_normal", "cached_5_over_normal"]
    assert targets[0]["met"] == (rows[3]["cached_over_normal"] <= 1.15)
    assert targets[1]["value"] is None and targets[1]["met"] is None  # N = 5 not run here
