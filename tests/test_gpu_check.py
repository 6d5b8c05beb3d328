"""The GPU check's pieces, run on the CPU where the code is shared: `scripts/gpu_check.sh` as a
dry run (what comes back from $OUT, the summary), the preflight that refuses a host lacking
what the pipeline needs, the pipeline record, the seed-gpu preset it runs, and the budgets
of the device calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_summary
from benchmarks.gpu_pipeline import host_syncs, out_name, read_log
from benchmarks.gpu_preflight import parse_requirement, read_requirements, satisfies
from kd_ddp.config import load_config
from tests.conftest import REPO

DRY_STEPS = ["env", "preflight", "cold", "warm", "limit"]
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """`PRESET=smoke STEPS="env preflight cold warm limit" bash scripts/gpu_check.sh` on the CPU,
    on the smoke preset's synthetic data (ARCHIVE=), with budgets for a loaded 2-core machine."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out, work = tmp / "out", tmp / "work"
    env = {**BASE_ENV, "PY": sys.executable, "PRESET": "smoke", "STEPS": " ".join(DRY_STEPS), "OUT": str(out),
           "WORK": str(work), "CACHE": str(tmp / "cache"), "ARCHIVE": "", "BUDGET_S": "1200", "PREFLIGHT_S": "240"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    return out, work, proc


def test_dry_run_brings_back_at_most_8_files_naming_every_step(dry_run) -> None:
    out, _, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # the device tool's limits: 8 files, two folders down at most, names of letters, digits, . _ -
    assert len(files) <= 8 and all(len(Path(f).parts) <= 3 for f in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in Path(f).parts)
    assert set(files) == {"summary.json", "summary.txt", "logs.tar.gz", "pipeline-cpu-cold.json", "pipeline-cpu.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == DRY_STEPS and summary["done"] and not summary["failed_steps"]
    for s in summary["steps"]:
        assert s["status"] == "ok" and s["rc"] == 0 and s["seconds"] > 0 and s["figures"], s
    assert {"torch", "filelock", "submitit", "psutil"} <= set(summary["versions"])
    # the output's tail is the summary (what is left when files are lost)
    assert proc.stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())
    assert all(name in (out / "summary.txt").read_text() for name in DRY_STEPS)


def test_dry_run_figures_are_those_of_the_runs(dry_run) -> None:
    out, work, _ = dry_run
    steps = {s["name"]: s["figures"] for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["preflight"]["ok"] is True
    assert (steps["cold"]["warm_data"], steps["warm"]["warm_data"]) == (False, True)  # as the run logs say
    for name in ("cold", "warm"):
        row = json.loads((out / f"pipeline-cpu{'-cold' if name == 'cold' else ''}.json").read_text())
        results = json.loads((Path(row["run_dir"]) / "report" / "results.json").read_text())
        assert row["card"] == "cpu" and row["nproc"] == 1 and row["cold_requested"] == (name == "cold")
        assert 0 < row["pipeline_s"] < row["wall_s"]  # the in-process timer sits inside the command's
        assert row["teacher_acc"] == results["teacher"]["test_acc"] == steps[name]["teacher_acc"]
        assert row["student_normal_acc"] == results["student_normal"]["test_acc"]
        assert row["student_kd_acc"] == results["student_kd"]["test_acc"]
        assert set(row["time_legend"]) >= {"wall_s", "pipeline_s", "stages.*.train_steps_s", "stages.*.eval_s"}
        for stage in row["stages"].values():
            assert stage["backend"] == "none"  # one rank under torchrun: no process group, as on one GPU
            assert stage["train_steps_s"] + stage["eval_s"] == pytest.approx(stage["train_time_s"], abs=0.01)
            # smoke: 512 images / batch 64 = 8 steps, flags read every step on a CPU, no process group:
            # 8 flag reads + the epoch's sums, the evaluation's, the checkpoint
            assert stage["host_syncs"]["steps"] == 8 and stage["host_syncs"]["check_every"] == 1
            assert stage["host_syncs_per_epoch"] == 8 + 3
    assert set(steps["limit"]["real_over_in_memory"]) == {"teacher", "student-normal", "student-kd"}


def test_dry_run_archive_holds_every_log_and_no_weights(dry_run) -> None:
    out, _, _ = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"gpu-check/logs/{s}.log" for s in DRY_STEPS} <= set(names)
    assert {"gpu-check/preflight.json", "gpu-check/env.json", "gpu-check/limit/results.json"} <= set(names)
    assert any(n.endswith("/report/results.json") for n in names)
    assert not [n for n in names if n.endswith((".pt", ".npy", ".beton", ".lock"))]


# -- the preflight ----------------------------------------------------------------------


def preflight(env_extra: dict[str, str], *args: str, isolated: bool = False) -> tuple[int, str, float]:
    cmd = [sys.executable, *(["-S"] if isolated else []), "-m", "benchmarks.gpu_preflight", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**BASE_ENV, "PYTHONPATH": str(REPO), **env_extra},
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def test_preflight_names_a_missing_package(tmp_path: Path) -> None:
    """submitit really absent: a site dir holding every entry of this venv's but submitit's,
    with Python's own site-packages off (-S)."""
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "submitit").is_dir())
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith("submitit"):
            (view / entry.name).symlink_to(entry)
    rc, output, _ = preflight({"PYTHONPATH": f"{view}:{REPO}"}, "--deadline", "300", isolated=True)
    assert rc == 1, output
    assert re.search(r"FAIL submitit .* missing", output), output
    assert "module launch.slurm does not import: ModuleNotFoundError: No module named 'submitit'" in output
    assert output.rstrip().splitlines()[-1].startswith("preflight: FAILED: submitit missing")


