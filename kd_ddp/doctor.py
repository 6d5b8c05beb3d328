"""`kd-ddp doctor [--preset P] [section.field=value ...]`: what this machine gives kd-ddp.

Versions (Python, torch and its CUDA build, the other dependencies), FFCV, GPUs, NCCL, the
CPUs and memory this process may use, the Slurm job it runs in (if any), and for the run dir,
the data cache and the data source: whether they exist, their filesystem type, free space,
and whether a lock can be taken there. Run it where the jobs run, e.g. `srun -p gpu
--gpus-per-node=1 kd-ddp doctor --preset seed run.dir=/shared/runs/x`: a login node often has
another Python, no GPU and other mounts. Exit status 1 when something the config needs is
missing (FFCV for data.loader=ffcv, a GPU for train.device=cuda, an unwritable cache), else 0.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from kd_ddp.config import Config

# Filesystems that live on one node: a path there is not what the other nodes see.
NODE_LOCAL_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "overlay"})
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "matplotlib", "submitit", "filelock", "psutil", "wandb")


@dataclass
class Finding:
    status: str  # ok | warn | fail | info
    what: str
    detail: str


def filesystem(path: Path) -> tuple[str, str]:
    """(type, mount point) of the filesystem that holds `path`, or of its nearest existing
    ancestor. psutil reads the mount table, which pathlib and os do not."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    real = os.path.realpath(path)
    best = ("?", "/")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (part.fstype, mount)
    return best


def node_local(path: Path) -> str:
    """The filesystem type when `path` lies on one that only this node sees, else ""."""
    fstype = filesystem(path)[0]
    return fstype if fstype in NODE_LOCAL_FS else ""


def versions() -> list[Finding]:
    out = [Finding("info", "python", f"{sys.version.split()[0]} ({sys.executable})")]
    try:
        out.append(Finding("info", "kd-ddp", importlib.metadata.version("kd-ddp")))
    except importlib.metadata.PackageNotFoundError:
        out.append(Finding("info", "kd-ddp", f"not installed; running from {Path(__file__).parents[1]}"))
    for name in PACKAGES:
        try:
            out.append(Finding("info", name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append(Finding("warn", name, "not installed"))
    return out


def ffcv(cfg: Config) -> Finding:
    try:
        import ffcv as _ffcv  # noqa: F401
    except Exception as e:  # ImportError, or a broken build that fails to load its libraries
        status = "fail" if cfg.data.loader == "ffcv" else "warn"
        return Finding(status, "ffcv", f"does not import ({type(e).__name__}: {e}); data.loader={cfg.data.loader}"
                       + (": install kd-ddp[ffcv] or use data.loader=torch" if status == "fail" else
                          " falls back to the torch loader"))
    return Finding("ok", "ffcv", importlib.metadata.version("ffcv"))


def gpus(cfg: Config) -> list[Finding]:
    import torch

    from kd_ddp.distributed import cuda_visibility

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    out = [Finding("info", "torch build", build)]
    if not torch.cuda.is_available():
        status = "fail" if cfg.train.device == "cuda" else "info"
        out.append(Finding(status, "gpus", f"none visible ({cuda_visibility()})"))
        return out
    names = [f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
             for i in range(torch.cuda.device_count())]
    out.append(Finding("ok", "gpus", "; ".join(names)))
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    out.append(Finding("ok" if nccl else "warn", "nccl", ".".join(map(str, nccl)) if nccl else "not available"))
    return out


def cpus_and_memory() -> list[Finding]:
    from kd_ddp.distributed import available_cores, rank_cpus

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    mem = psutil.virtual_memory()
    return [Finding("info", "cpus", f"{available_cores()} usable of {os.cpu_count()}; a rank here gets "
                                    f"{rank_cpus(local)} (torch threads, FFCV workers)"),
            Finding("info", "memory", f"{mem.total / 2**30:.1f} GiB, {mem.available / 2**30:.1f} GiB available")]


def slurm() -> Finding:
    keys = ("SLURM_JOB_ID", "SLURMD_NODENAME", "SLURM_CPUS_PER_TASK", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
    found = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return Finding("info", "slurm", ", ".join(found) if "SLURM_JOB_ID" in os.environ else "not in a Slurm job")


def storage(what: str, path: Path, writable: bool) -> Finding:
    """Existence, filesystem, free space and (for `writable` paths) a real write and lock."""
    from kd_ddp.locks import LockUnsupported, file_lock

    fstype, mount = filesystem(path)
    where = f"{path} ({fstype} on {mount}"
    if not path.exists():
        if not writable:
            return Finding("fail", what, f"{path} does not exist")
        where += ", not created yet"
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    where += f", {shutil.disk_usage(probe).free / 2**30:.1f} GiB free)"
    if writable:
        try:
            with (tempfile.TemporaryDirectory(dir=probe, prefix=".kd-ddp-doctor-") as d,
                  file_lock(Path(d) / "probe.lock")):
                pass
        except (OSError, LockUnsupported) as e:
            return Finding("fail", what, f"{where}: cannot write and lock there: {e}")
    if fstype in NODE_LOCAL_FS:
        return Finding("warn", what, f"{where}: {fstype} is local to this node; other nodes do not see it")
    return Finding("ok", what, where)


def findings(cfg: Config) -> list[Finding]:
    out = [*versions(), ffcv(cfg), *gpus(cfg), *cpus_and_memory(), slurm()]
    out.append(storage("run.dir", cfg.run_dir.absolute(), writable=True))
    out.append(storage("data cache", cfg.cache_dir.absolute(), writable=True))
    if cfg.data.source != "synthetic":
        out.append(storage("data.root", Path(cfg.data.root).absolute(), writable=False))
    return out


def main(cfg: Config) -> int:
    results = findings(cfg)
    for f in results:
        print(f"{f.status:<5} {f.what:<12} {f.detail}")
    failed = [f.what for f in results if f.status == "fail"]
    if failed:
        print(f"kd-ddp doctor: {len(failed)} problem(s): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
