"""Operators (and on a GPU, kernels) dispatched per training step of each role, before/after.

    python -m benchmarks.kernel_count [--repo BASELINE_CHECKOUT] [--json OUT]

Counts, with torch.profiler, what one call of `kd_ddp.train.Trainer.train_step` dispatches
for each role: teacher (CE), normal student (MSE), cached-KD student (teacher logits from a
table) and live-KD student (a teacher forward inside the step). The step is built by the
measured checkout's own `benchmarks.train_step.synthetic` / `step_fn` (one in-memory batch
of synthetic data, the quick preset's models); the KD teacher logits come as in
`benchmarks.profile_step.kd_step` (a random table, or a live untrained teacher: its ops are
those of a trained one). Reported per role, per step:

- aten ops: top-level (dispatched by the step's Python: an aten op under no other aten op)
  and all (with those the top-level ones dispatch in turn), and the top ops by count;
- a breakdown by phase, from markers that change nothing in kd_ddp: the outermost module
  calls (a global forward hook opens a profiler range: the first is the forward, later ones
  the live teacher's), the optimizer's own `Optimizer.zero_grad#`/`Optimizer.step#` ranges
  and the autograd engine's `evaluate_function` ranges (backward); what lies before the
  forward is the augmentation + normalize, between forward and backward the loss (with the
  non-finite flag), after `Optimizer.step` the tally (and the LR scheduler);
- on CUDA also the kernel launches (`cudaLaunchKernel`-type runtime calls, per phase) and
  the device kernels.

Counts are deterministic (each profiled step's count is checked against the others), so the
machine's load does not change them. With `--repo PATH`, the checkout at PATH ("before") and
this one ("after") are measured in one run, each in its own subprocess that imports kd_ddp and
benchmarks.train_step from its checkout (cwd and PYTHONPATH), side by side in one table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parents[1]  # the checkout this benchmark runs from ("after")
ROLES = ("teacher", "student-normal", "student-kd cached", "student-kd live")
PHASES = ("augment+normalize", "forward", "loss", "teacher forward", "backward", "optimizer", "tally", "other")
_STEP, _MODULE = "kernel_count:step", "kernel_count:module"
_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
             "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


@contextlib.contextmanager
def module_ranges() -> Iterator[None]:
    """A profiler range around each outermost nn.Module call (global hooks; no module changed)."""
    depth: list[Any] = []

    def pre(module: torch.nn.Module, args: Any) -> None:
        if not depth:
            depth.append(record_function(_MODULE).__enter__())
        else:
            depth.append(None)

    def post(module: torch.nn.Module, args: Any, out: Any) -> None:
        rf = depth.pop()
        if rf is not None:
            rf.__exit__(None, None, None)

    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _ancestors(e: FunctionEvent) -> Iterator[FunctionEvent]:
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _phase(e: FunctionEvent, marks: dict[str, Any]) -> str:
    for a in _ancestors(e):
        if a.name.startswith(("Optimizer.zero_grad", "Optimizer.step")):
            return "optimizer"
        if a.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if a.name == _MODULE:
            return "forward" if a is marks["modules"][0] else "teacher forward"
    t = e.time_range.start
    if not marks["modules"]:
        return "other"  # no module call seen (a captured graph, say): no phase to tell
    for phase, start in (("augment+normalize", marks["modules"][0].time_range.start),
                         ("loss", marks["backward"]), ("optimizer", marks["opt_step"])):
        if start is not None and t < start:
            return phase
    return "tally"


def _marks(events: list[FunctionEvent]) -> dict[str, Any]:
    """The step's phase boundaries: its module ranges, first backward and Optimizer.step."""
    def first(pred: Callable[[FunctionEvent], bool]) -> float | None:
        return min((e.time_range.start for e in events if pred(e)), default=None)
    return {"modules": sorted((e for e in events if e.name == _MODULE), key=lambda e: e.time_range.start),
            "backward": first(lambda e: e.name.startswith("autograd::engine::evaluate_function")),
            "opt_step": first(lambda e: e.name.startswith("Optimizer.step"))}


def _is_aten(e: FunctionEvent) -> bool:
    return e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")


