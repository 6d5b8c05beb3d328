"""The Slurm launchers against a real Slurm: the dev cluster of slurm/dev-cluster, no mocks.

A session fixture starts a private cluster (slurmctld, slurmd, slurmdbd + MariaDB) in a tmp
STATE_DIR and stops it at the end. Every job is the smoke preset on synthetic data. The
launcher's parts that need no cluster are tested where Slurm is missing too:
tests/test_slurm_plan.py (the planner), tests/test_slurm_submit.py (the watcher's rules).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launch import ports
from tests.conftest import REPO, assert_user_error

DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
SLURM_BINARIES = ("sbatch", "srun", "scontrol", "sacct", "slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")
MISSING = [b for b in SLURM_BINARIES if shutil.which(b) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Slurm is not installed (missing {', '.join(MISSING)}); "
                          "slurm/dev-cluster/install.sh installs it")

# torch loader: no FFCV JIT in every job; no W&B: nothing to do with Slurm.
COMMON = ["data.loader=torch", "tracking.wandb.mode=disabled", "tracking.progress=false"]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for Slurm commands and the launcher, with a dev cluster running."""
    state = tmp_path_factory.mktemp("slurm-state")
    start = subprocess.run([str(DEV_CLUSTER / "start.sh"), str(state)], capture_output=True, text=True,
                           timeout=300)
    if start.returncode != 0:
        pytest.fail(f"slurm/dev-cluster/start.sh failed:\n{start.stderr[-6000:]}")
    env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf"), "PYTHONPATH": str(REPO)}
    try:
        yield env
    finally:
        stop = subprocess.run([str(DEV_CLUSTER / "stop.sh"), str(state)], capture_output=True, text=True,
                              timeout=300)
        assert stop.returncode == 0, stop.stderr[-3000:]


# -- helpers ----------------------------------------------------------------------------


