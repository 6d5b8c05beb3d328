"""W&B tracking, read back from the real offline `.wandb` logs, and the W&B report spec.

No mocks and no network: the subprocesses run with no API key, HOME and the XDG dirs in
a sandbox, and WANDB_BASE_URL / proxies pointing at a closed port, so a stray network
call would fail (and show up as missing runs) instead of reaching a server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kd_ddp.config import load_config
from kd_ddp.tracking import TRAIN_STAGES, group_name
from tests.conftest import fake_stage

REPO = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connect fails at once


def sandbox(root: Path) -> tuple[dict[str, str], Path]:
    """(env, cwd) of a user with an empty home and no W&B credentials or settings."""
    home, cwd, tmp = root / "home", root / "cwd", root / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_")) and k != "NETRC"}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO), "WANDB_BASE_URL": CLOSED,
            "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED, "NO_PROXY": ""}
    return env, cwd


def kd_ddp(args: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "kd_ddp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"kd-ddp {args} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def read_wandb_run(run_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """One offline run from its transaction log via `wandb leet inspect --json`."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_path)],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    summary: dict[str, Any] = {}
    for r in records:
        if r["type"] == "summary":
            summary |= r["summary"].get("update", {})
    return {"run": run, "config": run["config"]["update"], "summary": summary,
            "history": [r["history"] for r in records if r["type"] == "history"],
            "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"], "path": run_path}


def wandb_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "wandb" in p.name.lower()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("wandb-sandbox")
    env, cwd = sandbox(root)
    run_dir = root / "run"
    kd_ddp(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], env, cwd)
    runs = [read_wandb_run(p, env) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]
    return {"root": root, "env": env, "cwd": cwd, "run_dir": run_dir,
            "runs": {r["run"]["job_type"]: r for r in runs}, "n_runs": len(runs)}


def test_pipeline_offline_runs_read_back(pipeline: dict[str, Any]) -> None:
    run_dir, runs = pipeline["run_dir"], pipeline["runs"]
    assert pipeline["n_runs"] == 4 and set(runs) == {*TRAIN_STAGES, "report"}
    group = group_name(load_config("smoke", [f"run.dir={run_dir}"]))
    assert {r["run"]["run_group"] for r in runs.values()} == {group}

    resolved = json.loads((run_dir / "config.pipeline.json").read_text())
    for stage in TRAIN_STAGES:
        r = runs[stage]
        assert r["run"]["display_name"] == stage
        assert {k: r["config"][k] for k in resolved} == resolved  # the full resolved config
        system = r["config"]["system"]
        assert system["device"] == "cpu" and system["world_size"] == 1 and system["precision"] in ("fp32", "bf16")
        assert system["versions"]["torch"] and system["versions"]["wandb"]
        # Per-epoch history, epoch = step, the very values of metrics.jsonl.
        metrics = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"]["num"] for h in r["history"]] == [m["epoch"] for m in metrics]
        assert [{k: h["item"][k] for k in m} for h, m in zip(r["history"], metrics, strict=True)] == metrics
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        for key in ("test_acc", "train_time_s", "images_per_s", "amp", "world_size"):
            assert r["summary"][key] == summary[key]
        # Checkpoints by reference: a file:// URI into the run dir, nothing copied.
        refs = {c["path"]: c["ref"] for a in r["artifacts"] for c in a["manifest"]["contents"]}
        assert refs["checkpoint.pt"] == f"file://{(run_dir / stage / 'checkpoint.pt').resolve()}"
    kd_refs = {c["path"]: c["ref"] for a in runs["student-kd"]["artifacts"] for c in a["manifest"]["contents"]}
    assert kd_refs["manifest.json"] == f"file://{(run_dir / 'teacher-logits' / 'manifest.json').resolve()}"

    (item,) = [h["item"] for h in runs["report"]["history"]]
    for plot in ("test_acc", "train_loss", "final_accuracy"):
        assert item[f"plots/{plot}._type"] == "image-file"
        assert (runs["report"]["path"] / "files" / item[f"plots/{plot}.path"]).is_file()