def count_step(step: Callable[[], None], steps: int = 3, warmup: int = 2, top: int = 10) -> dict[str, Any]:
    """What one call of `step` dispatches, counted over `steps` profiled calls after `warmup`."""
    for _ in range(warmup):  # lazy state (momentum buffers, oneDNN primitives) made here, not counted
        step()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(_STEP):
                step()
            if cuda:
                torch.cuda.synchronize()
    events = list(prof.events())
    step_events = sorted((e for e in events if e.name == _STEP), key=lambda e: e.time_range.start)
    assert len(step_events) == steps, (len(step_events), steps)
    per_step = []
    for s in step_events:
        # by time, not by parent: on a GPU the backward runs on the autograd engine's own thread
        inside = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e is not s
                  and s.time_range.start <= e.time_range.start <= s.time_range.end]
        marks = _marks(inside)
        aten = [e for e in inside if _is_aten(e)]
        top_level = [e for e in aten if not any(a.name.startswith("aten::") for a in _ancestors(e))]
        launches = [e for e in inside if e.name in _LAUNCHES]
        phases: dict[str, dict[str, int]] = {p: {"top": 0, "all": 0, "launches": 0} for p in PHASES}
        for kind, group in (("top", top_level), ("all", aten), ("launches", launches)):
            for e in group:
                phases[_phase(e, marks)][kind] += 1
        per_step.append({"aten_top": len(top_level), "aten_all": len(aten), "launches": len(launches),
                         "phases": phases, "ops": collections.Counter(e.name for e in aten)})
    first = per_step[0]
    stable = all(p == first for p in per_step)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return {"aten_top": first["aten_top"], "aten_all": first["aten_all"],
            "phases": {p: v for p, v in first["phases"].items() if any(v.values())},
            "top_ops": first["ops"].most_common(top), "stable": stable, "steps": steps,
            "per_step_aten_all": [p["aten_all"] for p in per_step],
            "cuda_launches": first["launches"] if cuda else None,
            "cuda_kernels": len(kernels) / steps if cuda else None}


def role_steps(batch: int, overrides: list[str] | None = None, device: torch.device | None = None,
               work: Path | None = None, roles: tuple[str, ...] = ROLES) -> dict[str, Callable[[], None]]:
    """`roles`' `Trainer.train_step` each on one in-memory synthetic batch, via the imported
    checkout's benchmarks.train_step helpers (the quick preset's models, then `overrides`;
    data and run dirs under `work`, a new temp dir by default)."""
    from benchmarks import train_step
    from kd_ddp import stages

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    work = work or Path(tempfile.mkdtemp(prefix="kd-kernel-count-"))
    over = ["train.amp=off", *(overrides or [])]

    def setup() -> tuple:
        return train_step.synthetic(work / "cache", work / "run", batch, over, device)

    def kd(live: bool) -> Callable[[], None]:
        cfg, env, data = setup()
        logits = train_step.kd_teacher_logits(cfg, env, data, live)
        return train_step.step_fn(cfg, env, data, stages.STUDENT_KD.name, logits)

    build = {"teacher": lambda: train_step.step_fn(*setup(), stages.TEACHER.name),
             "student-normal": lambda: train_step.step_fn(*setup(), stages.STUDENT_NORMAL.name),
             "student-kd cached": lambda: kd(False), "student-kd live": lambda: kd(True)}
    return {role: build[role]() for role in roles}


def machine() -> str:
    name = ""
    with contextlib.suppress(OSError):
        name = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{name or 'unknown CPU'} ({os.cpu_count()} CPUs), {gpu}, torch {torch.__version__}"


def _worker(out: Path, batch: int, steps: int) -> None:
    """In the measured checkout's process: count every role, write JSON to `out`."""
    torch.set_num_threads(1)  # counts do not depend on it; the shared cores do
    import kd_ddp
    result = {"kd_ddp": str(Path(kd_ddp.__file__).resolve().parent), "device": "cuda" if torch.cuda.is_available()
              else "cpu", "roles": {}}
    for role, step in role_steps(batch).items():
        result["roles"][role] = count_step(step, steps)
        print(f"  {role}: {result['roles'][role]['aten_all']} aten ops", file=sys.stderr, flush=True)
    out.write_text(json.dumps(result))


