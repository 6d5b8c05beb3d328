"""Readers that turn each supported data source into uint8 NHWC arrays and int64 labels.

Sources: `synthetic` (made on the fly), `imagefolder` (root/train/<class>/*, root/test/...),
`cifar-batches` (the official python pickles, as torchvision downloads them) and `archive`
(a .tar(.gz) holding an ImageFolder tree, decoded from the archive's bytes, never extracted).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import pickle
import posixpath
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


def _load_image(args: tuple[str, str | bytes, int, bool]) -> np.ndarray | None:
    """The image as (size, size, 3) uint8 from its file path or its bytes (`name` names it in
    messages); None for an unreadable image when skipping them."""
    name, source, size, skip_bad = args
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt files
        if skip_bad:
            return None
        raise DataError(f"cannot read image {name}: {e} (data.skip_bad_images=true skips such files)") from None


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
    _same_classes(train_classes, test_classes, root)
    return _decode_splits([[(p, p, label) for p, label in items] for items in (train_items, test_items)],
                          train_classes, str(root), image_size, workers, skip_bad)


def _same_classes(train: list[str], test: list[str], where: object) -> None:
    if train != test:
        raise DataError(f"train/ and test/ classes differ under {where}: only in train: "
                        f"{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))}")


def _decode_splits(splits: list[list[tuple[str, str | bytes, int]]], classes: list[str], where: str,
                   image_size: int, workers: int, skip_bad: bool) -> RawDataset:
    """Decode (name, path or bytes, label) items of the train and test splits across `workers`
    processes (the CPUs this rank owns)."""
    out = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for items in splits:
            arrays = list(pool.map(_load_image, [(n, src, image_size, skip_bad) for n, src, _ in items],
                                   chunksize=256))
            bad = [n for (n, _, _), a in zip(items, arrays) if a is None]
            if bad:
                log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), ", ".join(bad[:3]))
            kept = [(a, label) for a, (_, _, label) in zip(arrays, items) if a is not None]
            if not kept:
                raise DataError(f"no readable images under {where}")
            out.append(Split(np.stack([a for a, _ in kept]), np.array([lab for _, lab in kept], dtype=np.int64)))
    return RawDataset(out[0], out[1], classes)


# -- official CIFAR-10 python batches -------------------------------------------------


def _array_rebuilders() -> dict[tuple[str, str], object]:
    """The functions numpy pickles name to rebuild an array, under every name they have had:
    `numpy.core.multiarray` in the official files (Python 2, numpy 1), `numpy._core` since
    numpy 2, and `_frombuffer` in protocol-5 pickles. Taken from how this numpy reduces an
    array, so the same code works with numpy 1.26 and 2."""
    empty = np.zeros(0, dtype=np.uint8)
    reconstruct, frombuffer = empty.__reduce__()[0], empty.__reduce_ex__(5)[0]
    return {(package + suffix, fn.__name__): fn
            for package in ("numpy.core", "numpy._core")
            for suffix, fn in ((".multiarray", reconstruct), (".numeric", frombuffer))}


class _RefusedName(pickle.UnpicklingError):
    """A pickle names a callable that CIFAR batches never hold."""


class _CifarUnpickler(pickle.Unpickler):
    """Reads what a CIFAR python batch holds and nothing else. A pickle can name any callable
    and have it called while loading (a crafted batches.meta could run a shell); here the
    only names that resolve are numpy's array and dtype rebuilders and `_codecs.encode`
    (how Python 3's protocol 2 writes bytes); dicts, lists, str, bytes and numbers need no
    name at all."""

    ALLOWED: dict[tuple[str, str], object] = {
        **_array_rebuilders(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedName(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict:
    """The dict a CIFAR batch file holds; DataError naming the file when it is missing, is not
    a pickle, is cut short or holds anything but plain data and numpy arrays."""
    if not path.is_file():
        raise DataError(f"missing CIFAR batch file {path}")
    try:
        with open(path, "rb") as f:
            value = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR batch file {path}: {e.strerror}") from None
    except _RefusedName as e:
        raise DataError(f"CIFAR batch file {path} names {e}, which a CIFAR batch never holds: refused, not loaded "
                        "(loading a pickle runs what it names)") from None
    except Exception as e:  # a malformed pickle raises many types (EOFError, ValueError, KeyError, ...)
        raise DataError(f"CIFAR batch file {path} is not a readable CIFAR batch: {type(e).__name__}: {e}"
                        ) from None
    if not isinstance(value, dict):
        raise DataError(f"CIFAR batch file {path} holds a {type(value).__name__}, not a dict of the batch's fields")
    return value


def _field(batch: dict, key: bytes, path: Path) -> object:
    if key not in batch:
        raise DataError(f"CIFAR batch file {path} has no {key!r} entry (has {sorted(batch, key=repr)!r})")
    return batch[key]


def _class_names(path: Path) -> list[str]:
    names = _field(_unpickle(path), b"label_names", path)
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, bytes | str) for c in names):
        raise DataError(f"CIFAR batch file {path}: b'label_names' must be a list of at least two names")
    return [c.decode() if isinstance(c, bytes) else c for c in names]


def _batch_arrays(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(images as (N, 32, 32, 3) uint8, labels) of one batch file, its shapes and values checked."""
    batch = _unpickle(path)
    data, labels = _field(batch, b"data", path), _field(batch, b"labels", path)
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 3 * 32 * 32
            and np.issubdtype(data.dtype, np.integer)):
        shape = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR batch file {path}: b'data' must be an integer array of shape (N, 3072) "
                        f"(N images of 3x32x32 pixels), got a {shape}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"CIFAR batch file {path}: b'data' holds values outside 0..255")
    label_array = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
    if not (label_array is not None and label_array.shape == (len(data),)
            and (np.issubdtype(label_array.dtype, np.integer) or not len(data))
            and all(0 <= v < num_classes for v in label_array.tolist())):
        raise DataError(f"CIFAR batch file {path}: b'labels' must be a list of {len(data)} class indices "
                        f"in 0..{num_classes - 1} (one per row of b'data')")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), label_array.tolist()


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
    classes = _class_names(root / "batches.meta")

    def read(names: list[str]) -> Split:
        imgs, labels = [], []
        for name in names:
            images, batch_labels = _batch_arrays(root / name, len(classes))
            imgs.append(images)
            labels.extend(batch_labels)
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
    """Extract once into the cache dir (atomically: a temp dir renamed into place). Only the
    benchmarks need the tree on disk (torchvision's ImageFolder reads files); the `archive`
    source reads the archive in memory (read_archive)."""
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


