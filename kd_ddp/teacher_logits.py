"""Teacher logits cached to disk, for exactly the augmented views the KD student sees.

The cache holds `logits[view, sample, class]` for `kd.views` views of every training
sample, view v being `augment(seed, view=v)` of that sample. KD epoch e reads view
`e % views`, the same pixels the student is given, so the cache changes nothing about the
method; it only removes the teacher's forward pass from every KD step.

Size on disk: views x train_samples x classes x bytes(kd.cache_dtype), e.g.
8 x 50,000 x 10 x 2 B = 8 MB for CIFAR-10 in float16.

A manifest beside the array records a content key (the teacher: weights hash, architecture
record and the precision its forward ran in; training data hash, augmentation policy, views,
seed, dtype) and a checksum; `check_cache` and `LogitsCache` refuse a cache whose key
differs from what the student is about to train with, or whose file is truncated or
corrupted. `LogitsCache` checksums the very bytes it then uses, read once.

One lock (`cache_lock`) covers building the cache and reading it: `cache-logits` holds it
while it checks and builds, a KD student while it loads, so neither sees the other's
half-done work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_ddp import stages
from kd_ddp.augment import StudentInput, to_device
from kd_ddp.checkpoint import NoSpaceError, atomic_write_json, reserve_space
from kd_ddp.config import Config, describe_differences
from kd_ddp.data import EvalLoader, PreparedData, eval_indices
from kd_ddp.distributed import DistEnv, all_gather_object, barrier, broadcast_object, main_does
from kd_ddp.locks import LockUnsupported, LockWaitTimeout, file_lock
from kd_ddp.precision import autocast

log = logging.getLogger(__name__)

AUGMENTATION_POLICY = "crop-pad-zero+hflip/splitmix64-v1"
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A logits cache that must not be used: printed as a message, never as a traceback."""


@dataclass(frozen=True)
class TeacherRecord:
    """What fixes a teacher's logits. Its weights alone do not: two architectures with the
    same parameters (torchvision's stem or the CIFAR one, other keyword arguments) load the
    same weights and compute other logits, and so does another autocast precision."""

    weights: str  # checkpoint.weights_hash of its state_dict
    model: Any  # its architecture record (models.architecture), as its checkpoint records it
    precision: str  # the autocast dtype its forward runs in (train.precision_name)
    # Whether a key recorded before model and precision were part of it (the weights alone)
    # stands for this record: only when the teacher's checkpoint records this very model and
    # precision, i.e. the run dir was used in one setting throughout (see train.load_trained_teacher)
    legacy_ok: bool = False

    def key(self) -> dict[str, Any]:
        return {"teacher_weights": self.weights, "teacher_model": self.model, "teacher_precision": self.precision}


# the fields of TeacherRecord.key that keys recorded before 2026-12 lack
RECORD_FIELDS = ("teacher_model", "teacher_precision")


def without_record_fields(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if k not in RECORD_FIELDS}


def cache_dir(cfg: Config, member: int = 1) -> Path:
    """The logits cache of the run's teacher, or of ensemble member `member` (stages.cache_name)."""
    return cfg.run_dir / stages.cache_name(member)


def cache_lock_path(cfg: Config, member: int = 1) -> Path:
    """Beside the cache's real directory: a sweep point's run dir links to a shared cache, and
    its students must take the lock the cache's builder takes, not one of their own run dir."""
    real = cache_dir(cfg, member).resolve()
    return real.parent / f".kd-ddp.{real.name}.lock"


@contextlib.contextmanager
def cache_lock(cfg: Config, env: DistEnv, member: int = 1) -> Iterator[None]:
    """Hold the cache's lock while this job's ranks check, build or load the cache. Rank 0
    takes it (waiting its turn, see locks.file_lock); the other ranks touch the files only
    once it holds it, and it lets go only once they are done."""
    with contextlib.ExitStack() as held:

        def take() -> None:
            held.enter_context(file_lock(cache_lock_path(cfg, member)))

        # rank 0 tells the others whether it holds the lock: one that gave up waiting must not
        # leave them in a barrier until the process group's timeout
        main_does(take, env, (LockWaitTimeout, LockUnsupported), RuntimeError)
        yield
        barrier(env)


def cache_key(cfg: Config, data: PreparedData, teacher: TeacherRecord) -> dict[str, Any]:
    return teacher.key() | {
        "train_data": data.content_hash,
        "augmentation": {"policy": AUGMENTATION_POLICY, "crop_padding": cfg.data.crop_padding,
                         "flip": cfg.data.flip},
        "views": cfg.kd.views,
        "seed": cfg.seed,
        "dtype": cfg.kd.cache_dtype,
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


REBUILD = "rebuild it with `kd-ddp cache-logits` (`kd-ddp pipeline` does so automatically)"


def _read_manifest(d: Path) -> dict[str, Any]:
    path = d / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"no teacher-logits cache in {d}: {REBUILD}") from None
    except ValueError as e:
        raise CacheError(f"the cache manifest {path} is corrupted ({e}): {REBUILD}") from None
    if not isinstance(manifest, dict) or not all(k in manifest for k in ("key", "size_bytes", "sha256")):
        raise CacheError(f"the cache manifest {path} is corrupted (it lacks key, size_bytes or sha256): {REBUILD}")
    return manifest


