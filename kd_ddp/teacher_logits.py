"""Teacher logits cached to disk, for exactly the augmented views the KD student sees.

The cache holds `logits[view, sample, class]` for `kd.views` views of every training
sample, view v being `augment(seed, view=v)` of that sample. KD epoch e reads view
`e % views`, the same pixels the student is given, so the cache changes nothing about the
method; it only removes the teacher's forward pass from every KD step.

Size on disk: views x train_samples x classes x bytes(kd.cache_dtype), e.g.
8 x 50,000 x 10 x 2 B = 8 MB for CIFAR-10 in float16.

A manifest beside the array records a content key (teacher weights hash, training data
hash, augmentation policy, views, seed, dtype) and a checksum; `open_cache` refuses a
cache whose key differs from what the student is about to train with, or whose file is
truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_ddp.augment import augment, normalize, to_device
from kd_ddp.checkpoint import NoSpaceError, atomic_write_json, reserve_space
from kd_ddp.config import Config, describe_differences
from kd_ddp.data import EvalLoader, PreparedData
from kd_ddp.distributed import DistEnv, barrier, broadcast_object

log = logging.getLogger(__name__)

AUGMENTATION_POLICY = "crop-pad-zero+hflip/splitmix64-v1"
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A logits cache that must not be used: printed as a message, never as a traceback."""


def cache_dir(cfg: Config) -> Path:
    return cfg.run_dir / "teacher-logits"


def cache_key(cfg: Config, data: PreparedData, teacher_hash: str) -> dict[str, Any]:
    return {
        "teacher_weights": teacher_hash,
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


def check_cache(cfg: Config, data: PreparedData, teacher_hash: str) -> dict[str, Any]:
    """The manifest of a cache usable for this run, else CacheError saying what is wrong."""
    d = cache_dir(cfg)
    rebuild = "rebuild it with `kd-ddp cache-logits` (`kd-ddp pipeline` does so automatically)"
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError:
        raise CacheError(f"no teacher-logits cache in {d}: {rebuild}") from None
    except ValueError as e:
        raise CacheError(f"the cache manifest {d / 'manifest.json'} is corrupted ({e}): {rebuild}") from None
    diffs = describe_differences(cache_key(cfg, data, teacher_hash), manifest.get("key", {}), have_name="cache has")
    if diffs:
        raise CacheError(f"the teacher-logits cache in {d} was built for another setting:\n  "
                         + "\n  ".join(diffs) + f"\n{rebuild}")
    path = d / "logits.npy"
    if not path.is_file() or path.stat().st_size != manifest["size_bytes"]:
        size = path.stat().st_size if path.is_file() else 0
        raise CacheError(f"the cache file {path} is truncated or missing ({size} of "
                         f"{manifest['size_bytes']} bytes): {rebuild}")
    if _file_sha256(path) != manifest["sha256"]:
        raise CacheError(f"the cache file {path} is corrupted (checksum mismatch): {rebuild}")
    return manifest


class LogitsCache:
    """The cached logits in memory (they are small); `lookup(view, idx)` gives a batch's."""

    def __init__(self, cfg: Config, data: PreparedData, teacher_hash: str, device: torch.device) -> None:
        self.manifest = check_cache(cfg, data, teacher_hash)
        array = np.load(cache_dir(cfg) / "logits.npy")
        table = torch.from_numpy(array)
        if cfg.kd.cache_dtype == "bfloat16":
            table = table.view(torch.bfloat16)
        self.table = table.to(device)
        self.views = cfg.kd.views

    def lookup(self, view: int, indices: torch.Tensor) -> torch.Tensor:
        return self.table[view % self.views, to_device(indices, self.table.device)]


@torch.no_grad()
def teacher_view_logits(teacher: nn.Module, images: torch.Tensor, indices: torch.Tensor, *, cfg: Config,
                        view: int, mean: torch.Tensor, std: torch.Tensor,
                        amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The teacher's logits on view `view` of a batch: the same pixels the student gets."""
    x = normalize(augment(images, indices, seed=cfg.seed, view=view, padding=cfg.data.crop_padding,
                          flip=cfg.data.flip), mean, std, cfg.train.channels_last)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return teacher(x).float()


def build_cache(cfg: Config, env: DistEnv, data: PreparedData, teacher: nn.Module, teacher_hash: str,
                amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """Every rank computes its shard of every view into one memory-mapped file; rank 0
    checksums it and renames it into place, so a reader sees a complete cache or none."""
    d = cache_dir(cfg)
    n, classes = data.size("train"), data.num_classes
    shape = (cfg.kd.views, n, classes)
    tmp = d / f".logits.npy.tmp{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}"
    start = time.perf_counter()
    error = ""
    if env.is_main:
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)  # a stale manifest must not outlive its array
        np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY_DTYPES[cfg.kd.cache_dtype], shape=shape).flush()
        try:
            reserve_space(tmp)
        except NoSpaceError as e:
            error = str(e)
    error = broadcast_object(error, env)  # every rank stops, none waits at a barrier for rank 0
    if error:
        raise NoSpaceError(error)
    out = np.load(tmp, mmap_mode="r+")
    teacher.eval()
    mean, std = data.stats(env.device)
    loader = EvalLoader(cfg, data, env, split="train")
    torch_dtype = _TORCH_DTYPES[cfg.kd.cache_dtype]
    for view in range(cfg.kd.views):
        for images, _, idx in loader:
            logits = teacher_view_logits(teacher, images, idx, cfg=cfg, view=view, mean=mean, std=std,
                                         amp_dtype=amp_dtype).to(torch_dtype).cpu()
            if cfg.kd.cache_dtype == "bfloat16":
                logits = logits.view(torch.int16)
            out[view, idx.numpy()] = logits.numpy().view(out.dtype)
        if env.is_main:
            log.info("cached view %d/%d", view + 1, cfg.kd.views)
    out.flush()
    del out
    barrier(env)
    manifest: dict[str, Any] = {}
    if env.is_main:
        path = d / "logits.npy"
        os.replace(tmp, path)
        manifest = {
            "key": cache_key(cfg, data, teacher_hash),
            "shape": list(shape),
            "size_bytes": path.stat().st_size,
            "sha256": _file_sha256(path),
            "build_time_s": round(time.perf_counter() - start, 3),
            "world_size": env.world_size,
        }
        atomic_write_json(d / "manifest.json", manifest)
        log.info("teacher-logits cache: %s, %.1f MB, built in %.1f s", "x".join(map(str, shape)),
                 manifest["size_bytes"] / 1e6, manifest["build_time_s"])
    barrier(env)
    return manifest