def _archive_images(archive: Path) -> dict[str, bytes]:
    """Every image file of a .tar(.gz|.bz2|.xz) archive, read in one pass over its stream:
    member name (normalized, no leading ./) -> bytes. Links and special members are ignored;
    nothing is written to disk."""
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = posixpath.normpath(member.name).lstrip("/")
                if member.isfile() and posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file always has its bytes
                    files[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {archive}: {e}") from None
    return files


def _archive_split(files: dict[str, bytes], root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (member, label) items of root/split/<class>/<image> in the archive, with the
    rules of _list_split: hidden entries skipped, at least two classes."""
    prefix = f"{root}/{split}/" if root else f"{split}/"
    by_class: dict[str, list[str]] = {}
    for name in files:
        parts = name[len(prefix):].split("/") if name.startswith(prefix) else []
        if len(parts) == 2 and not any(part.startswith(".") for part in parts):
            by_class.setdefault(parts[0], []).append(name)
    classes = sorted(by_class)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"{prefix} in the archive needs at least two class directories of images, found {found}")
    return classes, [(name, label) for label, c in enumerate(classes) for name in sorted(by_class[c])]


def read_archive(archive: Path, image_size: int, workers: int, skip_bad: bool = False) -> RawDataset:
    """An ImageFolder tree inside an archive (the shallowest directory holding train/ and
    test/), decoded straight from the archive's bytes across `workers` processes. Nothing is
    extracted: writing CIFAR-10's 60,000 small files took longer than decoding them (a pass
    over the stream reads them in ~2 s on one core)."""
    archive = Path(archive)
    files = _archive_images(archive)
    dirs = {posixpath.dirname(posixpath.dirname(posixpath.dirname(n))) for n in files if n.count("/") >= 2}
    roots = sorted((d for d in dirs if any(n.startswith(f"{d}/test/" if d else "test/") for n in files)
                    and any(n.startswith(f"{d}/train/" if d else "train/") for n in files)),
                   key=lambda d: (d.count("/") + bool(d), d))
    if not roots:
        raise DataError(f"the archive {archive} holds no directory with train/ and test/ class directories of images")
    train_classes, train_items = _archive_split(files, roots[0], "train")
    test_classes, test_items = _archive_split(files, roots[0], "test")
    _same_classes(train_classes, test_classes, f"{archive}:{roots[0] or '/'}")
    return _decode_splits([[(n, files[n], label) for n, label in items] for items in (train_items, test_items)],
                          train_classes, str(archive), image_size, workers, skip_bad)


def read_source(cfg: Config, workers: int) -> RawDataset:
    d = cfg.data
    if d.source == "synthetic":
        return synthetic(cfg)
    if d.source == "imagefolder":
        return imagefolder(Path(d.root), d.image_size, workers, d.skip_bad_images)
    if d.source == "cifar-batches":
        return cifar_batches(Path(d.root), d.image_size)
    if d.source == "archive":
        return read_archive(Path(d.root), d.image_size, workers, d.skip_bad_images)
    raise ConfigError(f"unknown data.source {d.source!r}")
