"""Readers that turn each supported data source into uint8 NHWC arrays and int64 labels.

Sources: `synthetic` (made on the fly), `imagefolder` (root/train/<class>/*, root/test/...),
`cifar-batches` (the official python pickles, as torchvision downloads them) and `archive`
(a .tar.gz holding an ImageFolder tree, extracted once into the cache dir).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kd_ddp.config import Config, ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(RuntimeError):
    """Bad input data: printed as a message, never as a traceback."""


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class RawDataset:
    train: Split
    test: Split
    classes: list[str]


# -- synthetic ------------------------------------------------------------------------


def synthetic(cfg: Config) -> RawDataset:
    """Class templates (coarse colour grids) plus noise: learnable in a few steps."""
    d = cfg.data
    rng = np.random.default_rng(12345)  # the data must not change with the training seed
    s = d.image_size
    grid = 4
    templates = rng.uniform(0, 255, size=(d.synthetic_classes, grid, grid, 3))
    templates = templates.repeat(s // grid + 1, axis=1).repeat(s // grid + 1, axis=2)[:, :s, :s]

    def make(n: int) -> Split:
        labels = np.arange(n, dtype=np.int64) % d.synthetic_classes
        rng.shuffle(labels)
        noise = rng.normal(0, 40, size=(n, s, s, 3))
        images = np.clip(templates[labels] * 0.7 + noise + 38, 0, 255).astype(np.uint8)
        return Split(images, labels)

    return RawDataset(make(d.synthetic_train), make(d.synthetic_test),
                      [f"class{i}" for i in range(d.synthetic_classes)])


# -- ImageFolder ----------------------------------------------------------------------


def _load_image(args: tuple[str, int, bool]) -> np.ndarray | None:
    """The image as (size, size, 3) uint8; None for an unreadable file when skipping them."""
    path, size, skip_bad = args
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt files
        if skip_bad:
            return None
        raise DataError(f"cannot read image {path}: {e} (data.skip_bad_images=true skips such files)") from None


def _visible(d: Path) -> list[Path]:
    """The entries of `d` in name order, without hidden ones (`.ipynb_checkpoints/`,
    `.DS_Store`, macOS `._name.jpg` resource forks), which are not data."""
    return sorted((p for p in d.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _list_split(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not root.is_dir():
        raise DataError(f"missing directory {root}")
    classes = [p.name for p in _visible(root) if p.is_dir()]
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"{root} needs at least two class sub-directories (one per class), found {found}")
    items = []
    for label, name in enumerate(classes):
        for p in _visible(root / name):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                items.append((str(p), label))
    if not items:
        raise DataError(f"{root} holds no images")
    return classes, items


def imagefolder(root: Path, image_size: int, workers: int, skip_bad: bool = False) -> RawDataset:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.root {root} does not exist")
    train_classes, train_items = _list_split(root / "train")
    test_classes, test_items = _list_split(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"train/ and test/ classes differ under {root}: "
                        f"only in train: {only_train}, only in test: {only_test}")
    splits = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for items in (train_items, test_items):
            arrays = list(pool.map(_load_image, [(p, image_size, skip_bad) for p, _ in items], chunksize=256))
            bad = [p for (p, _), a in zip(items, arrays) if a is None]
            if bad:
                log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), ", ".join(bad[:3]))
            kept = [(a, label) for a, (_, label) in zip(arrays, items) if a is not None]
            if not kept:
                raise DataError(f"no readable images under {root}")
            splits.append(Split(np.stack([a for a, _ in kept]), np.array([lab for _, lab in kept], dtype=np.int64)))
    return RawDataset(splits[0], splits[1], train_classes)


# -- official CIFAR-10 python batches -------------------------------------------------


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing CIFAR batch file {path}")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                     for im in images])


def cifar_batches(root: Path, image_size: int) -> RawDataset:
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (expected cifar-10-batches-py)")
    meta = _unpickle(root / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[b"label_names"]]

    def read(names: list[str]) -> Split:
        imgs, labels = [], []
        for name in names:
            batch = _unpickle(root / name)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            imgs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch[b"labels"])
        images = _resize_all(np.ascontiguousarray(np.concatenate(imgs)), image_size)
        return Split(images, np.array(labels, dtype=np.int64))

    train_names = sorted(p.name for p in root.glob("data_batch_*"))
    if not train_names:
        raise DataError(f"no data_batch_* files in {root}")
    return RawDataset(read(train_names), read(["test_batch"]), classes)


# -- archive --------------------------------------------------------------------------


def _find_imagefolder_root(top: Path) -> Path:
    for d in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    raise DataError(f"the archive holds no directory with train/ and test/ ({top})")


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract once into the cache dir (atomically: a temp dir renamed into place)."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir / "extracted" / f"{archive.name.split('.')[0]}-{key}"
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"cannot extract {archive}: {e}") from None
        tmp.rename(dest)
    return _find_imagefolder_root(dest)


def read_source(cfg: Config, workers: int) -> RawDataset:
    d = cfg.data
    if d.source == "synthetic":
        return synthetic(cfg)
    if d.source == "imagefolder":
        return imagefolder(Path(d.root), d.image_size, workers, d.skip_bad_images)
    if d.source == "cifar-batches":
        return cifar_batches(Path(d.root), d.image_size)
    if d.source == "archive":
        return imagefolder(extract_archive(Path(d.root), cfg.cache_dir), d.image_size, workers, d.skip_bad_images)
    raise ConfigError(f"unknown data.source {d.source!r}")