@pytest.fixture(scope="module")
def old_filelock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real filelock 3.12 wheel, from PyPI (skipped where the registry cannot be reached)."""
    where = tmp_path_factory.mktemp("old-filelock")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "filelock==3.12.4", "-d",
                           str(where)], capture_output=True, text=True, timeout=180)
    wheels = list(where.glob("filelock-3.12.4-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot download filelock 3.12.4 from PyPI: {proc.stderr.strip()[-300:]}")
    return wheels[0]


def test_preflight_refuses_an_old_filelock(old_filelock: Path) -> None:
    """The wheel first on the path (imported from the zip): its version is below pyproject.toml's
    range and kd_ddp.locks' own lock call fails with it, before anything long would start."""
    rc, output, _ = preflight({"PYTHONPATH": f"{old_filelock}:{REPO}"}, "--deadline", "300")
    assert rc == 1, output
    assert "filelock 3.12.4 is outside pyproject.toml's range >=4.3" in output
    assert "FAIL lock arguments: kd_ddp.locks cannot take its locks with this filelock: TypeError" in output
    assert "unexpected keyword argument" in output


def test_preflight_gives_up_at_its_deadline_naming_what_it_was_doing() -> None:
    rc, output, seconds = preflight({}, "--deadline", "1")
    assert rc == 1 and "deadline of 1 s passed while importing" in output, output
    assert seconds < 30


@pytest.mark.fast
def test_version_ranges_read_as_pyproject_means_them() -> None:
    assert parse_requirement("submitit>=1.5.1,<2") == ("submitit", ">=1.5.1,<2")
    assert parse_requirement("kd-ddp[ffcv] >= 1.0 ; python_version>'3'") == ("kd-ddp", ">=1.0")
    assert satisfies("2.11.0+cu130", ">=2.11") and not satisfies("2.10.1", ">=2.11")
    assert satisfies("1.5.4", ">=1.5.1,<2") and not satisfies("2.0", ">=1.5.1,<2")
    assert not satisfies("3.12.4", ">=4.3") and satisfies("4.3.1", ">=4.3")
    reqs = dict(read_requirements())
    assert reqs["filelock"] == ">=4.3" and reqs["torchvision"] and "ffcv" in reqs  # the extras the check uses


# -- the summary and the record, in-process -----------------------------------------------


@pytest.mark.fast
def test_host_syncs_of_an_epoch_follow_the_loop() -> None:
    # seed-gpu on one GPU: 50,000 / 1024 = 48 steps, flags every 50 steps: one check per epoch
    one_gpu = host_syncs(48, 50, process_group=True)
    assert one_gpu["per_epoch"] == 1 + 1 + 1 + 1 + 1 + 1
    assert host_syncs(97, 50, process_group=False)["per_epoch"] == 2 + 3
    facts = read_log("x [rank0] preparing cifar10 data from A into B\n"
                     "teacher: 30 epochs x 48 steps, global batch 1024 on 1 rank(s) (process group: nccl), device "
                     "cuda:0, amp bf16, loader device, flags read every 50 step(s)\npipeline finished in 41.5 s\n")
    assert facts["pipeline_s"] == 41.5 and facts["warm_data"] is False
    assert facts["stages"]["teacher"]["host_syncs"] == one_gpu
    assert read_log("prepared data found in /c\n")["warm_data"] is True and read_log("")["warm_data"] is None


