"""Does this Python have what the pipeline and the benchmarks need? Answered in seconds.

    python -m benchmarks.gpu_preflight [--need-cuda] [--deadline S] [--json FILE]
    python -m benchmarks.gpu_preflight --list [--json FILE]

The GPU machine's image brings its own packages at versions nobody pinned, and a package
missing or too old there used to surface minutes into the first long step (filelock 3.x
refuses the lock arguments kd_ddp/locks.py passes, so the first lock raised and nothing
ran). `scripts/gpu_check.sh` runs this first and stops when it fails. It checks, in order:

- each package of pyproject.toml's `dependencies` (and the ffcv and vision extras): it
  imports, and the version of the copy imported (a carried one in `.gpu/site` included) is
  in pyproject.toml's range; wandb is only reported (the check runs with tracking off), and
  FFCV's problems are warnings (on a GPU the data is held on the device: no step needs it);
- the lock arguments: a run-dir lock and a cache lock taken and released through
  kd_ddp.locks itself, in a temporary directory;
- every module of kd_ddp, launch and benchmarks imports;
- with --need-cuda: torch sees a GPU and runs an operation on it.

It prints one line per check as it goes, ends with the verdict, exits 1 naming every
problem, and gives up at --deadline seconds (default 20) naming what it was doing then.
--list only reports the versions and torch's CUDA facts (`env` step) and always exits 0.

Only the standard library is imported at the top, so that a missing package is reported
rather than raised.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import pkgutil
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("kd_ddp", "launch", "benchmarks")
EXTRAS = ("ffcv", "vision")  # of pyproject.toml's optional-dependencies, the ones the check uses
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "wandb-workspaces": "wandb_workspaces"}
# Imported beyond the top-level package: the parts the pipeline loads later.
SUBMODULES = {
    "ffcv": ("ffcv.fields", "ffcv.writer", "ffcv.loader", "ffcv.transforms"),
    "submitit": ("submitit.core.utils",),
}
# Reported, never imported: gpu_check.sh runs every command with tracking.wandb.mode=disabled,
# and kd_ddp imports wandb only when tracking is on.
NOT_USED_HERE = {"wandb", "wandb-workspaces"}
OPTIONAL = {"ffcv"}  # absent: data.loader=auto holds the data on the GPU, or uses the torch loader
# Checked last, after the locks and the project's modules: the slowest imports (FFCV compiles
# with numba as it loads), used by fewer steps (torchvision: the strong preset, two benchmarks).
LAST = ("torchvision", "ffcv")


@dataclass
class Package:
    dist: str
    spec: str
    role: str  # required | optional | not used here
    status: str = "not checked"  # ok | missing | broken | outside range | absent (optional) | not imported
    version: str | None = None
    path: str | None = None
    detail: str = ""


@dataclass
class Report:
    python: str = platform.python_version()
    executable: str = sys.executable
    packages: dict[str, Package] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)  # lock arguments, project modules, cuda: "ok ..." or problem
    torch: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # an optional package's problems: reported, not failed
    seconds: float = 0.0
    doing: str = "starting"  # what the checks were at: named when the deadline passes
    # True once everything a GPU step needs has been checked: only the slow imports of LAST
    # are left, and a deadline passing there is a warning, not a refusal
    required_done: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = not self.problems
        # a version, or why there is none: "(absent (optional))", "(missing)" ...
        out["versions"] = {p.dist: p.version or f"({p.status})" for p in self.packages.values()}
        return out


# -- pyproject.toml's ranges ----------------------------------------------------------


def read_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[tuple[str, str]]:
    """(distribution, version range) of the dependencies and of EXTRAS, as pyproject.toml declares them."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the two lists read by pattern
        lists = [_toml_list(text, "dependencies"), *(_toml_list(text, extra) for extra in EXTRAS)]
    else:
        project = tomllib.loads(text)["project"]
        lists = [project["dependencies"], *(project["optional-dependencies"][extra] for extra in EXTRAS)]
    return [parse_requirement(r) for reqs in lists for r in reqs]


def _toml_list(text: str, key: str) -> list[str]:
    m = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return re.findall(r'"([^"]+)"', re.sub(r"#.*", "", m.group(1))) if m else []