def _revision(repo: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(repo: Path, batch: int, steps: int) -> dict[str, Any]:
    """Run the counting in a subprocess importing kd_ddp (and benchmarks.train_step) from `repo`."""
    tmp = Path(tempfile.mkdtemp(prefix="kd-kernel-count-"))
    try:
        out = tmp / "counts.json"
        code = "import runpy, sys; sys.argv[0] = sys.argv.pop(1); runpy.run_path(sys.argv[0], run_name='__main__')"
        env = {**os.environ, "PYTHONPATH": str(repo), "TMPDIR": str(tmp)}
        cmd = [sys.executable, "-c", code, str(Path(__file__).resolve()), "--worker", str(out),
               "--batch", str(batch), "--steps", str(steps)]
        subprocess.run(cmd, cwd=repo, env=env, check=True)
        result = json.loads(out.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if Path(result["kd_ddp"]) != (repo / "kd_ddp").resolve():
        raise RuntimeError(f"measured {result['kd_ddp']}, not the kd_ddp of {repo}")
    return result | {"repo": str(repo), "revision": _revision(repo)}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _diff(before: Any, after: Any) -> str:
    """after - before, of numbers or of "top/all" pairs."""
    if isinstance(before, str) and isinstance(after, str):
        return "/".join(_diff(int(b), int(a)) for b, a in zip(before.split("/"), after.split("/"), strict=True))
    if isinstance(before, int | float) and isinstance(after, int | float):
        return f"{after - before:+g}"
    return ""


def markdown(runs: dict[str, dict[str, Any]], top: int = 8) -> str:
    cols = list(runs)
    out = ["| role | per step | " + " | ".join(cols) + (" | after - before |" if len(cols) == 2 else " |"),
           "|---|---|" + "---|" * (len(cols) + (len(cols) == 2))]
    for role in ROLES:
        r = {c: runs[c]["roles"][role] for c in cols}
        rows: list[tuple[str, list[Any]]] = [("aten ops, top-level", [r[c]["aten_top"] for c in cols]),
                                             ("aten ops, all", [r[c]["aten_all"] for c in cols])]
        phases = [p for p in PHASES if any(p in r[c]["phases"] for c in cols)]
        rows += [(f"  {p}: top-level / all", [
            "/".join(str(r[c]["phases"].get(p, {}).get(k, 0)) for k in ("top", "all")) for c in cols])
            for p in phases]
        if any(r[c]["cuda_launches"] is not None for c in cols):
            rows += [("CUDA kernel launches", [r[c]["cuda_launches"] for c in cols]),
                     ("CUDA device kernels", [r[c]["cuda_kernels"] for c in cols])]
        for i, (name, vals) in enumerate(rows):
            diff = ""
            if len(cols) == 2:
                diff = f" {_diff(*vals)} |"
            out.append(f"| {role if i == 0 else ''} | {name} | " + " | ".join(_fmt(v) for v in vals) + " |" + diff)
    out += ["", "Top aten ops by count per step (all levels):", ""]
    for role in ROLES:
        counts = {c: dict(runs[c]["roles"][role]["top_ops"]) for c in cols}
        names = list(dict.fromkeys(n for c in cols for n in counts[c]))[:top]
        out.append(f"- {role}: " + "; ".join(f"{n} " + "/".join(str(counts[c].get(n, "?")) for c in cols)
                                            for n in names))
    unstable = [f"{c} {role}" for c in cols for role in ROLES if not runs[c]["roles"][role]["stable"]]
    if unstable:
        out += ["", "Counts differed between profiled steps (first step reported): " + ", ".join(unstable)]
    return "\n".join(out)


def run(checkouts: dict[str, Path], batch: int = 64, steps: int = 3) -> dict[str, dict[str, Any]]:
    """Each checkout's counts (column name -> checkout), one subprocess each, in order."""
    runs = {}
    for col, repo in checkouts.items():
        print(f"{col}: {repo}", file=sys.stderr, flush=True)
        runs[col] = measure(repo.resolve(), batch, steps)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_count")
    p.add_argument("--repo", type=Path, help="a baseline checkout (before) to measure beside this one (after)")
    p.add_argument("--json", type=Path, help="write the counts here")
    p.add_argument("--batch", type=int, default=64, help="the batch (op counts do not depend on it)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per role (after 2 warm-up steps)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a.worker, a.batch, a.steps)
        return
    runs = run({"before": a.repo, "after": HERE} if a.repo else {"this checkout": HERE}, a.batch, a.steps)
    print(f"Machine: {machine()}; batch {a.batch}, quick preset models, fp32, {runs[next(iter(runs))]['device']}")
    for col, r in runs.items():
        print(f"{col}: {r['repo']} at {r['revision']}")
    print()
    print(markdown(runs))
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "batch": a.batch, "runs": runs}, indent=1) + "\n")

if __name__ == "__main__":
    main()
