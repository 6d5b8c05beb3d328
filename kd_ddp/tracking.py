"""Experiment tracking on rank 0: one tracker per training stage, mirrored to W&B.

metrics.jsonl (written by the training loop) is the source of truth; a tracker mirrors
the same per-epoch records (epoch = W&B step) and the final summary to a W&B run when
`tracking.wandb.mode` is not `disabled` (default `offline`: nothing leaves the machine;
`wandb sync` uploads later, see docs/tracking.md).

- One W&B run per training stage, `job_type` = stage, all in one `group`: the config's
  `tracking.wandb.group`, else derived from the run dir (`group_name`), so the stages of
  one pipeline (and the members of one sweep or seed set) land together.
- The run's config is the full resolved Config plus `system` (device, world size,
  precision, library versions), `stage` and `run_role` (main | sweep | seed | variant).
- `finish` logs the stage's checkpoint (and for the KD student the teacher-logits cache)
  as artifacts *by reference*: W&B records paths, sizes and digests, never uploads GBs.
- `log_report` makes one more run (`job_type` "report") holding the report's PNGs.
- Hermetic: WANDB_DIR and the data/cache/config/artifact dirs point under the run dir
  before wandb is touched, so concurrent runs and CI do not share or pollute ~/.
- W&B never kills or hangs training: every call is guarded and its exception logged as a
  warning. A failed log, summary or artifact stops logging to that run only: the run is
  still finished, and later stages get runs of their own. A failed `wandb.init` switches
  W&B off for the rest of the process (a service that cannot start a run fails every
  init the same way, each after up to INIT_TIMEOUT_S). The one hard error is `preflight`:
  mode=online without an API key fails at start, before any data or epoch.
- No run is lost: every started run is finished, by its stage (`finish` or `abort`,
  whatever failed before), else at the end of the process (`finish_open_runs`, from
  atexit and from `distributed.end_process`, whose os._exit skips atexit and wandb's own
  hook with it); then `wandb.teardown()` waits for the service to flush everything.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_ddp import stages
from kd_ddp.config import Config, ConfigError
from kd_ddp.distributed import DistEnv, at_end_process
from kd_ddp.precision import amp_dtype, precision_name

log = logging.getLogger(__name__)

# Sub-layouts of a run dir whose members share the parent's W&B group (see report.py).
REPLICA_DIRS = {"sweep": "sweep", "seeds": "seed", "variants": "variant"}
WANDB_SUBDIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config",
                 "WANDB_ARTIFACT_DIR": "artifacts"}
# Bounded waits: an unreachable server must cost a stage at most this, never hang it.
INIT_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
VERSIONED_PACKAGES = ("torch", "numpy", "ffcv", "wandb", "wandb-workspaces", "kd-ddp")

_broken = False  # set when wandb does not import or an init failed: no more runs in this process
_open_runs: list[Any] = []  # started and not yet finished: finish_open_runs ends them
_exit_hooked = False  # whether finish_open_runs is registered to run at exit


# -- names and places -----------------------------------------------------------------


def enabled(cfg: Config) -> bool:
    return cfg.tracking.wandb.mode != "disabled" and not _broken


def run_role(run_dir: Path) -> tuple[str, str]:
    """("main", "") for a pipeline's own dir; ("sweep", name) for `<root>/sweep/<name>`,
    ("seed", name) for `<root>/seeds/<name>`, ("variant", name) for `<root>/variants/<name>`."""
    parent = run_dir.resolve().parent
    if parent.name in REPLICA_DIRS:
        return REPLICA_DIRS[parent.name], run_dir.resolve().name
    return "main", ""


def group_name(cfg: Config) -> str:
    """`tracking.wandb.group`, else `<root dir name>-<hash of its absolute path>`: stable
    across the stages of one run dir, distinct for two run dirs that share a name."""
    if cfg.tracking.wandb.group:
        return cfg.tracking.wandb.group
    root = cfg.run_dir.resolve()
    if run_role(root)[0] != "main":
        root = root.parent.parent
    return f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:6]}"


def run_label(cfg: Config, stage: str) -> str:
    """The W&B run name: the stage, prefixed for sweep and seed members."""
    role, name = run_role(cfg.run_dir)
    return stage if role == "main" else f"{role}-{name}-{stage}"


def _artifact_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def hermetic_env(run_dir: Path) -> Path:
    """Point every W&B location under `<run_dir>/wandb` (runs: `<run_dir>/wandb/*-run-*`)."""
    root = run_dir.resolve()
    base = root / "wandb"
    os.environ["WANDB_DIR"] = str(root)  # wandb appends "wandb/" itself
    for var, sub in WANDB_SUBDIRS.items():
        os.environ[var] = str(base / sub)
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return base


# -- preflight: the one error that stops a run ------------------------------------------


def find_api_key() -> str | None:
    """An API key (or identity token file) from the environment or ~/.netrc, without network."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return os.environ[var]
    from wandb.sdk.lib import wbauth

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        return wbauth.read_netrc_auth(host=host)
    except Exception as e:  # say so now, not from inside wandb.init an epoch later
        raise ConfigError(f"the W&B entry in ~/.netrc (or $NETRC) is invalid: {e}") from None