def parse_requirement(req: str) -> tuple[str, str]:
    """'submitit>=1.5.1,<2' -> ('submitit', '>=1.5.1,<2'); extras and markers dropped."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", req)
    if m is None:
        raise ValueError(f"cannot read the requirement {req!r}")
    return m.group(1).lower(), m.group(2).replace(" ", "")


# -- versions -------------------------------------------------------------------------


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: '2.11.0+cu130' -> (2, 11, 0). Pre- and post-release
    tags are ignored (no `packaging` here: it may be what is missing)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` is inside `spec` ('>=1.5.1,<2'; an empty spec holds any version)."""
    ops = {">=": lambda c: c >= 0, ">": lambda c: c > 0, "<=": lambda c: c <= 0, "<": lambda c: c < 0,
           "==": lambda c: c == 0, "!=": lambda c: c != 0, "~=": lambda c: c >= 0}
    for clause in filter(None, spec.split(",")):
        m = re.fullmatch(r"(>=|<=|==|!=|~=|>|<)(.+)", clause)
        if m is None:
            raise ValueError(f"cannot read the version range {spec!r}")
        op, want = m.groups()
        if not ops[op](_cmp(release(version), release(want))):
            return False
        if op == "~=" and release(version)[: len(release(want)) - 1] != release(want)[:-1]:
            return False
    return True


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(dist: str, module: ModuleType) -> tuple[str | None, str | None]:
    """(version, where) of the copy that was imported: the distribution recorded beside the
    module, so a carried copy in .gpu/site is not reported with the image's version."""
    file = getattr(module, "__file__", None)
    if file:
        where = Path(file).parent.parent  # the directory (or wheel) that holds the package
        for d in metadata.distributions(path=[str(where)]):
            if _norm(d.metadata["Name"] or "") == _norm(dist):
                return d.version, str(where)
    if getattr(module, "__version__", None):  # copied without its dist-info: what the module says
        return str(module.__version__), f"{Path(file).parent if file else '?'} (no dist-info beside it)"
    try:
        return metadata.version(dist), "(version from another copy's metadata)"
    except metadata.PackageNotFoundError:
        return None, None


# -- the checks -------------------------------------------------------------------------


def role_of(dist: str) -> str:
    return "not used here" if dist in NOT_USED_HERE else "optional" if dist in OPTIONAL else "required"


def check_package(pkg: Package) -> None:
    """Import it (and its SUBMODULES), read the version of what was imported, compare."""
    if pkg.role == "not used here":
        try:
            pkg.version, pkg.status = metadata.version(pkg.dist), "not imported"
        except metadata.PackageNotFoundError:
            pkg.status = "absent (not used here)"
        return
    name = IMPORT_NAMES.get(pkg.dist, pkg.dist.replace("-", "_"))
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        # An optional package whose import fails is one kd_ddp treats as absent (data.ffcv_available).
        absent = getattr(e, "name", None) == name
        pkg.status = ("absent (optional)" if absent else "unusable (optional)") if pkg.role == "optional" \
            else "missing" if absent else "broken"
        pkg.detail = f"{type(e).__name__}: {e}"
        return
    except Exception as e:  # there but does not load (a binary built for another Python)
        pkg.status, pkg.detail = "broken", f"{type(e).__name__}: {e}"
        return
    pkg.version, pkg.path = installed_version(pkg.dist, module)
    try:
        for sub in SUBMODULES.get(pkg.dist, ()):
            importlib.import_module(sub)
    except Exception as e:
        pkg.status, pkg.detail = "broken", f"{sub}: {type(e).__name__}: {e}"
        return
    if pkg.version is None:
        pkg.status, pkg.detail = "outside range", "no version recorded"
    elif not satisfies(pkg.version, pkg.spec):
        pkg.status = "outside range"
    else:
        pkg.status = "ok"


def problem_of(pkg: Package) -> str | None:
    if pkg.status in ("ok", "not imported", "absent (optional)", "absent (not used here)"):
        return None
    if pkg.status == "outside range":
        return f"{pkg.dist} {pkg.version} is outside pyproject.toml's range {pkg.spec}" + (
            f" ({pkg.detail})" if pkg.detail else "")
    return f"{pkg.dist} {pkg.status}: {pkg.detail}"


def check_locks() -> str | None:
    """Take and release a run-dir lock and a cache lock through kd_ddp.locks, the way a run
    does: filelock 3.x raises TypeError here (no fallback_to_soft / on_acquired)."""
    with tempfile.TemporaryDirectory(prefix="kd-preflight-") as tmp:
        try:
            from kd_ddp.locks import file_lock, lock_run_dir

            held = lock_run_dir(Path(tmp))
            holder = (Path(tmp) / ".kd-ddp.lock").read_text()
            held.release()
            with file_lock(Path(tmp) / "cache" / "prepare.lock"):
                pass
        except Exception as e:
            return f"kd_ddp.locks cannot take its locks with this filelock: {type(e).__name__}: {e}"
    if not holder.startswith("pid "):  # on_acquired did not run: the busy message would name no holder
        return f"kd_ddp.locks: the run-dir lock was taken but its holder was not recorded ({holder!r})"
    return None


def project_modules() -> list[str]:
    """Every module of kd_ddp, launch and benchmarks (their `__main__` excepted: it would run)."""
    names = []
    for pkg_name in PROJECT_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names += [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg_name + ".") if not m.name.endswith("__main__")]
    return names


def check_modules() -> tuple[int, list[str]]:
    imported, failed = 0, []
    for name in project_modules():
        try:
            importlib.import_module(name)
            imported += 1
        except Exception as e:
            failed.append(f"module {name} does not import: {type(e).__name__}: {e}")
    return imported, failed


def torch_facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cpus": os.cpu_count()}


def check_cuda() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no GPU (built for CUDA {torch.version.cuda})"
    try:  # a driver older than the build fails at the first kernel, not at is_available()
        torch.ones(8, device="cuda").sum().item()
    except Exception as e:
        return f"torch cannot run on the GPU: {type(e).__name__}: {e}"
    return None


