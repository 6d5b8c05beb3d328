"""W&B tracking, read back from the real offline `.wandb` logs, and the W&B report spec.

No mocks and no network: the subprocesses run with no API key, HOME and the XDG dirs in
a sandbox, and WANDB_BASE_URL / proxies pointing at a closed port, so a stray network
call would fail (and show up as missing runs) instead of reaching a server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kd_ddp.config import load_config
from kd_ddp.metrics_io import read_metrics
from kd_ddp.stages import TRAINED
from kd_ddp.tracking import file_uri, group_name
from tests.conftest import REPO, assert_user_error, fake_stage, torchrun_cmd

TRAIN_STAGES = tuple(s.name for s in TRAINED)

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connect fails at once
# A run dir name that a URL would misread: a space, `#` (fragment), `%41` ("A" once
# unquoted) and `?` (query). Unquoted file:// references into it made W&B fail.
AWKWARD_NAME = "run #1 %41?x"


def sandbox(root: Path) -> tuple[dict[str, str], Path]:
    """(env, cwd) of a user with an empty home and no W&B credentials or settings."""
    home, cwd, tmp = root / "home", root / "cwd", root / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_")) and k != "NETRC"}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO), "WANDB_BASE_URL": CLOSED,
            "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED, "NO_PROXY": ""}
    return env, cwd


def kd_ddp(args: list[str], env: dict[str, str], cwd: Path, check: bool = True,
           torchrun: int = 0) -> subprocess.CompletedProcess[str]:
    """`kd-ddp ARGS` in the sandbox, or under torchrun with `torchrun` processes."""
    proc = subprocess.run(torchrun_cmd(torchrun, ["-m", "kd_ddp", *args]), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600 if torchrun else 300)
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
            "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"],
            "exits": [r["exit"] for r in records if r["type"] == "exit"], "path": run_path}


def read_wandb_runs(run_dir: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every offline run under `run_dir`, by job type (stage); two of one stage fail."""
    runs = [read_wandb_run(p, env) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]
    by_stage = {r["run"]["job_type"]: r for r in runs}
    assert len(by_stage) == len(runs), [r["run"]["job_type"] for r in runs]
    return by_stage


def wandb_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "wandb" in p.name.lower()]