@pytest.mark.fast
def test_record_is_named_by_what_was_asked_not_by_what_was_found() -> None:
    row = {"card": "nvidia-h200", "nproc": 1, "cold_requested": False, "warm_data": False}
    assert out_name(row) == "pipeline-nvidia-h200.json"  # a warm run that found no data keeps its name
    cold_on_two = {**row, "cold_requested": True, "nproc": 2}
    assert out_name(cold_on_two, "strong") == "pipeline-nvidia-h200-strong-2gpu-cold.json"


@pytest.mark.fast
def test_summary_of_a_call_killed_mid_step_says_what_was_done(tmp_path: Path) -> None:
    """A call stopped during `warm`: the steps before it keep their figures, `warm` reads as
    running with its log's last lines, and OUT holds the summary files alone."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    t = time.time() - 100
    events = [("env", "start", t, None), ("env", "end", t + 3, 0), ("preflight", "start", t + 3, None),
              ("preflight", "end", t + 9, 0), ("warm", "start", t + 9, None)]
    (work / "steps.jsonl").write_text("".join(
        json.dumps({"step": n, "event": e, "t": at, "limit_s": 60, "rc": rc}) + "\n" for n, e, at, rc in events))
    (work / "preflight.json").write_text(json.dumps({"ok": True, "problems": [], "versions": {"filelock": "4.3.1"}}))
    (work / "logs" / "warm.log").write_text("teacher epoch 3/30\nteacher epoch 4/30\n")
    run = work / "runs" / "pipeline-seed-gpu-1"
    (run / "teacher-logits").mkdir(parents=True)
    for name in ("teacher-logits/.logits.npy.tmp-ab12", "checkpoint.pt", ".kd-ddp.lock", "metrics.jsonl"):
        (run / name).write_bytes(b"x")  # what the killed run left: its weights and partial logits stay behind
    gpu_summary.main(["--work", str(work), "--out", str(out), "--preset", "seed-gpu", "--archive"])
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("env", "ok"), ("preflight", "ok"),
                                                                    ("warm", "running")]
    assert summary["steps"][0]["seconds"] == 3.0 and summary["steps"][2]["log_tail"][-1] == "teacher epoch 4/30"
    assert summary["versions"] == {"filelock": "4.3.1"} and not summary["done"]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        files = {n for n in tar.getnames() if tar.getmember(n).isfile()}
    assert files == {"gpu-check/steps.jsonl", "gpu-check/preflight.json", "gpu-check/logs/warm.log",
                     "gpu-check/runs/pipeline-seed-gpu-1/metrics.jsonl"}
    assert "warm" in (out / "summary.txt").read_text() and "NOT done" in (out / "summary.txt").read_text()


@pytest.mark.fast
def test_device_calls_fit_the_session_with_a_rerun() -> None:
    """docs/gpu.md's calls: the default one and its rerun, and the strong one, within 15 minutes
    of device time with the machine's start (2 min) and a minute for transfers; each call's
    timeout leaves its script 30 s past its budget (a step's SIGKILL grace, the summary)."""
    doc = (REPO / "docs" / "gpu.md").read_text()
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    budget = int(re.search(r"BUDGET_S=\$\{BUDGET_S:-(\d+)\}", script).group(1))
    default = int(re.search(r'run\(command="OUT=\$OUT bash scripts/gpu_check.sh", carry=\[".gpu"\], '
                            r"timeout_s=(\d+)\)", doc).group(1))
    strong = re.search(r'run\(command="STEPS=\\?"preflight strong\\?" BUDGET_S=(\d+) OUT=\$OUT bash '
                       r'scripts/gpu_check.sh", carry=\[".gpu"\], timeout_s=(\d+)\)', doc)
    assert strong, "docs/gpu.md names the strong call"
    strong_budget, strong_timeout = map(int, strong.groups())
    assert default >= budget + 30 and strong_timeout >= strong_budget + 30
    assert 120 + 2 * default + strong_timeout + 60 <= 15 * 60


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