def slurm(env: dict[str, str], *cmd: str) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def launch(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_until(what: str, check: Callable[[], Any], timeout: float, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_record(run_dir: Path, kind: str = "pipeline") -> dict[str, Any] | None:
    found = sorted((run_dir / "slurm").glob(f"{kind}-*.json"))
    return json.loads(found[-1].read_text()) if found else None


def sacct_states(env: dict[str, str], job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (job name, state) of every job and array task, allocations only."""
    out = slurm(env, "sacct", "-X", "-n", "-P", "-o", "JobID,JobName,State", "-j", ",".join(job_ids))
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1], r[2].split()[0]) for r in rows}


def job_fields(env: dict[str, str], job_id: str) -> dict[str, str]:
    line = slurm(env, "scontrol", "show", "job", "-o", job_id).splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


def by_key(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["key"]: j for j in record["jobs"]}


def common(run_dir: Path, cache_dir: Path) -> list[str]:
    return [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *COMMON]


# -- the pipeline: a chain of jobs, one of them with 2 tasks -----------------------------


@dataclass
class PipelineRun:
    proc: subprocess.CompletedProcess[str]
    run_dir: Path
    record: dict[str, Any]
    pending: dict[str, dict[str, str]]  # `scontrol show job` of every job while the chain was held
    busy_ports: list[int]  # held by the test while the 2-task teacher ran


def occupy(port: int) -> socket.socket:
    """A listening socket on `port` (every address), as another job's server on the node would hold it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", port))
    s.listen()
    return s


@pytest.fixture(scope="module")
def pipeline_run(slurm_env: dict[str, str], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[PipelineRun]:
    """The smoke pipeline through `launch.slurm --wait`, submitted held so that the test can
    read every dependency from slurmctld before anything runs; teacher on 2 tasks. Before the
    release, the test occupies the master ports the teacher would try first: launch.ports'
    first candidate for its job id, and the one submitit derives from the job id."""
    run_dir = tmp_path_factory.mktemp("slurm-pipeline")
    cmd = [sys.executable, "-m", "launch.slurm", "pipeline", "--preset", "smoke", "--wait", "--hold",
           "--poll-s", "1", "slurm.teacher.tasks_per_node=2", *common(run_dir, cache_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held: list[socket.socket] = []
    try:
        record = wait_until("the launcher's record", lambda: read_record(run_dir), 120)
        pending = {j["key"]: job_fields(slurm_env, j["job_id"]) for j in record["jobs"]}
        teacher_id = by_key(record)["train-teacher"]["job_id"]
        busy = [next(ports.candidates(int(teacher_id))), random.Random(teacher_id).randint(20000, 60000)]
        held = [occupy(port) for port in busy]
        slurm(slurm_env, "scontrol", "release", by_key(record)["prepare-data"]["job_id"])
        out, err = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
        for sock in held:
            sock.close()
    yield PipelineRun(subprocess.CompletedProcess(cmd, proc.returncode, out, err), run_dir, record, pending, busy)


def test_pipeline_completes_and_writes_report(pipeline_run: PipelineRun) -> None:
    p = pipeline_run
    assert p.proc.returncode == 0, p.proc.stdout + p.proc.stderr
    results = json.loads((p.run_dir / "report" / "results.json").read_text())
    assert {"teacher", "student_normal", "student_kd"} <= set(results)
    assert "pipeline finished" in p.proc.stdout


def test_each_stage_is_its_own_job_with_afterok_dependencies(pipeline_run: PipelineRun,
                                                            slurm_env: dict[str, str]) -> None:
    jobs = by_key(pipeline_run.record)
    assert list(jobs) == ["prepare-data", "train-teacher", "cache-logits", "student-normal", "student-kd", "report"]
    ids = {k: j["job_id"] for k, j in jobs.items()}
    expected = {"prepare-data": [], "train-teacher": ["prepare-data"], "cache-logits": ["train-teacher"],
                "student-normal": ["prepare-data"], "student-kd": ["cache-logits"],
                "report": ["student-normal", "student-kd"]}
    for key, parents in expected.items():
        fields = pipeline_run.pending[key]
        assert fields["JobState"] == "PENDING", (key, fields)
        assert sorted(re.findall(r"afterok:(\d+)", fields["Dependency"])) == sorted(ids[p] for p in parents), key
        assert jobs[key]["depends_on"] == [ids[p] for p in parents]
    assert pipeline_run.pending["prepare-data"]["Reason"] == "JobHeldUser"
    # sacct: every stage a job of its own, named after it, and completed.
    assert sacct_states(slurm_env, list(ids.values())) == {ids[k]: (f"kd-{k}", "COMPLETED") for k in ids}


def test_two_task_job_trains_with_world_size_2(pipeline_run: PipelineRun) -> None:
    teacher = by_key(pipeline_run.record)["train-teacher"]
    assert teacher["tasks"] == 2
    log0 = Path(teacher["log"])
    log1 = log0.with_name(log0.name.replace("_0_log", "_1_log"))
    assert "rank 0 of world size 2" in log0.read_text()
    assert "rank 1 of world size 2" in log1.read_text()  # a second Slurm task, same process group
    assert "on 2 rank(s)" in log0.read_text()
    summary = json.loads((pipeline_run.run_dir / "teacher" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # task/affinity binds each task to its cpus_per_task (1, smoke preset) CPU, its own one,
    # and torch uses as many threads.
    cpus = [rank_cpus(log) for log in (log0, log1)]
    assert [len(c) for c in cpus] == [1, 1] and cpus[0] != cpus[1], cpus
    assert all("with 1 torch threads" in log.read_text() for log in (log0, log1))


def rank_cpus(log: Path) -> list[int]:
    m = re.search(r"ran on CPUs \[([\d, ]+)\] with (\d+) torch threads", log.read_text())
    assert m is not None, log.read_text()[-3000:]
    return [int(c) for c in m.group(1).split(",")]


def test_busy_master_port_does_not_break_the_job(pipeline_run: PipelineRun) -> None:
    """The 2-task teacher ran while the test held the ports it would have used first (a port
    derived from the job id collides now and then with a server on a shared node)."""
    teacher = by_key(pipeline_run.record)["train-teacher"]
    m = re.search(r"master \S+:(\d+)\)", Path(teacher["log"]).read_text())
    assert m is not None
    port = int(m.group(1))
    assert port not in pipeline_run.busy_ports
    assert port < ports.ephemeral_range()[0]  # never one an outgoing connection may hold
    assert pipeline_run.proc.returncode == 0


def test_status_reattaches_to_a_finished_chain(pipeline_run: PipelineRun, slurm_env: dict[str, str]) -> None:
    proc = launch(slurm_env, "status", str(pipeline_run.run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("prepare-data", "train-teacher", "cache-logits", "student-normal", "student-kd", "report"):
        assert re.search(rf"^{key} +job \d+ +COMPLETED", proc.stdout, re.M), proc.stdout
    assert f"pipeline finished: report in {pipeline_run.run_dir / 'report' / 'report.md'}" in proc.stdout


# -- a sweep: one array of KD students --------------------------------------------------


def test_sweep_runs_as_one_array_and_report_lists_every_point(slurm_env: dict[str, str], cache_dir: Path,
                                                              tmp_path: Path) -> None:
    proc = launch(slurm_env, "sweep", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "kd.alpha=0.1,0.9", "seed=0,1", *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path, "sweep")
    assert record is not None
    arrays = [j for j in record["jobs"] if j["array"]]
    assert len(arrays) == 1, "the KD students must be one job array"
    kd = arrays[0]
    names = [a["name"] for a in kd["array"]]
    assert names == ["a0.1-s0", "a0.1-s1", "a0.9-s0", "a0.9-s1"]
    assert [a["job_id"] for a in kd["array"]] == [f"{kd['job_id']}_{i}" for i in range(4)]
    assert kd["job_id"] in by_key(record)["report"]["depends_on_any"]  # the whole array, not one task
    states = sacct_states(slurm_env, [kd["job_id"]])
    assert {states[a["job_id"]][1] for a in kd["array"]} == {"COMPLETED"}

    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert sorted(e["name"] for e in results["sweep"]) == names
    assert "student_normal" in results and "teacher" in results
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert all(name in report_md for name in names)
    # One teacher; a logits cache per seed, each keyed by its seed.
    for seed, d in ((0, tmp_path), (1, tmp_path / "sweep-caches" / "seed1")):
        assert json.loads((d / "teacher-logits" / "manifest.json").read_text())["key"]["seed"] == seed
    for point in kd["array"]:
        summary = json.loads((Path(point["run_dir"]) / "student-kd" / "summary.json").read_text())
        assert summary["kd"]["alpha"] == float(point["name"][1:4])


# -- an ensemble: the teachers as one array ---------------------------------------------


def sacct_times(env: dict[str, str], job_ids: list[str]) -> dict[str, tuple[str, int, int]]:
    """job id -> (state, start, end) in epoch seconds of every job and array task, allocations only."""
    out = slurm(env, "sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(job_ids))
    epoch = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        job_id, state, start, end = line.split("|")
        epoch[job_id] = (state.split()[0], *(int(time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S")))
                                             for t in (start, end)))
    return epoch


def test_ensemble_teachers_run_as_one_array_and_the_cache_waits_for_all(slurm_env: dict[str, str], cache_dir: Path,
                                                                        tmp_path: Path) -> None:
    """kd.ensemble=2: the two teachers are one job array, each task training its own member at
    once; the cache job (every member's cache) starts only after both ended; the ensemble's
    student completes. (The other students and the report: as in the pipeline above; left out
    to keep the test short. Their dependencies: tests/test_slurm_plan.py.)"""
    proc = launch(slurm_env, "pipeline", "--preset", "smoke", "--wait", "--poll-s", "1", "kd.ensemble=2",
                  "--stages", "prepare-data,train-teacher,cache-logits,student-kd-ensemble", "optim.epochs=1",
                  *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    jobs = by_key(record)
    assert list(jobs) == ["prepare-data", "train-teacher", "cache-logits", "student-kd-ensemble"]
    teachers = jobs["train-teacher"]
    array_id = teachers["job_id"]
    assert [(a["name"], a["member"], a["job_id"]) for a in teachers["array"]] == [
        ("teacher", 1, f"{array_id}_0"), ("teacher-2", 2, f"{array_id}_1")]
    assert jobs["cache-logits"]["depends_on"] == [array_id]  # the array's id: afterok on every task
    assert jobs["student-kd-ensemble"]["depends_on"] == [jobs["cache-logits"]["job_id"]]
    assert re.search(rf"^  teacher-2 +job {array_id}_1 +member 2", proc.stdout, re.M), proc.stdout

    task_ids = [a["job_id"] for a in teachers["array"]]
    cache_id = jobs["cache-logits"]["job_id"]
    times = sacct_times(slurm_env, [array_id, cache_id])
    assert {times[t][0] for t in task_ids} == {"COMPLETED"} and times[cache_id][0] == "COMPLETED", times
    (_, start0, end0), (_, start1, end1) = times[task_ids[0]], times[task_ids[1]]
    assert times[cache_id][1] >= max(end0, end1), times  # the cache started after the last teacher ended
    cpus = int(job_fields_node(slurm_env)["CPUTot"])
    if cpus >= 2:  # one CPU per task (smoke preset): both members train at once
        assert start0 < end1 and start1 < end0, times

    # Each task trained its own member alone, and its log says which.
    for a in teachers["array"]:
        log = Path(a["log"]).read_text()
        assert f"kd-ddp train-teacher [{a['name']}]: rank 0 of world size 1" in log, log[-3000:]
        summary = json.loads((Path(a["stage_dir"]) / "summary.json").read_text())
        assert summary["stage"] == a["name"]
    assert (tmp_path / "teacher-logits-2" / "manifest.json").is_file()
    ens = json.loads((tmp_path / "student-kd-ensemble" / "summary.json").read_text())
    assert ens["stage"] == "student-kd-ensemble"
    assert [m["stage"] for m in ens["ensemble"]["members"]] == ["teacher", "teacher-2"]

    status = launch(slurm_env, "status", str(tmp_path))
    assert status.returncode == 0, status.stdout + status.stderr
    for label in ("train-teacher[teacher]", "train-teacher[teacher-2]", "student-kd-ensemble"):
        assert re.search(rf"^{re.escape(label)} +job \S+ +COMPLETED", status.stdout, re.M), status.stdout


def job_fields_node(env: dict[str, str]) -> dict[str, str]:
    """`scontrol show node` of the (first) node."""
    line = slurm(env, "scontrol", "show", "node", "-o").splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


# -- preemption -------------------------------------------------------------------------


def test_preempted_training_job_checkpoints_requeues_and_resumes(slurm_env: dict[str, str], cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    """USR2 (what Slurm sends before preempting or at the time limit): submitit calls
    checkpoint() and requeues. `scontrol requeue`: no signal at all, the job just restarts.
    Both times the stage must resume from its last epoch checkpoint, not from scratch."""
    epochs = 16
    proc = launch(slurm_env, "pipeline", "--stages", "train-teacher", "--preset", "smoke",
                  f"optim.teacher_epochs={epochs}", *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    job = by_key(record)["train-teacher"]
    job_id, log = job["job_id"], Path(job["log"])
    metrics = tmp_path / "teacher" / "metrics.jsonl"

    def epochs_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def resumes() -> list[int]:
        text = log.read_text() if log.is_file() else ""
        return [int(e) for e in re.findall(r"teacher: resuming (?:from|at) epoch (\d+)", text)]

    wait_until("2 teacher epochs", lambda: epochs_done() >= 2, 300, poll=0.1)
    slurm(slurm_env, "scancel", "--signal=USR2", job_id)
    first = wait_until("the resume after USR2", resumes, 180)[0]
    assert 2 <= first <= epochs  # not from scratch

    wait_until("an epoch after the resume", lambda: epochs_done() > first, 120, poll=0.1)
    slurm(slurm_env, "scontrol", "requeue", job_id)
    second = wait_until("the resume after scontrol requeue", lambda: resumes()[1:], 180)[0]
    assert first < second <= epochs  # from the newer checkpoint

    wait_until("the job to complete", lambda: sacct_states(slurm_env, [job_id])[job_id][1] == "COMPLETED", 300, 1)
    text = log.read_text()
    assert "Caught signal SIGUSR2" in text and "interrupted; requeueing" in text
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(1, epochs + 1))
    assert json.loads((tmp_path / "teacher" / "summary.json").read_text())["epochs"] == epochs


# -- failure ----------------------------------------------------------------------------


def test_failed_stage_cancels_its_dependents_and_is_named(slurm_env: dict[str, str], cache_dir: Path,
                                                          tmp_path: Path) -> None:
    # An empty ImageFolder root: it exists (a missing one is refused before anything is
    # submitted, test_missing_data_root_is_refused_at_submission) but has no train/ split.
    (tmp_path / "empty-data").mkdir()
    proc = launch(slurm_env, "pipeline", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "data.source=imagefolder", f"data.root={tmp_path / 'empty-data'}", *common(tmp_path, cache_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage prepare-data failed" in proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    failed = by_key(record)["prepare-data"]
    assert f"log:   {failed['log']}" in proc.stderr and "empty-data/train" in proc.stderr
    assert "empty-data/train" in Path(failed["log"]).read_text()

    ids = [j["job_id"] for j in record["jobs"]]
    wait_until("no job of the chain left in the queue",
               lambda: not set(slurm(slurm_env, "squeue", "-h", "-o", "%i").split()) & set(ids), 30, 1)
    dependents = ids[1:]

    def cancelled() -> bool:
        states = sacct_states(slurm_env, ids)
        return {states[i][1] for i in dependents} == {"CANCELLED"}

    wait_until("every dependent job to show as cancelled in sacct", cancelled, 60, 1)
    assert sacct_states(slurm_env, [failed["job_id"]])[failed["job_id"]][1] == "FAILED"


def test_missing_data_root_is_refused_at_submission(slurm_env: dict[str, str], cache_dir: Path,
                                                    tmp_path: Path) -> None:
    proc = launch(slurm_env, "pipeline", "--preset", "smoke", "data.source=imagefolder",
                  "data.root=no-such-data", *common(tmp_path, cache_dir))
    # made absolute where the launcher runs: the jobs run in another directory
    assert_user_error(proc, f"data.root {REPO / 'no-such-data'} does not exist")
    assert read_record(tmp_path) is None  # nothing submitted


# -- a real cluster's options: GPUs, CPU binding, site set-up --------------------------


def submission_file(record: dict[str, Any], key: str) -> Path:
    job = by_key(record)[key]
    return Path(job["log"]).parent / f"{job['job_id']}_submission.sh"


def submission_script(record: dict[str, Any], key: str) -> str:
    return submission_file(record, key).read_text()


def accepted_by_sbatch(env: dict[str, str], script: Path) -> None:
    """`sbatch --test-only`: slurmctld checks the job script against the cluster, submits nothing."""
    out = subprocess.run(["sbatch", "--test-only", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr


def test_gpu_request_reaches_sbatch_and_no_gpu_is_an_error_naming_the_stage(
        slurm_env: dict[str, str], cache_dir: Path, tmp_path: Path) -> None:
    """The dev cluster's nodes have GRES gpu:fake:2 and no CUDA: a job asking for a GPU is
    scheduled, and must then refuse to train on the CPU."""
    proc = launch(slurm_env, "pipeline", "--stages", "train-teacher", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "slurm.teacher.gpus_per_node=fake:1", *common(tmp_path, cache_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage train-teacher failed" in proc.stderr
    assert "asked Slurm for 1 GPU(s) per node (slurm.teacher) but torch sees no CUDA device" in proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    script = submission_script(record, "train-teacher")
    assert "#SBATCH --gpus-per-node=fake:1" in script and "#SBATCH --ntasks=1" in script
    assert "--wckey" not in script
    assert not (tmp_path / "teacher" / "metrics.jsonl").exists()  # not one epoch on the CPU
    accepted_by_sbatch(slurm_env, submission_file(record, "train-teacher"))
    job_id = by_key(record)["train-teacher"]["job_id"]
    assert "gres/gpu" in slurm(slurm_env, "sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", job_id)


def test_gres_and_per_task_gpus_are_accepted_by_sbatch(slurm_env: dict[str, str], cache_dir: Path,
                                                       tmp_path: Path) -> None:
    proc = launch(slurm_env, "pipeline", "--stages", "train-teacher,cache-logits", "--preset", "smoke", "--hold",
                  "slurm.teacher.gres=gpu:fake:2", "slurm.teacher.tasks_per_node=2",
                  "slurm.cache_logits.gpus_per_task=1", "slurm.cache_logits.gpu_bind=none",
                  *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    try:
        teacher, cache = submission_script(record, "train-teacher"), submission_script(record, "cache-logits")
        assert "#SBATCH --gres=gpu:fake:2" in teacher and "#SBATCH --ntasks=2" in teacher
        assert "#SBATCH --gpus-per-task=1" in cache and "#SBATCH --gpu-bind=none" in cache
        assert "#SBATCH --ntasks=1" in cache
        for key in ("train-teacher", "cache-logits"):
            accepted_by_sbatch(slurm_env, submission_file(record, key))
        assert job_fields(slurm_env, by_key(record)["train-teacher"]["job_id"])["TresPerNode"] == "gres:gpu:fake:2"
    finally:
        slurm(slurm_env, "scancel", *(j["job_id"] for j in record["jobs"]))


def test_cpu_binding_site_setup_env_and_extra_options(slurm_env: dict[str, str], cache_dir: Path,
                                                      tmp_path: Path) -> None:
    """One task of 2 CPUs (the pipeline's teacher has 2 tasks of 1): bound to both, 2 torch
    threads. srun gets --cpus-per-task itself: Slurm 22.05's ignores the job's, and would bind
    each of several tasks to one CPU (that case needs 4 CPUs on a node; this one has 2).
    slurm.setup runs before the tasks, slurm.env and a wrapping slurm.python reach them, and
    extra options keep their commas."""
    wrapper = (f"/bin/sh -c 'echo task env: KD_TEST_ENV=$KD_TEST_ENV FROM_SETUP=$KD_FROM_SETUP; "
               f"exec {sys.executable} \"$@\"' sh")
    proc = launch(slurm_env, "pipeline", "--stages", "train-teacher", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "slurm.teacher.cpus_per_task=2",
                  "slurm.teacher.extra=--mail-type=END,FAIL --comment='kd test, with commas'",
                  "slurm.setup=echo setup ran on $(hostname); export KD_FROM_SETUP=yes",
                  "slurm.env=KD_TEST_ENV='a,b c'", f"slurm.python={wrapper}", *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    teacher = by_key(record)["train-teacher"]
    log0 = Path(teacher["log"])
    assert rank_cpus(log0) == [0, 1], log0.read_text()[-2000:]
    first = log0.read_text()
    assert "with 2 torch threads" in first
    assert "task env: KD_TEST_ENV=a,b c FROM_SETUP=yes" in first
    assert first.index("setup ran on") < first.index("kd-ddp train-teacher: rank 0")
    srun = next(line for line in submission_script(record, "train-teacher").splitlines() if line.startswith("srun"))
    assert "--cpus-per-task=2" in srun
    # What slurmctld took from the script (it keeps a finished job for MinJobAge = 30 s).
    shown = slurm(slurm_env, "scontrol", "show", "job", teacher["job_id"])
    assert "MailType=END,FAIL" in shown and "Comment=kd test, with commas" in shown, shown


def test_sweep_with_a_failing_point_still_reports_and_names_it(slurm_env: dict[str, str], cache_dir: Path,
                                                               tmp_path: Path) -> None:
    """A learning rate of 1e30 makes one KD student stop on a non-finite loss. The report
    waits for the array with afterany, so it still runs, and names the point it lacks."""
    proc = launch(slurm_env, "sweep", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "optim.student_lr=0.05,1e30", *common(tmp_path, cache_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage student-kd[student_lr=1e30] failed" in proc.stderr and "non-finite loss" in proc.stderr
    assert "report of the rest in" in proc.stdout
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [e["name"] for e in results["sweep"]] == ["student_lr=0.05"]
    assert results["sweep_missing"] == ["student_lr=1e30"]
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "## Sweep points without a result" in report_md and "`student_lr=1e30`" in report_md
    record = read_record(tmp_path, "sweep")
    assert record is not None
    report = by_key(record)["report"]
    assert report["depends_on_any"] == [by_key(record)["student-normal"]["job_id"],
                                        by_key(record)["student-kd"]["job_id"]]


def test_wait_ends_on_a_cancelled_preemption_and_follows_a_requeued_one(slurm_env: dict[str, str], cache_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Two teachers, one in partition scavenger (PreemptMode=CANCEL), one in debug (REQUEUE);
    a job of partition short (higher priority tier) then takes both CPUs of the node. sacct
    calls both PREEMPTED: --wait must end at once, naming the stage, for the cancelled one and
    keep following the requeued one to its end."""
    epochs = 12
    runs = {"scavenger": tmp_path / "scavenger", "debug": tmp_path / "debug"}
    procs = {part: subprocess.Popen(
        [sys.executable, "-m", "launch.slurm", "pipeline", "--stages", "train-teacher", "--preset", "smoke", "--wait",
         "--poll-s", "1", f"slurm.teacher.partition={part}", f"optim.teacher_epochs={epochs}",
         *common(run, cache_dir)], cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for part, run in runs.items()}
    try:
        for run in runs.values():
            metrics = run / "teacher" / "metrics.jsonl"
            wait_until(f"an epoch in {run.name}", lambda m=metrics: m.is_file() and m.read_text().strip(), 300)
        # The preemptor holds the node for 10 s: the requeued teacher pends that long, so a
        # 1 s poll sees it out of RUNNING even when a poll takes seconds on a loaded machine.
        preemptor = slurm(slurm_env, "sbatch", "--parsable", "-p", "short", "-c", "2", "-t", "1",
                          "--output=/dev/null", "--wrap", "sleep 10").strip()
        out, err = procs["scavenger"].communicate(timeout=120)
        assert procs["scavenger"].returncode == 1, out + err
        record = read_record(runs["scavenger"])
        assert record is not None
        job_id = by_key(record)["train-teacher"]["job_id"]
        assert f"stage train-teacher failed: job {job_id} is PREEMPTED (preempted and not requeued" in err
        out, err = procs["debug"].communicate(timeout=400)
        assert procs["debug"].returncode == 0, out + err
        record = read_record(runs["debug"])
        assert record is not None
        debug_id = by_key(record)["train-teacher"]["job_id"]
        # slurmdbd keeps each run of a requeued job (-D): the first ended PREEMPTED, the last COMPLETED.
        history = slurm(slurm_env, "sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", debug_id).split()
        assert history[0] in ("PREEMPTED", "REQUEUED") and history[-1] == "COMPLETED", history
        assert "PREEMPTED" in out or "PENDING" in out.split("RUNNING", 1)[1], out  # --wait saw it stop, came back
        assert sacct_states(slurm_env, [preemptor])[preemptor][1] == "COMPLETED"
        metrics = (runs["debug"] / "teacher" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in metrics] == list(range(1, epochs + 1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def _default_sigint() -> None:
    """In the launcher's process, before Python starts: SIGINT back to its default. A suite run
    in the background of a non-interactive shell (`make test &`, nohup) inherits SIGINT
    ignored, and Python then raises no KeyboardInterrupt for it, so the launcher never saw the
    signal this test sends (the hang once seen in fresh-clone CI)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_job_pending_on_a_partition_limit_says_why(slurm_env: dict[str, str], cache_dir: Path,
                                                  tmp_path: Path) -> None:
    """Partition short has MaxTime=2 (minutes): a 30-minute job there pends for good."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.slurm", "pipeline", "--stages", "prepare-data",
                             "--preset", "smoke", "--wait", "--poll-s", "1", "--pending-notice-s", "2",
                             "slurm.prepare_data.partition=short", *common(tmp_path, cache_dir)],
                            cwd=REPO, env={**slurm_env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("PartitionTimeLimit" in ln for ln in lines):
            lines.append(proc.stdout.readline())
        notice = next((ln for ln in lines if "PartitionTimeLimit" in ln), "")
        assert re.search(r"prepare-data +job \d+ +pending for \d+ s: PartitionTimeLimit \(--time is above the "
                         r"partition's MaxTime", notice), "".join(lines)
        proc.send_signal(signal.SIGINT)  # the launcher stops waiting, the job stays queued
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            # SIGABRT makes faulthandler print where every thread is.
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"launcher still running 120 s after SIGINT; its threads:\n{err[-6000:]}")
        assert proc.returncode == 130 and "status" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        record = read_record(tmp_path)
        if record:
            slurm(slurm_env, "scancel", *(j["job_id"] for j in record["jobs"]))


def test_doctor_on_a_node_sees_the_job(slurm_env: dict[str, str], tmp_path: Path) -> None:
    out = slurm(slurm_env, "srun", "-c", "2", "--gpus-per-node=1", sys.executable, "-m", "kd_ddp", "doctor",
                "--preset", "smoke", f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert re.search(r"^info +slurm +SLURM_JOB_ID=\d+", out, re.M), out
    assert re.search(r"^info +cpus +2 usable of \d+; a rank here gets 2 ", out, re.M), out
    assert re.search(r"^info +gpus +none visible \(.*SLURM_GPUS_ON_NODE=1", out, re.M), out


# -- the plain sbatch template ----------------------------------------------------------


@pytest.mark.slow
def test_sbatch_template_runs_torchrun_with_two_ranks(slurm_env: dict[str, str], cache_dir: Path,
                                                      tmp_path: Path) -> None:
    env = {**slurm_env, "NPROC_PER_NODE": "2", "KD_DDP_PYTHON": sys.executable}
    out = subprocess.run(["sbatch", "--wait", "--parsable", "--cpus-per-task=2", "--time=20",
                          f"--output={tmp_path}/%j.out", str(REPO / "slurm" / "kd-ddp.sbatch"), "train-teacher",
                          "--preset", "smoke", "train.threads=1", *common(tmp_path / "run", cache_dir)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    job_id = out.stdout.strip().split(";")[0]
    log = (tmp_path / f"{job_id}.out").read_text() if job_id else ""
    assert out.returncode == 0, out.stderr + log
    assert "1 node(s) x 2 rank(s)" in log and "on 2 rank(s)" in log
    assert json.loads((tmp_path / "run" / "teacher" / "summary.json").read_text())["world_size"] == 2


# -- two nodes: one slurmd per network namespace ----------------------------------------


@dataclass
class TwoNodeCluster:
    env: dict[str, str]
    nodes: list[str]  # node names in the order of the job's node list
    addrs: dict[str, str]  # node -> NodeAddr, its address inside its namespace


@pytest.fixture(scope="module")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    """A second, separate dev cluster whose two nodes are slurmds in network namespaces of their
    own (`start.sh --nodes 2`); skipped where this machine cannot make namespaces."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces for the two-node cluster need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (iproute2, util-linux); slurm/dev-cluster/install.sh installs them")
    state = tmp_path_factory.mktemp("slurm-2nodes")
    start = subprocess.run([str(DEV_CLUSTER / "start.sh"), "--nodes", "2", str(state)], capture_output=True,
                           text=True, timeout=300)
    if start.returncode == 3:  # start.sh's "cannot create a network namespace", with the kernel's reason
        pytest.skip(start.stderr.strip().splitlines()[-1])
    try:
        if start.returncode != 0:
            pytest.fail(f"slurm/dev-cluster/start.sh --nodes 2 failed:\n{start.stderr[-6000:]}")
        env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf"), "PYTHONPATH": str(REPO)}
        nodes = list(dict.fromkeys(slurm(env, "sinfo", "-h", "-N", "-o", "%N").split()))  # once per partition
        yield TwoNodeCluster(env, nodes, {n: node_fields(env, n)["NodeAddr"] for n in nodes})
    finally:
        stop = subprocess.run([str(DEV_CLUSTER / "stop.sh"), str(state)], capture_output=True, text=True,
                              timeout=300)
        assert stop.returncode == 0, stop.stderr[-3000:]
        layout = state / "layout.env"
        if layout.is_file():  # stop.sh must leave none of this cluster's namespaces behind
            net_id = dict(line.split("=", 1) for line in layout.read_text().split())["LAYOUT_NET_ID"]
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
            assert f"kdslurm{net_id}-" not in left, f"namespaces left behind:\n{left}"


def node_fields(env: dict[str, str], node: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", slurm(env, "scontrol", "show", "node", "-o", node)))


def test_multinode_nodes_are_separate_network_namespaces(multinode_cluster: TwoNodeCluster) -> None:
    """What the training test relies on: each node has its own network namespace, hostname and
    address, and inside every node each node name resolves to that node's NodeAddr."""
    c = multinode_cluster
    assert len(c.nodes) == 2 and len(set(c.addrs.values())) == 2
    out = slurm(c.env, "srun", "--nodes=2", "--ntasks-per-node=1", "--label", "sh", "-c",
                f"echo host=$(hostname) netns=$(readlink /proc/self/ns/net); getent hosts {' '.join(c.nodes)}")
    per_task: dict[str, list[str]] = {}
    for line in out.splitlines():
        task, _, rest = line.partition(": ")
        per_task.setdefault(task.strip(), []).append(rest.strip())
    assert sorted(per_task) == ["0", "1"], out
    seen = [dict(re.findall(r"(\w+)=(\S+)", lines[0])) for _, lines in sorted(per_task.items())]
    assert [s["host"] for s in seen] == c.nodes, out  # task i on node i, named as Slurm names it
    assert seen[0]["netns"] != seen[1]["netns"], out
    for lines in per_task.values():
        resolved = {name: addr for addr, name in (ln.split() for ln in lines[1:])}
        assert resolved == c.addrs, out


def test_multinode_job_trains_with_world_size_2_across_two_nodes(multinode_cluster: TwoNodeCluster,
                                                                  cache_dir: Path, tmp_path: Path) -> None:
    """A `nodes=2`, one-task-per-node teacher job through the launcher. The two ranks share no
    loopback (separate namespaces), so the job can only train if gloo and the TCP store really
    connect over the nodes' addresses, with MASTER_ADDR the job's first node."""
    c = multinode_cluster
    proc = launch(c.env, "pipeline", "--stages", "train-teacher", "--preset", "smoke", "--wait", "--poll-s", "1",
                  "slurm.teacher.nodes=2", "slurm.teacher.tasks_per_node=1", *common(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(tmp_path)
    assert record is not None
    teacher = by_key(record)["train-teacher"]
    assert teacher["tasks"] == 2
    # Step 0 is submitit's srun of the tasks (the batch step runs on the first node only).
    rows = slurm(c.env, "sacct", "-n", "-P", "-o", "JobID,NNodes,NodeList,NTasks,State", "-j", teacher["job_id"])
    steps = {r.split("|")[0]: r.split("|")[1:] for r in rows.split()}
    assert steps[f"{teacher['job_id']}.0"] == ["2", "kdslurm-n[1-2]", "2", "COMPLETED"], rows

    log0 = Path(teacher["log"])
    ranks = []
    for rank in (0, 1):
        text = log0.with_name(log0.name.replace("_0_log", f"_{rank}_log")).read_text()
        m = re.search(r"rank (\d+) of world size (\d+) on (\S+) \(.*master ([^:]+):(\d+)\)", text)
        assert m is not None, text[-3000:]
        ranks.append(m.groups())
    first = c.nodes[0]
    assert ranks[0][:3] == ("0", "2", first) and ranks[1][:3] == ("1", "2", c.nodes[1])  # one rank per node
    assert ranks[0][3] == ranks[1][3] == first  # MASTER_ADDR: the job's first node, for both ranks
    assert ranks[0][4] == ranks[1][4]
    assert "on 2 rank(s)" in log0.read_text()
    summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert summary["world_size"] == 2