def preflight(cfg: Config) -> None:
    """Fail now, not after an epoch: online mode needs an API key; wandb must import."""
    global _broken
    if cfg.tracking.wandb.mode == "disabled":
        return
    try:
        import wandb  # noqa: F401
    except Exception as e:
        log.warning("W&B tracking off: wandb does not import (%s)", e)
        _broken = True
        return
    if cfg.tracking.wandb.mode == "online" and not find_api_key():
        raise ConfigError(
            "tracking.wandb.mode=online but no W&B API key was found (WANDB_API_KEY, "
            "WANDB_IDENTITY_TOKEN_FILE or ~/.netrc from `wandb login`). Set one, or use "
            "tracking.wandb.mode=offline and `wandb sync` afterwards (docs/tracking.md).")


# -- system facts -----------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def cpu_name() -> str:
    """The CPU model with its logical CPU count, e.g. "AMD EPYC 7B13 (2 CPUs)". /proc/cpuinfo
    first: platform.processor() runs `uname -p` in a subprocess, which a training process
    need not fork for."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def device_name(env: DistEnv) -> str:
    return torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else cpu_name()


def machine(env: DistEnv) -> str:
    """One line naming the hardware and software a stage ran on (kept in its summary)."""
    return f"{device_name(env)}, {env.world_size} rank(s), torch {torch.__version__}"


def system_facts(cfg: Config, env: DistEnv) -> dict[str, Any]:
    return {
        "device": str(env.device),
        "device_name": device_name(env),
        "world_size": env.world_size,
        "nodes": max(1, env.world_size // max(1, env.local_world_size)),
        "precision": precision_name(amp_dtype(cfg, env.device)),  # the summaries' name of it
        "torch_threads": torch.get_num_threads(),
        "loader": cfg.data.loader,
        "hostname": socket.gethostname(),
        "versions": _versions(),
    }


# -- guarded W&B calls --------------------------------------------------------------------


def _attempt(what: str, fn: Callable[[], Any], consequence: str) -> tuple[bool, Any]:
    """Run one W&B call: (True, its result), or (False, None) with a warning saying what
    failed and what follows from it (`consequence`)."""
    try:
        return True, fn()
    except Exception as e:
        log.warning("W&B %s failed (%s: %s); %s; metrics.jsonl and summary.json are unaffected",
                    what, type(e).__name__, e, consequence)
        return False, None


def file_uri(path: Path) -> str:
    """A file:// URI for an artifact reference. Quoted: wandb parses the reference as a URL
    and unquotes its path, so a raw `#` or `?` in a dir name would cut the path there and
    a raw `%41` read as "A" (the file then "does not exist" and the artifact fails)."""
    return path.resolve().as_uri()


def _settings(cfg: Config) -> Any:
    import wandb

    # No code, git, requirements or machine probes: each can be slow on big repos or
    # network filesystems, and the probes may try cloud metadata endpoints offline.
    # System metrics (CPU/GPU utilisation) stay on: they are local and cheap.
    return wandb.Settings(
        silent=True, console="off", save_code=False, disable_code=True, disable_git=True,
        disable_job_creation=True, x_save_requirements=False, x_disable_meta=True,
        x_disable_machine_info=True, init_timeout=INIT_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S)


def init_run(cfg: Config, job_type: str, name: str, config: Callable[[], dict[str, Any]]) -> Any:
    """A W&B run of this config's group, or None when tracking is off or init failed.
    `config` is called inside the guard: gathering it must not be able to stop training."""
    global _broken
    if not enabled(cfg):
        return None

    def start() -> Any:
        hermetic_env(cfg.run_dir)
        import wandb

        w = cfg.tracking.wandb
        role = run_role(cfg.run_dir)[0]
        tags = [*w.tags, cfg.preset] + ([role] if role != "main" else [])
        return wandb.init(project=w.project, entity=w.entity or None, group=group_name(cfg), job_type=job_type,
                          name=name, config=config(), tags=tags, mode=w.mode, dir=str(cfg.run_dir.resolve()),
                          settings=_settings(cfg), reinit="finish_previous")

    t0 = time.perf_counter()
    ok, run = _attempt("init", start, "W&B tracking is off for the rest of this process")
    _hook_exit()  # even after a failed init: wandb may hold a half-made run to tear down
    if not ok:
        _broken = True
        return None
    _open_runs.append(run)
    log.info("W&B %s run %r (group %s) started in %.2f s under %s", cfg.tracking.wandb.mode, name,
             group_name(cfg), time.perf_counter() - t0, cfg.run_dir / "wandb")
    return run


def _hook_exit() -> None:
    """Make sure the process ends with no run open (finish_open_runs), at a normal exit and
    in distributed.end_process (whose os._exit skips atexit)."""
    global _exit_hooked
    if not _exit_hooked:
        # Registered after wandb.init registered its own atexit teardown, so (last in,
        # first out) ours runs before it, while the service still takes a finish.
        atexit.register(finish_open_runs)
        at_end_process(finish_open_runs)
        _exit_hooked = True


def close_run(run: Any, exit_code: int | None = None) -> bool:
    """Finish `run` (exit_code 0 or None: finished, else failed), whatever failed before in
    it; True when it finished. A run whose finish failed counts as closed: wandb marks it
    finished before it sends the exit, so a second finish would do nothing."""
    with contextlib.suppress(ValueError):
        _open_runs.remove(run)
    t0 = time.perf_counter()
    ok, _ = _attempt(f"finish of run {getattr(run, 'name', '?')!r}", lambda: run.finish(exit_code=exit_code),
                     "its data may be incomplete")
    if ok:
        log.info("W&B run %r finished in %.2f s", run.name, time.perf_counter() - t0)
    return ok


def finish_open_runs(exit_code: int = 0) -> None:
    """At exit: finish every run still open (marked failed when the process fails), then
    wait in wandb.teardown for the service to write out everything it holds."""
    for run in list(_open_runs):
        log.warning("W&B run %r was still open at exit; finishing it", getattr(run, "name", "?"))
        close_run(run, exit_code or None)
    if "wandb" in sys.modules:  # never import wandb just to tear it down
        _attempt("teardown", _teardown_wandb, "some W&B data may not be written")


def _teardown_wandb() -> None:
    try:
        sys.modules["wandb"].teardown()
    except SystemExit as e:  # how wandb.teardown reports a failed service: here, one warning
        raise RuntimeError(f"the W&B service ended with code {e.code}") from None


def finish_run(run: Any, what: str, before: Callable[[], None]) -> bool:
    """`before()` (summary, artifacts, images), then finish the run, even when `before` or
    an earlier call failed. True when both succeeded."""
    ok, _ = _attempt(what, before, f"the run {run.name!r} is finished without it")
    return close_run(run) and ok


# -- training stages ----------------------------------------------------------------------


class StageTracker:
    """No-op base: what every stage calls, whether or not anything is tracked."""

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def abort(self, exit_code: int) -> None:
        """The stage ended with an exception (exit code as the CLI will report it)."""


class WandbTracker(StageTracker):
    def __init__(self, cfg: Config, stage: str, run: Any) -> None:
        self.cfg, self.stage, self.run = cfg, stage, run
        self.logging = True  # False after a failed call: the run gets no more data, only its finish

    def log_epoch(self, record: dict[str, Any]) -> None:
        # commit now: a row held back for the next step would be flushed at finish, after
        # (and over) the final summary's values of the same keys.
        self._call("log", lambda: self.run.log(dict(record), step=int(record["epoch"]), commit=True))

    def finish(self, summary: dict[str, Any]) -> None:
        def record() -> None:
            self.run.summary.update(summary)
            for art in self._artifacts():
                self.run.log_artifact(art)

        if self.logging:
            finish_run(self.run, f"{self.stage} summary and artifacts", record)
        else:
            close_run(self.run)

    def abort(self, exit_code: int) -> None:
        # marks the W&B run failed instead of leaving it "running" until W&B times it out
        close_run(self.run, exit_code)

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if self.logging:
            self.logging, _ = _attempt(f"{self.stage} {what}", fn,
                                       f"the {self.stage} run logs no more (it is still finished)")

    def _artifacts(self) -> list[Any]:
        import wandb

        group, label = group_name(self.cfg), run_label(self.cfg, self.stage)
        stage_dir = self.cfg.run_dir.resolve() / self.stage
        ckpt = wandb.Artifact(_artifact_name(group, label, "checkpoint"), type="model",
                              description=f"{self.stage} checkpoint and summary (referenced, not uploaded)")
        for fname, checksum in (("summary.json", True), ("checkpoint.pt", False)):
            if (stage_dir / fname).is_file():
                # checkpoint.pt: no checksum, it may be GBs; summary.json holds its weights hash.
                ckpt.add_reference(file_uri(stage_dir / fname), name=fname, checksum=checksum)
        arts = [ckpt]
        cache = self.cfg.run_dir.resolve() / stages.CACHE.name
        if self.stage == stages.STUDENT_KD.name and self.cfg.kd.teacher == "cached" \
                and (cache / "manifest.json").is_file():
            cached = wandb.Artifact(_artifact_name(group, label, stages.CACHE.name), type=stages.CACHE.name,
                                    metadata=json.loads((cache / "manifest.json").read_text()),
                                    description="teacher-logits cache (referenced; sha256 in the manifest)")
            cached.add_reference(file_uri(cache / "manifest.json"), name="manifest.json")
            cached.add_reference(file_uri(cache / "logits.npy"), name="logits.npy", checksum=False)
            arts.append(cached)
        return arts


def start_stage(cfg: Config, stage: str, env: DistEnv) -> StageTracker:
    """Called on rank 0 only, after the process group is up."""
    if not env.is_main or not enabled(cfg):
        return StageTracker()
    role, name = run_role(cfg.run_dir)
    run = init_run(cfg, stage, run_label(cfg, stage), lambda: {
        **cfg.to_dict(), "stage": stage, "run_role": role, "replica": name, "system": system_facts(cfg, env)})
    return WandbTracker(cfg, stage, run) if run is not None else StageTracker()


# -- the report -----------------------------------------------------------------------------


def log_report(cfg: Config, results: dict[str, Any], images: dict[str, Path]) -> None:
    """One `report` run in the group: the report's PNGs as images, the results as summary."""
    name = stages.REPORT.name
    run = init_run(cfg, name, run_label(cfg, name), lambda: {**cfg.to_dict(), "stage": name})
    if run is None:
        return

    def record() -> None:
        import wandb

        run.log({f"plots/{key}": wandb.Image(str(path), caption=key) for key, path in images.items()})
        run.summary.update({f"{k}/test_acc": v["test_acc"] for k, v in results.items()
                            if isinstance(v, dict) and "test_acc" in v})

    finish_run(run, "report logging", record)