def _check_key(cfg: Config, data: PreparedData, teacher: TeacherRecord, manifest: dict[str, Any], d: Path) -> None:
    """CacheError naming what differs when the cache was built for another setting. A key
    recorded before the teacher's model and precision were (it lacks both) is compared
    without them when the teacher record allows it (TeacherRecord.legacy_ok)."""
    want, have = cache_key(cfg, data, teacher), manifest.get("key") or {}
    legacy = not any(k in have for k in RECORD_FIELDS)
    if legacy and teacher.legacy_ok:
        want = without_record_fields(want)
    diffs = describe_differences(want, have, have_name="cache has")
    if diffs:
        note = ["(a cache that records no teacher model and precision was built before they were recorded; it is "
                "kept only when the teacher checkpoint records this config's model and precision)"] if legacy else []
        raise CacheError(f"the teacher-logits cache in {d} was built for another setting:\n  "
                         + "\n  ".join(diffs + note) + f"\n{REBUILD}")


def _check_size(path: Path, size: int, manifest: dict[str, Any]) -> None:
    if size != manifest["size_bytes"]:
        raise CacheError(f"the cache file {path} is truncated or missing ({size} of "
                         f"{manifest['size_bytes']} bytes): {REBUILD}")


def _corrupted(path: Path) -> CacheError:
    return CacheError(f"the cache file {path} is corrupted (checksum mismatch): {REBUILD}")


def check_cache(cfg: Config, data: PreparedData, teacher: TeacherRecord, member: int = 1) -> dict[str, Any]:
    """The manifest of a cache usable for this run, else CacheError saying what is wrong
    (the file is checksummed as it lies on disk; a reader uses LogitsCache, which checksums
    what it reads)."""
    d = cache_dir(cfg, member)
    manifest = _read_manifest(d)
    _check_key(cfg, data, teacher, manifest, d)
    path = d / "logits.npy"
    _check_size(path, path.stat().st_size if path.is_file() else 0, manifest)
    if _file_sha256(path) != manifest["sha256"]:
        raise _corrupted(path)
    return manifest


