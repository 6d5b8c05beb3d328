"""`kd-ddp COMMAND [--preset P] [section.field=value ...]`: the one entry point.

The same command runs in one process or under torchrun (`torchrun --standalone
--nproc_per_node=N -m kd_ddp STAGE ...`) and inside Slurm tasks (launch/tasks.py calls
`run_stage` with the same Config).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from kd_ddp import distributed, ensemble, stages, tracking
from kd_ddp.checkpoint import NO_SPACE_HINT, CheckpointError, NoSpaceError, atomic_write_json
from kd_ddp.config import PRESETS, Config, ConfigError, config_yaml, load_config
from kd_ddp.data import prepare_data, write_loader_files
from kd_ddp.locks import (
    BaseFileLock,
    LockUnsupported,
    LockWaitTimeout,
    RunDirBusy,
    lock_run_dir,
    soft_locks,
    wait_bound,
)
from kd_ddp.precision import amp_dtype
from kd_ddp.preflight import preflight
from kd_ddp.sources import DataError
from kd_ddp.teacher_logits import CacheError, build_cache, cache_lock, check_cache
from kd_ddp.teachers import load_trained_teacher
from kd_ddp.train import NonFiniteLoss, Preempted, train_stage

log = logging.getLogger("kd_ddp")

def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def cache_logits(cfg: Config, env: distributed.DistEnv, data: Any, rebuild_invalid: bool = True) -> dict[str, Any]:
    """Check the teacher-logits cache and (re)build it unless it is usable, under the cache's
    lock, which a KD student takes to read it: a student never reads a cache half rebuilt.
    With an ensemble, every member's cache, one after another; the result is the teacher's
    (member 1's) manifest, the others' under "members"."""
    manifests = [cache_member(cfg, env, data, stage.member, rebuild_invalid)
                 for stage in stages.teachers(ensemble.size(cfg))]
    return manifests[0] | ({"members": manifests[1:]} if len(manifests) > 1 else {})


def cache_member(cfg: Config, env: distributed.DistEnv, data: Any, member: int, rebuild_invalid: bool
                 ) -> dict[str, Any]:
    """cache_logits for one teacher of the ensemble (member 1: the run's teacher)."""
    stage = stages.teacher_member(member)
    teacher, record = load_trained_teacher(ensemble.member_config(cfg, member), data, env, stage.name)
    name = stages.cache_name(member)
    with cache_lock(cfg, env, member):
        try:
            manifest = check_cache(cfg, data, record, member)
            if env.is_main:
                log.info("%s cache is up to date", name)
            return manifest
        except CacheError as e:
            if not rebuild_invalid:
                raise
            if env.is_main and "no teacher-logits cache" not in str(e):
                log.warning("rebuilding the %s cache: %s", name, str(e).splitlines()[0])
        return build_cache(cfg, env, data, teacher, record, amp_dtype(cfg, env.device), member)


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that passed the start-up checks when another rank failed them, with
    that rank's message: every rank then exits 2 at once, none waits in the next collective
    for the process group's timeout (torchrun would kill it; Slurm's tasks have no torchrun)."""


USER_ERRORS = (ConfigError, DataError, CacheError, CheckpointError, NoSpaceError, FileNotFoundError, RunDirBusy,
               LockUnsupported, LockWaitTimeout, OtherRankFailed)


def lock_names(command: str, mode: str, n: int = 0, member: int = 0) -> list[str]:
    """The locks a command takes: its stage's own, so that different stages of one run dir (the
    Slurm chain's two students) run side by side; `pipeline` takes the run dir's and every stage's.
    What two stages share has a lock of its own, taken while it is used: the logits cache's
    (teacher_logits.cache_lock), held by cache-logits while it checks and builds the cache and
    by a KD student while it reads it, in whichever run dir each runs (a sweep point links to
    the cache it reads)."""
    held = [stage.lock for stage in stages.of_command(command, mode, n, member)]
    return [stages.RUN_DIR_LOCK, *held] if command == stages.ALL_COMMAND else held


def make_run_dir(run_dir: Path) -> None:
    """Create the run dir; a path taken by a file, or under one, is a user error."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"run.dir {run_dir} is an existing file, or lies under one: give a directory") from None
    except PermissionError as e:
        raise ConfigError(f"cannot create run.dir {run_dir}: {e.strerror}") from None


def check_request(cfg: Config, command: str, mode: str, member: int) -> None:
    """ConfigError for a command that names a stage this config has not: the ensemble's student
    or a teacher member without an ensemble that large."""
    n = ensemble.size(cfg)
    if command == stages.STUDENT_KD_ENSEMBLE.command and mode == stages.STUDENT_KD_ENSEMBLE.mode and n < 2:
        raise ConfigError(f"--mode {mode} trains the student of an ensemble: set kd.ensemble=N (N >= 2)")
    if member and command != stages.TEACHER.command:
        raise ConfigError(f"--member is for {stages.TEACHER.command} only")
    if member > n or member < 0:
        raise ConfigError(f"--member {member}: this config has {n} teacher(s) (kd.ensemble={cfg.kd.ensemble})")


def set_up(cfg: Config, env: distributed.DistEnv, command: str, mode: str, locks: list[BaseFileLock],
           member: int = 0) -> None:
    """The checks and claims before any work. Every rank: the models and the teacher file, before
    any data is prepared. Rank 0: W&B (a missing API key fails here, not after an epoch), the run
    dir, its locks (into `locks`, so the caller releases them whatever happens), the config."""
    check_request(cfg, command, mode, member)
    preflight(cfg, env, command, mode, member)
    soft_locks()  # a bad KD_DDP_LOCKS or KD_DDP_LOCK_WAIT_S is refused on every rank, before any lock
    wait_bound()
    if env.is_main:
        tracking.preflight(cfg)
        make_run_dir(cfg.run_dir)
        for name in lock_names(command, mode, ensemble.size(cfg), member):
            locks.append(lock_run_dir(cfg.run_dir, name))
        atomic_write_json(cfg.run_dir / f"config.{command}.json", cfg.to_dict())


def failure_message(error: Exception, rank: int) -> str:
    if isinstance(error, USER_ERRORS):
        return str(error)
    return f"rank {rank} failed: {type(error).__name__}: {error} (its traceback is in that rank's output)"


def share_failure(error: Exception | None, env: distributed.DistEnv) -> None:
    """Tell every rank whether this one failed set_up (one all_gather, the first collective of a
    stage); a rank that passed it raises the first failure it hears of."""
    failures = distributed.all_gather_object(None if error is None else failure_message(error, env.rank), env)
    if error is None:
        for message in failures:
            if message is not None:
                raise OtherRankFailed(message)


def set_up_together(cfg: Config, env: distributed.DistEnv, command: str, mode: str,
                    locks: list[BaseFileLock], member: int = 0) -> None:
    """set_up on every rank, ending every rank if it failed on any. Not KeyboardInterrupt: each
    rank gets its own SIGINT, and a rank held in a collective could not take it."""
    try:
        set_up(cfg, env, command, mode, locks, member)
    except Exception as e:
        # The rank's own error is what it reports, even if the others can no longer be told.
        with contextlib.suppress(Exception):
            share_failure(e, env)
        raise
    share_failure(None, env)


def run_stage(cfg: Config, command: str, mode: str = "kd", wandb_report: bool = False,
              push_wandb_report: bool = False, member: int = 0) -> dict[str, Any]:
    """Run a command's stages (one, or all for `pipeline`) in this process, which may be one
    rank of many. `member` > 0: train-teacher trains that teacher of the ensemble alone.

    `wandb_report` / `push_wandb_report` (report only): build the W&B report (saved when
    online with an API key, else its spec JSON beside report.md) / push a saved spec.
    """
    env = distributed.setup(cfg)
    setup_logging(env.rank)
    locks: list[BaseFileLock] = []
    try:
        set_up_together(cfg, env, command, mode, locks, member)
        start = time.perf_counter()
        if command == stages.REPORT.command:
            return report_only(cfg, env, wandb_report, push_wandb_report)
        result = run_stages(cfg, env, command, mode, member)
        if env.is_main:
            log.info("%s finished in %.1f s", command, time.perf_counter() - start)
        return result
    finally:
        for lock in locks:
            lock.release()
        distributed.teardown()


def run_stages(cfg: Config, env: distributed.DistEnv, command: str, mode: str, member: int = 0) -> dict[str, Any]:
    """Prepare the data, then each stage of the command in order; their results by key."""
    data = prepare_data(cfg, env)
    if command == stages.PREPARE.command:
        write_loader_files(cfg, data, env)
    result: dict[str, Any] = {}
    for stage in stages.of_command(command, mode, ensemble.size(cfg), member):
        if stage.trains:
            stage_cfg = ensemble.member_config(cfg, stage.member) if stage.member else cfg
            result[stage.key] = train_stage(stage_cfg, env, data, stage.name)
        elif stage is stages.CACHE and (command == stage.command or cfg.kd.teacher == "cached"):
            result["cache"] = cache_logits(cfg, env, data)  # a pipeline with a live teacher needs none
        elif stage is stages.REPORT and env.is_main:
            result[stages.REPORT.name] = report_and_print(cfg)
    return result


def report_and_print(cfg: Config) -> dict[str, Any]:
    """The pipeline's last stage: the report, and the accuracies on stdout: each trained model
    the report found (an ensemble's teachers and student included) and the ensemble's own."""
    from kd_ddp.report import build_report, label, rows

    results = build_report(cfg)
    keys = rows(results)
    width = max((len(label(key)) for key in keys), default=0)
    for key in keys:
        print(f"{label(key):<{width}}  test_acc {results[key]['test_acc']:.4f}")
    print(f"report: {cfg.run_dir / stages.REPORT.name / 'report.md'}", flush=True)
    return results


def report_only(cfg: Config, env: distributed.DistEnv, wandb_report: bool, push: bool) -> dict[str, Any]:
    """`kd-ddp report`: rank 0 builds the report from the run dir alone (and the W&B report)."""
    if not env.is_main:
        return {}
    from kd_ddp.report import build_report

    result = build_report(cfg)
    if wandb_report:
        from kd_ddp.wandb_report import publish
        result["wandb_report"] = publish(cfg, result)
    if push:
        from kd_ddp.wandb_report import push_spec
        result["wandb_report_url"] = push_spec(cfg)
    return result


CONFIG_HELP = """configuration:
  kd-ddp config [--preset P] [--config FILE] [section.field=value ...] prints the resolved
  config, every field with its comment (YAML; --format json for plain JSON). Any command
  takes --config FILE (that output, or a run dir's config.<stage>.json): the preset, then
  the file's fields, then the section.field=value overrides, each over the one before."""


def print_config(cfg: Config, fmt: str) -> None:
    """`kd-ddp config`: the resolved config on stdout, loadable back with --config."""
    if fmt == "json":
        print(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
        return
    print(config_yaml(cfg, [f"kd-ddp config, preset {cfg.preset}; every field below its comment.",
                            "Use: kd-ddp STAGE --config THIS_FILE [section.field=value ...]"]), end="")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(prog="kd-ddp", description=__doc__.splitlines()[0], epilog=CONFIG_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", metavar="command", choices=(*stages.COMMANDS, "config", "doctor"),
                   help=" | ".join((*stages.COMMANDS, "config", "doctor")))
    p.add_argument("--preset", default=None,
                   help=f"{' | '.join(PRESETS)} (default: the --config file's, else quick)")
    p.add_argument("--config", metavar="FILE", help="JSON or YAML config (kd-ddp config prints one); "
                                                    "the overrides apply over it")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml", help="config only: output format")
    p.add_argument("--mode", choices=stages.MODES, default="kd", help="train-student only (kd-ensemble: the "
                   "student of an ensemble, kd.ensemble=N)")
    p.add_argument("--member", type=int, default=0, metavar="I",
                   help="train-teacher only: train teacher I of the ensemble alone (default: every teacher)")
    p.add_argument("--wandb-report", action="store_true",
                   help="report only: build the W&B report (saved if online with an API key, "
                        "else written as report/wandb_report.json)")
    p.add_argument("--push-wandb-report", action="store_true",
                   help="report only: upload report/wandb_report.json (after `wandb sync`)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = p.parse_intermixed_args(argv)
    return args, load_config(args.preset, args.overrides, args.config)


def main(argv: list[str] | None = None) -> int:
    code = run_command(argv)
    if distributed.joined_a_group():  # a torchrun rank: see distributed.end_process
        distributed.end_process(code)
    return code


def run_command(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
        if args.stage == "config":
            print_config(cfg, args.format)
            return 0
        if args.stage == "doctor":  # versions, GPUs, FFCV, filesystems: kd_ddp/doctor.py
            from kd_ddp import doctor
            return doctor.main(cfg)
        run_stage(cfg, args.stage, args.mode, args.wandb_report, args.push_wandb_report, args.member)
    except USER_ERRORS as e:
        print(f"kd-ddp: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"kd-ddp: error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"kd-ddp: {e}", file=sys.stderr)
        return 143  # the shell's code for SIGTERM: schedulers and torchrun treat it as killed
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # a write not routed through checkpoint.atomic_output (archive extraction, W&B) hit a full disk
        print(f"kd-ddp: error: no space left on device ({e}); {NO_SPACE_HINT}", file=sys.stderr)
        return 2
    return 0