# -- the run ----------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)  # as it goes: a run cut short still shows how far it got


def check_packages(report: Report, requirements: list[tuple[str, str]]) -> None:
    for dist, spec in requirements:
        report.doing = f"importing {dist}"
        pkg = report.packages[dist] = Package(dist, spec, role_of(dist))
        check_package(pkg)
        problem = problem_of(pkg)
        mark = "ok" if problem is None else "WARN" if pkg.role == "optional" else "FAIL"
        say(f"  {mark:4} {dist:17} {pkg.version or '-':14} {spec or 'any':12} {pkg.status}"
            f"{': ' + pkg.detail if pkg.detail and mark != 'ok' else ''}{'  ' + pkg.path if pkg.path else ''}")
        if problem is not None:
            (report.warnings if pkg.role == "optional" else report.problems).append(problem)


def run_checks(report: Report, need_cuda: bool, list_only: bool) -> None:
    requirements = read_requirements()
    check_packages(report, [r for r in requirements if r[0] not in LAST])
    if report.packages.get("torch") and report.packages["torch"].status == "ok":
        report.doing = "reading torch's CUDA facts"
        report.torch = torch_facts()
        say(f"  torch: CUDA {report.torch['cuda']}, cuDNN {report.torch['cudnn']}, NCCL {report.torch['nccl']}, "
            f"GPUs {report.torch['gpus'] or 'none'}, {report.torch['cpus']} CPUs")
    if not list_only:
        check_project(report, need_cuda)
    report.required_done = True
    check_packages(report, [r for r in requirements if r[0] in LAST])


def check_project(report: Report, need_cuda: bool) -> None:
    report.doing = "taking kd_ddp's locks"
    _record(report, "lock arguments", check_locks(), "a run-dir lock and a cache lock taken and released")
    report.doing = "importing the project's modules"
    imported, failed = check_modules()
    report.problems += failed
    report.checks["project modules"] = f"{imported} imported, {len(failed)} failed"
    say(f"  {'ok' if not failed else 'FAIL':4} project modules: {imported} imported"
        + "".join(f"\n  FAIL {f}" for f in failed))
    if need_cuda:
        report.doing = "running an operation on the GPU"
        _record(report, "cuda", check_cuda(), "an operation ran on the GPU")


def _record(report: Report, name: str, problem: str | None, ok: str) -> None:
    report.checks[name] = problem or f"ok: {ok}"
    if problem:
        report.problems.append(problem)
    say(f"  {'ok' if problem is None else 'FAIL':4} {name}: {problem or ok}")


def finish(report: Report, a: argparse.Namespace, t0: float) -> int:
    """Write the JSON report (if asked), print the verdict line; the exit code."""
    report.seconds = round(time.perf_counter() - t0, 2)
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if a.list:
        say(f"preflight --list: done in {report.seconds} s")
        return 0
    verdict = "ok" if not report.problems else "FAILED: " + "; ".join(report.problems)
    if report.warnings:
        verdict += " (warnings: " + "; ".join(report.warnings) + ")"
    say(f"preflight: {verdict} ({report.seconds} s)")
    return 0 if not report.problems else 1


FINISHING = threading.Lock()  # taken by whichever ends the run: the checks, or the deadline


def arm_deadline(report: Report, a: argparse.Namespace, t0: float) -> threading.Timer:
    """At the deadline, report what the checks were at and end the process, whatever the main
    thread is doing. A watchdog thread rather than an exception raised into the main thread: a
    SIGALRM exception landing inside an import was swallowed or turned into another error by
    the code being imported (seen on a loaded machine: a 1 s deadline ended 'ok' after 12 s,
    torchvision 'broken' by a RecursionError). The thread needs the GIL, which a long C call
    can hold: faulthandler ends the process 10 s later if it never gets it."""
    def expire() -> None:
        if not FINISHING.acquire(blocking=False):
            return  # the checks ended just now: main prints their verdict
        late = f"deadline of {a.deadline} s passed while {report.doing}"
        if report.required_done:  # the GPU steps' needs all checked; the rest is optional
            report.warnings.append(f"{late} (not checked: {', '.join(LAST)})")
        else:
            report.problems.append(late)
        code = finish(report, a, t0)
        sys.stdout.flush()
        os._exit(code)

    timer = threading.Timer(a.deadline, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(a.deadline + 10, exit=True)
    return timer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--need-cuda", action="store_true", help="fail unless torch runs an operation on a GPU")
    p.add_argument("--deadline", type=int, default=20, help="give up after this many seconds (default 20)")
    p.add_argument("--list", action="store_true", help="only report the versions and CUDA facts; exit 0")
    p.add_argument("--json", default="", help="write the report to this file as well")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    report = Report()
    say(f"preflight: Python {report.python} ({report.executable}); ranges from {REPO / 'pyproject.toml'}")
    timer = arm_deadline(report, a, t0)
    run_checks(report, a.need_cuda, a.list)
    if not FINISHING.acquire(blocking=False):
        time.sleep(60)  # the deadline came first: its thread reports and ends the process
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    return finish(report, a, t0)


if __name__ == "__main__":
    sys.exit(main())