def assert_history_is(run: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """The run's history: one row per record, epoch = step, the records' very values."""
    assert [h["step"]["num"] for h in run["history"]] == [m["epoch"] for m in metrics]
    assert [{k: h["item"][k] for k in m} for h, m in zip(run["history"], metrics, strict=True)] == metrics


def referenced_files(run: dict[str, Any]) -> dict[str, Path]:
    """Each artifact entry's name -> the local file its file:// reference resolves to, as
    wandb resolves it (url2pathname of the parsed URL's path)."""
    from wandb.util import local_file_uri_to_path

    return {c["path"]: Path(local_file_uri_to_path(c["ref"])) for a in run["artifacts"]
            for c in a["manifest"]["contents"]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("wandb-sandbox")
    env, cwd = sandbox(root)
    run_dir = root / "run"
    kd_ddp(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], env, cwd)
    runs = read_wandb_runs(run_dir, env)
    return {"root": root, "env": env, "cwd": cwd, "run_dir": run_dir, "runs": runs, "n_runs": len(runs)}


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
        assert system["device"] == "cpu" and system["world_size"] == 1 and system["precision"] in ("off", "bfloat16")
        assert system["versions"]["torch"] and system["versions"]["wandb"]
        assert_history_is(r, read_metrics(run_dir / stage / "metrics.jsonl"))  # epoch = step, the records' values
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


def test_torchrun_pipeline_in_an_awkward_run_dir_keeps_every_run(tmp_path: Path, cache_dir: Path) -> None:
    """The issue's case: under torchrun x2 (ranks end with os._exit) in a run dir whose name
    a URL would misread, every stage's run is made, finished and read back whole."""
    env, cwd = sandbox(tmp_path)
    run_dir = tmp_path / AWKWARD_NAME
    proc = kd_ddp(["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"], env, cwd,
                  torchrun=2)
    assert "W&B" not in "".join(line for line in proc.stderr.splitlines(True) if "failed" in line), proc.stderr

    runs = read_wandb_runs(run_dir, env)
    assert set(runs) == {*TRAIN_STAGES, "report"}
    for stage, r in runs.items():
        assert [e.get("exit_code", 0) for e in r["exits"]] == [0], stage  # finished, not cut off
    for stage in TRAIN_STAGES:
        r = runs[stage]
        assert r["config"]["system"]["world_size"] == 2
        assert_history_is(r, read_metrics(run_dir / stage / "metrics.jsonl"))
        assert r["summary"]["test_acc"] == json.loads((run_dir / stage / "summary.json").read_text())["test_acc"]
        files = referenced_files(r)  # the references lead back to the very files
        assert files == {name: (run_dir / stage / name).resolve() for name in ("checkpoint.pt", "summary.json")} | (
            {name: (run_dir / "teacher-logits" / name).resolve() for name in ("manifest.json", "logits.npy")}
            if stage == "student-kd" else {})
    (item,) = [h["item"] for h in runs["report"]["history"]]
    assert (runs["report"]["path"] / "files" / item["plots/test_acc.path"]).is_file()

    assert not [p for p in run_dir.rglob(".*.tmp*")]  # no half-written file (checkpoint.atomic_output)
    assert not list(cwd.iterdir()) and wandb_files(tmp_path / "home") == []


# One process, the tracker as train.py drives it: the teacher's second record is one W&B
# cannot serialise (a real failure of run.log), then a student's run is left open and the
# process ends through distributed.end_process, as a torchrun rank does.
FAILURE_THEN_OPEN_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path

    from kd_ddp import distributed, tracking
    from kd_ddp.config import load_config
    from kd_ddp.distributed import DistEnv

    cfg = load_config("smoke", [f"run.dir={sys.argv[1]}"])
    teacher = tracking.start_stage(cfg, "teacher", DistEnv())
    teacher.log_epoch({"epoch": 1, "train_loss": 2.0})
    teacher.log_epoch({"epoch": 2, "train_loss": object()})
    teacher.log_epoch({"epoch": 3, "train_loss": 1.0})
    teacher.finish({"test_acc": 0.5})
    student = tracking.start_stage(cfg, "student-normal", DistEnv())
    student.log_epoch({"epoch": 1, "train_loss": 1.5})
    distributed.end_process(0)
""")


def test_runs_finished_after_a_failure_and_at_end_process(tmp_path: Path) -> None:
    env, cwd = sandbox(tmp_path)
    run_dir = tmp_path / AWKWARD_NAME
    proc = subprocess.run([sys.executable, "-c", FAILURE_THEN_OPEN_RUN, str(run_dir)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "W&B teacher log failed (TypeError" in proc.stderr
    assert "W&B run 'student-normal' was still open at exit; finishing it" in proc.stderr

    runs = read_wandb_runs(run_dir, env)
    assert set(runs) == {"teacher", "student-normal"}  # the failure did not stop the next stage's run
    for r in runs.values():
        assert [e.get("exit_code", 0) for e in r["exits"]] == [0]
    # The teacher logs nothing after its failure (epoch 3, summary), but its run is finished.
    assert_history_is(runs["teacher"], [{"epoch": 1, "train_loss": 2.0}])
    assert "test_acc" not in runs["teacher"]["summary"]
    assert_history_is(runs["student-normal"], [{"epoch": 1, "train_loss": 1.5}])


@pytest.mark.fast
def test_file_uri_quotes_what_a_url_would_misread(tmp_path: Path) -> None:
    from wandb.util import local_file_uri_to_path  # how wandb reads a file:// reference back

    path = tmp_path / AWKWARD_NAME / "summary.json"
    uri = file_uri(path)
    assert uri == "file://" + str(path.resolve()).replace(" ", "%20").replace("#", "%23").replace(
        "%41", "%2541").replace("?", "%3F")
    assert Path(local_file_uri_to_path(uri)) == path.resolve()
    assert Path(local_file_uri_to_path(f"file://{path}")) == tmp_path / "run "  # unquoted: cut at "#"
    plain = tmp_path / "run-1_x.y~" / "summary.json"  # a usual name is left as it was
    assert file_uri(plain) == f"file://{plain.resolve()}"


def test_artifact_reference_into_an_awkward_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb makes the reference's manifest entry from that file, and its loader finds that
    file again by the reference, not a neighbour. (Not fast: wandb's artifact cache starts a
    subprocess to read the umask.)"""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb" / var.lower()))
    import wandb
    from wandb.sdk.artifacts.storage_handlers.local_file_handler import LocalFileHandler

    target, decoy = tmp_path / AWKWARD_NAME / "summary.json", tmp_path / "run #1 A?x" / "summary.json"
    for path, acc in ((target, 0.5), (decoy, 0.1)):  # decoy: where "%41" unquoted twice would lead
        path.parent.mkdir()
        path.write_text(json.dumps({"test_acc": acc}))
    art = wandb.Artifact("checkpoint", type="model")
    with pytest.raises(ValueError, match="must be a valid file"):
        art.add_reference(f"file://{target}")  # unquoted: the error
    (entry,) = art.add_reference(file_uri(target), name="summary.json")
    assert entry.ref == file_uri(target) and entry.size == target.stat().st_size
    # wandb's own loader finds the file by the reference and checks its digest against it.
    assert json.loads(Path(LocalFileHandler().load_path(entry)).read_text()) == {"test_acc": 0.5}


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
    assert_user_error(proc, "no W&B API key", "WANDB_API_KEY")
    assert not (run_dir / "teacher").exists()  # failed before any training


def test_wandb_report_spec_of_an_ensemble(tmp_path: Path, ensemble_runs: Path) -> None:
    """Real ensemble runs (kd.ensemble=2, two seeds): the comparison takes the ensemble's stages,
    the table has each teacher's row, the ensemble's and its KD student's, and a runset of the
    ensemble's KD student shows the ensemble's own accuracy beside the student's."""
    env, cwd = sandbox(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(ensemble_runs, run_dir)
    kd_ddp(["report", "--wandb-report", "--preset", "smoke", f"run.dir={run_dir}", "tracking.wandb.mode=disabled",
            "kd.ensemble=2"], env, cwd)

    seeds = json.loads((run_dir / "report" / "results.json").read_text())["seeds"]
    ensemble_accs = [json.loads((run_dir / "seeds" / s / "student-kd-ensemble" / "summary.json").read_text())
                     ["ensemble"]["test_acc"] for s in ("1", "2")]
    assert seeds["ensemble"]["values"] == ensemble_accs
    doc = json.loads((run_dir / "report" / "wandb_report.json").read_text())
    blocks = doc["viewspec"]["spec"]["blocks"]
    (table, members) = [b["content"] for b in blocks if b["type"] == "markdown-block"]
    for key, name in (("teacher", "Teacher (CE)"), ("teacher_2", "Teacher 2 (CE)"),
                      ("ensemble", "Ensemble of teachers"), ("student_normal", "Student (MSE, normal)"),
                      ("student_kd", "Student (KD)"), ("student_kd_ensemble", "Student (KD, ensemble)")):
        assert f"| {name} | {seeds[key]['mean']:.4f} +- {seeds[key]['std']:.4f} | 2 |" in table
    gap = seeds["kd_ensemble_minus_kd"]
    assert f"| KD (ensemble) minus KD student | {gap['mean']:+.4f} +- {gap['std']:.4f} | 2 | |" in table
    assert "Paired gaps per seed" in table and "| teacher-2 |" in members
    assert any(b["type"] == "heading" and b["children"][0]["text"] == "Ensemble of 2 teachers" for b in blocks)

    main, ens = [b["metadata"] for b in blocks if b["type"] == "panel-grid"]
    filters = {f["key"]["name"]: (f["op"], f["value"]) for f in main["runSets"][0]["filters"]["filters"]}
    assert filters["jobType"] == ("IN", ["teacher", "teacher-2", "student-normal", "student-kd",
                                         "student-kd-ensemble"])
    filters = {f["key"]["name"]: (f["op"], f["value"]) for f in ens["runSets"][0]["filters"]["filters"]}
    assert filters["jobType"] == ("=", "student-kd-ensemble") and filters["group"] == ("=", doc["group"])
    assert [(p["viewType"], p["config"]["metrics"]) for p in ens["panelBankSectionConfig"]["panels"]] == [
        ("Bar Chart", ["ensemble.test_acc", "test_acc"])]
    assert wandb_files(tmp_path / "home") == [] and not list(cwd.iterdir())