def _read_verified(path: Path, manifest: dict[str, Any]) -> bytes:
    """The cache file's bytes, read once, and checked against the manifest's size and sha256:
    the bytes then used are the ones checked, not a second read of the file."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        blob = b""
    _check_size(path, len(blob), manifest)
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise _corrupted(path)
    return blob


class LogitsCache:
    """The cached logits in memory (they are small); `lookup(view, idx)` gives a batch's.
    Hold `cache_lock` while constructing one (train.teacher_logits_source does)."""

    def __init__(self, cfg: Config, data: PreparedData, teacher: TeacherRecord, device: torch.device,
                 member: int = 1) -> None:
        d = cache_dir(cfg, member)
        self.manifest = _read_manifest(d)
        _check_key(cfg, data, teacher, self.manifest, d)
        array = np.load(io.BytesIO(_read_verified(d / "logits.npy", self.manifest)))
        table = torch.from_numpy(array)
        if cfg.kd.cache_dtype == "bfloat16":
            table = table.view(torch.bfloat16)
        self.table = table.to(device)
        self.views = cfg.kd.views

    def lookup(self, view: int, indices: torch.Tensor) -> torch.Tensor:
        return self.table[view % self.views, to_device(indices, self.table.device)]


def teacher_view_logits(teacher: nn.Module, images: torch.Tensor, indices: torch.Tensor, view: int,
                        student_input: StudentInput, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The teacher's logits on view `view` of a batch: the pixels the student gets, made by
    the student's own input function."""
    return teacher_logits(teacher, student_input(images, indices, view), amp_dtype)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The teacher's float32 logits on the student's input `x` of a batch."""
    with autocast(x.device, amp_dtype):
        return teacher(x).float()


def shard_view_logits(teacher: nn.Module, loader: EvalLoader, view: int, student_input: StudentInput,
                      amp_dtype: torch.dtype | None, dtype: torch.dtype, classes: int) -> torch.Tensor:
    """The teacher's logits, in the cache's `dtype`, on view `view` of every sample of the
    loader's shard (a contiguous range of samples), row i for sample loader.indices[0] + i:
    gathered on the device batch by batch, placed by sample index, with no host sync."""
    device = student_input.mean.device
    out = torch.empty((len(loader.indices), classes), dtype=dtype, device=device)
    first, done = int(loader.indices[0]) if len(loader.indices) else 0, 0
    for x, _, idx in loader.inputs(student_input, view):
        out[to_device(idx, device) - first] = teacher_logits(teacher, x, amp_dtype).to(dtype)
        done += len(idx)
    assert done == len(out), (done, len(out))  # sizes only: known on the host
    return out


def _host_rows(logits: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Device logits as an array of the cache file's numpy dtype (bfloat16 as its bits). The
    copy to the host waits for the view's last forward: the build's one host sync per view."""
    host = logits.cpu()
    if host.dtype == torch.bfloat16:
        host = host.view(torch.int16)
    return host.numpy().view(dtype)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_rows(path: Path, dtype: str, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy of `shape` with every block allocated now (see reserve_space), memory-mapped."""
    np.lib.format.open_memmap(path, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=shape).flush()
    reserve_space(path)
    return np.load(path, mmap_mode="r+")


def build_cache(cfg: Config, env: DistEnv, data: PreparedData, teacher: nn.Module, record: TeacherRecord,
                amp_dtype: torch.dtype | None, member: int = 1) -> dict[str, Any]:
    """Every rank computes its shard (a contiguous range of samples) of every view; rank 0
    joins them into the cache file, checksums it and renames it into place, so a reader sees
    a complete cache or none.

    No two processes write one file: rank 0 writes its rows straight into the cache file and
    every other rank into a shard file of its own, which rank 0 copies in. Ranks on other
    nodes writing rows of one shared memory-mapped file could lose rows on NFS, where a
    node's page write-back carries the stale neighbouring rows of that page with it.

    `member`: the ensemble member whose cache this is (stages.cache_name); its views are the
    student's (cfg.seed), whatever seed the member was trained with.
    """
    d = cache_dir(cfg, member)
    n, classes, views = data.size("train"), data.num_classes, cfg.kd.views
    start = time.perf_counter()
    if env.is_main:
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)  # a stale manifest must not outlive its array
    # one name for this build on every rank, unique across hosts and PID namespaces
    token = broadcast_object(f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}", env)
    tmp = d / f".logits.npy.tmp-{token}"
    mine = d / (tmp.name if env.is_main else f".logits.rank{env.rank}.npy.tmp-{token}")
    loader = EvalLoader(cfg, data, env, split="train")
    first = int(loader.indices[0]) if len(loader.indices) else 0
    rows: np.memmap | None = None
    error = ""
    try:
        shape = (views, n if env.is_main else len(loader.indices), classes)
        rows = _open_rows(mine, cfg.kd.cache_dtype, shape) if shape[1] else None
    except NoSpaceError as e:
        error = str(e)
    errors = [e for e in all_gather_object(error, env) if e]
    if errors:  # every rank stops, none waits at a barrier for another
        del rows
        mine.unlink(missing_ok=True)
        raise NoSpaceError(str(errors[0]))
    offset = 0 if env.is_main else first  # rows of `mine` are samples offset + i
    teacher.eval()
    student_input = StudentInput.of(cfg, *data.stats(env.device))
    torch_dtype = _TORCH_DTYPES[cfg.kd.cache_dtype]
    lo = first - offset  # this rank's shard in `mine`: rows lo .. lo + len(loader.indices) - 1
    for view in range(views):
        logits = shard_view_logits(teacher, loader, view, student_input, amp_dtype, torch_dtype, classes)
        if rows is not None:
            rows[view, lo: lo + len(logits)] = _host_rows(logits, rows.dtype)  # host sync: once per view
        if env.is_main:
            log.info("cached view %d/%d", view + 1, views)
    if rows is not None:
        rows.flush()
        del rows
        _fsync(mine)  # on a network filesystem, what rank 0 reads after the barrier must be on the server
    barrier(env)
    manifest: dict[str, Any] = {}
    if env.is_main:
        _join_shards(tmp, d, token, n, env.world_size)
        path = d / "logits.npy"
        os.replace(tmp, path)
        manifest = {
            "key": cache_key(cfg, data, record),
            "shape": [views, n, classes],
            "size_bytes": path.stat().st_size,
            "sha256": _file_sha256(path),  # of the file as it lies on disk, read back
            "build_time_s": round(time.perf_counter() - start, 3),
            "world_size": env.world_size,
        }
        atomic_write_json(d / "manifest.json", manifest)
        log.info("teacher-logits cache: %s, %.1f MB, built in %.1f s", "x".join(map(str, manifest["shape"])),
                 manifest["size_bytes"] / 1e6, manifest["build_time_s"])
    barrier(env)
    return manifest


def _join_shards(tmp: Path, d: Path, token: str, n: int, world: int) -> None:
    """Rank 0: copy the other ranks' shard files into its cache file, remove them, fsync."""
    out = np.load(tmp, mmap_mode="r+")
    for rank in range(1, world):
        rows = eval_indices(n, rank, world)
        if not len(rows):
            continue
        shard_path = d / f".logits.rank{rank}.npy.tmp-{token}"
        out[:, rows[0]: rows[-1] + 1] = np.load(shard_path, mmap_mode="r")
        shard_path.unlink()
    out.flush()
    del out
    _fsync(tmp)