def test_pipeline_writes_nothing_outside_the_run_dir(pipeline: dict[str, Any]) -> None:
    root = pipeline["root"]
    assert not list(pipeline["cwd"].iterdir())
    assert wandb_files(root / "home") == [] and wandb_files(root / "tmp") == []
    assert (pipeline["run_dir"] / "wandb" / "cache").is_dir()  # WANDB_CACHE_DIR went there


def test_wandb_report_spec_offline(tmp_path: Path) -> None:
    env, cwd = sandbox(tmp_path)
    run_dir = tmp_path / "run"
    for i, base in enumerate((run_dir, run_dir / "seeds" / "1", run_dir / "seeds" / "2")):
        for stage, acc in zip(TRAIN_STAGES, (0.9, 0.5, 0.6), strict=True):
            fake_stage(base, stage, acc + 0.01 * i, {"alpha": 0.5, "temperature": 4.0})
    for alpha in (0.3, 0.7):
        for temp in (2.0, 4.0):
            fake_stage(run_dir / "sweep" / f"a{alpha}-T{temp}", "student-kd", alpha / 2 + temp / 10,
                       {"alpha": alpha, "temperature": temp})
    kd_ddp(["report", "--wandb-report", "--preset", "smoke", f"run.dir={run_dir}", "tracking.wandb.mode=disabled"],
           env, cwd)

    out = run_dir / "report"
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"]["student_kd"]["n"] == 3 and len(results["sweep"]) == 4
    md = (out / "report.md").read_text()
    assert "0.6100 +- 0.0100 | 3" in md and "## KD sweep" in md and "kd_sweep.png" in md
    assert (out / "kd_sweep.png").stat().st_size > 0 and not list((run_dir / "wandb").glob("*run-*"))

    doc = json.loads((out / "wandb_report.json").read_text())
    group = group_name(load_config("smoke", [f"run.dir={run_dir}"]))
    assert doc["group"] == group and doc["project"] == "kd-ddp"
    blocks = doc["viewspec"]["spec"]["blocks"]
    markdown = [b["content"] for b in blocks if b["type"] == "markdown-block"]
    assert any("| Student (KD) | 0.6000 |" in m for m in markdown)
    main, sweep = [b["metadata"] for b in blocks if b["type"] == "panel-grid"]
    for grid in (main, sweep):
        filters = grid["runSets"][0]["filters"]["filters"]
        assert {"key": {"section": "run", "name": "group"}, "op": "=", "value": group} in [
            {k: f[k] for k in ("key", "op", "value")} for f in filters]
    assert main["runSets"][0]["grouping"] == [{"section": "run", "name": "jobType"}]  # seeds: mean per stage

    def panels(grid: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(p["viewType"], p["config"].get("metrics") or [c["accessor"] for c in p["config"].get("columns", [])]
                 or [p["config"][a] for a in ("xAxis", "yAxis", "zAxis")])
                for p in grid["panelBankSectionConfig"]["panels"]]

    assert panels(main) == [("Run History Line Plot", ["test_acc"]), ("Run History Line Plot", ["train_loss"]),
                            ("Run History Line Plot", ["test_loss"]), ("Bar Chart", ["test_acc"])]
    assert all(p["config"]["xAxis"] == "epoch" for p in main["panelBankSectionConfig"]["panels"][:3])
    kd_axes = ["config:kd.value.alpha", "config:kd.value.temperature", "summary:test_acc"]
    assert panels(sweep) == [("Parallel Coordinates Plot", kd_axes), ("Scatter Plot", kd_axes),
                             ("Run History Line Plot", ["test_acc"])]
    assert wandb_files(tmp_path / "home") == [] and not list(cwd.iterdir())


def test_online_without_api_key_fails_at_start(tmp_path: Path, cache_dir: Path) -> None:
    env, cwd = sandbox(tmp_path)
    run_dir = tmp_path / "run"
    proc = kd_ddp(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
                   "tracking.wandb.mode=online"], env, cwd, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no W&B API key" in proc.stderr and "WANDB_API_KEY" in proc.stderr
    assert not (run_dir / "teacher").exists()  # failed before any training
