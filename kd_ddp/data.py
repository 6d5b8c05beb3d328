"""From a data source to batches: prepared arrays and .beton files, then the two loaders.

`prepare_data` turns the configured source into, under one cache directory per source
(and, for a directory source, per listing of what it holds), `{train,test}_{images,labels}.npy`
(uint8 NHWC / int64) and `meta.json` (classes, normalization statistics computed on the
training split, file sizes and a content hash). meta.json is written last, so its presence
means the rest is complete. FFCV's `{train,test}.beton` (each sample's index stored as a
field) are written from those arrays when the FFCV loader first needs them (`ensure_beton`),
or by `kd-ddp prepare-data` when the run's loader is FFCV (`write_loader_files`).

The loaders (`data.loader`: FFCV reading the .beton, `torch` indexing the arrays in host
memory, `device` indexing them on the training device; `auto` chooses, see
`resolve_loader`) yield `(images, labels, indices)` with images as NHWC uint8 on the target
device; augmentation and normalization happen on that device (kd_ddp.augment). The sample
order of an epoch is a pure function of (seed, epoch) and is the same for every world size:
global batch k always holds the same samples, split across the ranks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_ddp.augment import StudentInput, chunk_size, to_device
from kd_ddp.checkpoint import NoSpaceError, atomic_output, atomic_write_json
from kd_ddp.config import Config, ConfigError, fingerprint
from kd_ddp.distributed import DistEnv, available_cores, main_does
from kd_ddp.locks import LockWaitTimeout, file_lock
from kd_ddp.sources import DataError, RawDataset, Split, read_source

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ffcv_available() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PreparedData:
    dir: Path
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    def size(self, split: str) -> int:
        return self.meta["sizes"][split]

    def file(self, name: str) -> Path:
        return self.dir / name

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.meta["mean"], device=device),
                torch.tensor(self.meta["std"], device=device))


DIRECTORY_SOURCES = ("imagefolder", "cifar-batches")


@dataclass(frozen=True)
class Listing:
    """What a directory source holds, as the file system tells it without reading a byte:
    every visible file's relative path, size, mtime and ctime, folded into one digest.
    Any added, removed, renamed, rewritten or touched file changes the digest (ctime too,
    so a rewrite that restores the old mtime, as `touch -r` or `cp -p` do, still counts)."""

    files: int
    digest: str

    def describe(self) -> str:
        return f"{self.files} files, listing {self.digest}"


def scan_source(root: Path) -> Listing:
    """The Listing of a directory tree. Hidden entries (names starting with '.') are skipped,
    as the readers skip them (kd_ddp.sources), so they are not data. One stat per file: on
    CIFAR-10 as an ImageFolder (60,000 files) ~0.1 s warm (BENCHMARKS.md, "Data identity")."""
    h = hashlib.sha256()
    files = 0
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=_name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e.strerror}") from None
        lines = []
        for entry in entries:
            if entry.is_dir():
                stack.append((entry.path, f"{rel}{entry.name}/"))
                continue
            st = entry.stat()  # follows a symlink: the file it names is what the reader reads
            lines.append(f"{rel}{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
        h.update("".join(lines).encode())
        files += len(lines)
    return Listing(files, h.hexdigest()[:16])


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def source_key(cfg: Config, listing: Listing | None = None) -> dict[str, Any]:
    """What determines the prepared data: the source, the image size, and the source's
    identity: its generator's settings, an archive's path, size and mtime, or a directory's
    path and `listing` (scan_source: what is in it, not only where it is)."""
    d = cfg.data
    key: dict[str, Any] = {"source": d.source, "image_size": d.image_size, "format": FORMAT_VERSION}
    if d.source == "synthetic":
        key.update(train=d.synthetic_train, test=d.synthetic_test, classes=d.synthetic_classes)
    else:
        root = Path(d.root)
        key["root"] = str(root.resolve())
        if root.is_file():
            st = root.stat()
            key.update(size=st.st_size, mtime=st.st_mtime_ns)
        if listing is not None:
            key.update(files=listing.files, listing=listing.digest)
    return key


def _home(cfg: Config) -> Path:
    """Where the preparations of this source live: one per (source, path, image size)."""
    return cfg.cache_dir / "prepared" / f"{cfg.data.source}-{fingerprint(source_key(cfg))}"


def _index_file(cfg: Config) -> Path:
    """A directory source's record of its latest preparation (the dir and the listing it
    was made from): for the message when the source changes, and for `prepared_dir`."""
    return _home(cfg).with_name(_home(cfg).name + ".latest.json")


def prepared_dir(cfg: Config, listing: Listing | None = None) -> Path:
    """The preparation of the source as `listing` describes it. Without a listing (a look
    before the data is prepared: train.provisional_classes), a directory source's latest
    preparation, which may be out of date."""
    if cfg.data.source not in DIRECTORY_SOURCES:
        return _home(cfg)
    if listing is None:
        try:
            return _home(cfg).parent / json.loads(_index_file(cfg).read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return _home(cfg)
    return cfg.cache_dir / "prepared" / f"{cfg.data.source}-{fingerprint(source_key(cfg, listing))}"


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path, array.nbytes) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _write_beton(path: Path, split: Split, workers: int, progress: bool) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class _Indexed:
        def __len__(self) -> int:
            return len(split.labels)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
            return split.images[i], int(split.labels[i]), i

    fields = {
        # raw pixels: CIFAR-sized images decode faster uncompressed than as JPEG
        "image": RGBImageField(write_mode="raw", max_resolution=split.images.shape[1]),
        "label": IntField(),
        "index": IntField(),  # FFCV has no built-in sample index; the cache and resume need it
    }
    with atomic_output(path, split.images.nbytes) as tmp, _ffcv_progress(progress):
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(_Indexed())


@contextmanager
def _ffcv_progress(show: bool) -> Iterator[None]:
    """FFCV's DatasetWriter always draws a tqdm bar, with no switch: it calls the `tqdm` name of
    its module at each write, so that name gets `disable=not show` for the duration."""
    import ffcv.writer

    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(bar, disable=not show)
    try:
        yield
    finally:
        ffcv.writer.tqdm = bar


def _content_hash(raw: RawDataset) -> str:
    h = hashlib.sha256()
    for split in (raw.train, raw.test):
        h.update(np.ascontiguousarray(split.images).data)
        h.update(np.ascontiguousarray(split.labels).data)
    return h.hexdigest()[:16]


def channel_stats(images: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NHWC images scaled to [0, 1].

    Sums of the pixel values and of their squares are accumulated as exact integers,
    `chunk` images at a time: a few tens of MB instead of a float64 copy of the whole split
    (CIFAR-10's train split: 1.2 GB, and as much again for the intermediate results)."""
    channels = images.shape[-1]
    total, squares = np.zeros(channels, np.int64), np.zeros(channels, np.int64)
    for start in range(0, len(images), chunk):
        x = images[start: start + chunk].reshape(-1, channels).astype(np.int64)
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
    n = images.size // channels  # pixels per channel
    mean = [int(s) / (255 * n) for s in total]
    # E[x^2] - E[x]^2 with Python's unbounded ints: no cancellation before the one division
    var = [(n * int(q) - int(s) ** 2) / (255 * n) ** 2 for s, q in zip(total, squares)]
    return mean, [math.sqrt(v) for v in var]


def _build(cfg: Config, out: Path, workers: int, listing: Listing | None) -> dict[str, Any]:
    log.info("preparing %s data from %s into %s", cfg.data.source, cfg.data.root or "(generated)", out)
    raw = read_source(cfg, workers)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, int] = {}
    for name, split in (("train", raw.train), ("test", raw.test)):
        _atomic_npy(out / f"{name}_images.npy", split.images)
        _atomic_npy(out / f"{name}_labels.npy", split.labels)
    for p in sorted(out.iterdir()):
        if p.suffix == ".npy":
            files[p.name] = p.stat().st_size
    mean, std = channel_stats(raw.train.images)
    meta = {
        "format": FORMAT_VERSION,
        "key": source_key(cfg, listing),
        "classes": raw.classes,
        "sizes": {"train": len(raw.train.labels), "test": len(raw.test.labels)},
        "image_size": cfg.data.image_size,
        "mean": mean,
        "std": std,
        "content_hash": _content_hash(raw),
        "files": files,
    }
    atomic_write_json(out / "meta.json", meta)
    log.info("prepared %d train / %d test images, %d classes", meta["sizes"]["train"],
             meta["sizes"]["test"], len(raw.classes))
    return meta


def _valid_meta(out: Path) -> dict[str, Any] | None:
    """The meta of a complete preparation, or None (missing, other format, truncated file)."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT_VERSION:
        return None
    for name, size in meta["files"].items():
        p = out / name
        if p.suffix == ".npy" and (not p.is_file() or p.stat().st_size != size):
            log.warning("prepared file %s is missing or truncated: rebuilding", p)
            return None
    return meta  # .beton files are checked when the FFCV loader needs them (ensure_beton)


# -- FFCV's files, written when the FFCV loader first needs them ----------------------
# A run whose loader is `device` or `torch` (a GPU run's default) never imports FFCV nor
# writes a .beton: preparing the data is the arrays alone.

BETON_RECORD = "ffcv.json"  # {"content_hash", "files": {"train.beton": size}}: after each complete .beton


def _import_ffcv() -> None:
    """Import FFCV, keeping torch's thread count (FFCV's import sets it to 1)."""
    threads = torch.get_num_threads()
    import ffcv  # noqa: F401

    torch.set_num_threads(threads)


def _beton_sizes(data: PreparedData) -> dict[str, int]:
    """The .beton files known complete and written from these arrays: this record when it
    names the arrays' content hash (a record left by an earlier preparation in the same
    directory does not count), or a preparation's meta from before .beton files were written
    on demand (it listed them with the arrays)."""
    try:
        record = json.loads(data.file(BETON_RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    made = record.get("files", {}) if record.get("content_hash") == data.content_hash else {}
    return {n: v for n, v in data.meta["files"].items() if n.endswith(".beton")} | made


def ensure_beton(data: PreparedData, split: str, workers: int, progress: bool) -> Path:
    """The split's .beton, written from its prepared arrays if missing or truncated. Every
    rank may call it: the first to take the lock writes the file, the others then find it."""
    path = data.file(f"{split}.beton")
    with file_lock(data.file("ffcv.lock")):
        sizes = _beton_sizes(data)
        if path.is_file() and path.stat().st_size == sizes.get(path.name):
            return path
        if path.name in sizes:
            log.warning("%s is missing or truncated: writing it again", path)
        _import_ffcv()
        arrays = Split(np.load(data.file(f"{split}_images.npy"), mmap_mode="r"),
                       np.load(data.file(f"{split}_labels.npy")))
        _write_beton(path, arrays, workers, progress)
        atomic_write_json(data.file(BETON_RECORD), {"content_hash": data.content_hash,
                                                     "files": sizes | {path.name: path.stat().st_size}})
    return path


def prepare_data(cfg: Config, env: DistEnv) -> PreparedData:
    """Prepare once (rank 0, under a file lock), then every rank reads the meta.

    Rank 0 alone looks at the source (a directory's listing is read once, under the lock)
    and tells the other ranks which preparation to read, or the error that stopped it, so
    that no rank waits for a rank 0 that has given up."""
    where = main_does(lambda: str(_prepare_on_main(cfg)), env, (ConfigError, NoSpaceError, DataError, LockWaitTimeout),
                      lambda what: DataError(f"rank 0 failed preparing the data: {what}"))
    out = Path(where)
    meta = _valid_meta(out)
    if meta is None:
        raise DataError(f"prepared data in {out} is incomplete (is data.cache_dir shared by all nodes?)")
    return PreparedData(out, meta)


def _prepare_on_main(cfg: Config) -> Path:
    """Find or build the preparation of the source as it is now; its directory."""
    home = _home(cfg)
    with file_lock(home.with_name(home.name + ".lock")):
        listing = _listing(cfg)
        out = prepared_dir(cfg, listing)
        if _valid_meta(out) is not None:
            log.info("prepared data found in %s", out)
        else:
            if listing is not None:
                _say_what_changed(cfg, listing)
            _build(cfg, out, available_cores(), listing)
        if listing is not None:
            atomic_write_json(_index_file(cfg), {"dir": out.name} | vars(listing))
    return out


def _listing(cfg: Config) -> Listing | None:
    """A directory source's listing (timed: it is the cost of knowing the data is unchanged)."""
    if cfg.data.source not in DIRECTORY_SOURCES:
        return None
    root = Path(cfg.data.root)
    if not root.exists():
        raise DataError(f"data.root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory (data.source={cfg.data.source})")
    start = time.perf_counter()
    listing = scan_source(root)
    log.info("data source %s: %s (read in %.2f s)", root, listing.describe(), time.perf_counter() - start)
    return listing


def _say_what_changed(cfg: Config, listing: Listing) -> None:
    """A source prepared before under another listing: say so, since everything trained on
    the old data will be trained again (its stages' fingerprints hold the content hash)."""
    try:
        before = json.loads(_index_file(cfg).read_text())
    except (OSError, ValueError):
        return
    if before.get("digest") != listing.digest:
        log.warning("data source %s changed since it was prepared (%s files, listing %s -> now %s): "
                    "preparing it again; stages trained on the old data will not be reused (the old "
                    "preparation stays in %s until you delete it)", cfg.data.root, before.get("files"),
                    before.get("digest"), listing.describe(), _home(cfg).parent / str(before.get("dir")))


# -- sample order ---------------------------------------------------------------------


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world: int, batch_per_rank: int) -> np.ndarray:
    """This rank's samples for `epoch`, in order; a pure function of its arguments.

    One permutation of all n samples per (seed, epoch), cut into global batches (the
    incomplete last one dropped); rank r takes the r-th slice of every global batch.
    """
    global_batch = batch_per_rank * world
    steps = n // global_batch
    if steps == 0:
        raise DataError(f"the global batch ({global_batch}) is larger than the training set ({n})")
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    return perm[: steps * global_batch].reshape(steps, world, batch_per_rank)[:, rank].reshape(-1)


def eval_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint shards covering all n samples exactly once (no padding)."""
    return np.array_split(np.arange(n), world)[rank]


# -- loaders --------------------------------------------------------------------------


class TensorLoader:
    """A split held as tensors, indexed per batch (no FFCV needed).

    `resident=False` (`data.loader=torch`): the arrays stay in host memory and each batch is
    copied to the training device. `resident=True` (`data.loader=device`): the arrays live
    on the training device (CIFAR-10: ~180 MB), the epoch's order is copied there once, and
    a step makes no host->device copy at all. The sample order and the batches are those of
    the FFCV loader for the same order (tested bitwise).
    """

    def __init__(self, data: PreparedData, split: str, batch_size: int, device: torch.device,
                 resident: bool) -> None:
        self.resident = resident
        self.storage = device if resident else torch.device("cpu")
        self.images, self.labels = split_tensors(data.dir, data.content_hash, split, self.storage)
        self.batch_size = batch_size
        self.device = device

    def iterate(self, order: np.ndarray, drop_last: bool) -> Iterator[Batch]:
        stop = len(order) - (len(order) % self.batch_size if drop_last else 0)
        order_t = to_device(torch.from_numpy(np.ascontiguousarray(order)), self.storage)  # once per epoch
        for start in range(0, stop, self.batch_size):
            idx = order_t[start: start + self.batch_size]
            yield (to_device(self.images[idx], self.device), to_device(self.labels[idx], self.device), idx)

    def inputs(self, order: np.ndarray, drop_last: bool, student_input: StudentInput, view: int) -> Iterator[Batch]:
        """The batches of `iterate` with the student's input of view `view` in place of the
        images. Device-resident: made a chunk of batches at a time (augment.chunk_size; the
        same pixels, bitwise), each batch a slice of its chunk. In host memory: per batch,
        after its copy to the device (a chunk would copy K batches in one blocking go)."""
        if not self.resident:
            return student_inputs(self.iterate(order, drop_last), student_input, view)
        return self._chunked_inputs(order, drop_last, student_input, view)

    def _chunked_inputs(self, order: np.ndarray, drop_last: bool, student_input: StudentInput,
                        view: int) -> Iterator[Batch]:
        bs = self.batch_size
        stop = len(order) - (len(order) % bs if drop_last else 0)
        order_t = to_device(torch.from_numpy(np.ascontiguousarray(order)), self.storage)  # once per epoch
        chunk = chunk_size(bs, StudentInput.sample_bytes(self.images))
        for start in range(0, stop, chunk):
            idx = order_t[start: min(start + chunk, stop)]
            x, labels = student_input(self.images[idx], idx, view), self.labels[idx]
            for b in range(0, len(idx), bs):
                yield x[b: b + bs], labels[b: b + bs], idx[b: b + bs]


def student_inputs(batches: Iterator[Batch], student_input: StudentInput, view: int) -> Iterator[Batch]:
    """Per batch: each loader batch with the student's input of view `view` in place of its images."""
    for images, labels, idx in batches:
        yield student_input(images, idx, view), labels, idx


@functools.lru_cache(maxsize=4)
def split_tensors(prepared: Path, content_hash: str, split: str,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split's images (NHWC uint8) and labels on `device`, loaded once per process
    (keyed by the content hash too, so a rebuilt preparation is read again): the stages of a
    pipeline share them instead of re-reading the arrays each."""
    images = torch.from_numpy(np.load(prepared / f"{split}_images.npy"))
    labels = torch.from_numpy(np.load(prepared / f"{split}_labels.npy"))
    return images.to(device), labels.to(device)


# Device-resident data may take at most this share of the GPU memory free when a stage
# starts; the rest is for activations (the seed teacher at batch 4096 needs a few GB).
DEVICE_DATA_SHARE = 0.25


def resolve_loader(cfg: Config, data: PreparedData, device: torch.device) -> str:
    """The loader `data.loader` names; `auto`: device-resident on a GPU when the data fits
    (DEVICE_DATA_SHARE of its free memory), else FFCV when installed, else the torch loader."""
    choice = cfg.data.loader
    if choice == "ffcv" and not ffcv_available():
        raise ConfigError("data.loader=ffcv but FFCV is not installed: use data.loader=auto, torch or device")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        need = sum(data.file(f"{s}_{k}.npy").stat().st_size for s in ("train", "test") for k in ("images", "labels"))
        free, _ = torch.cuda.mem_get_info(device)
        if need <= DEVICE_DATA_SHARE * free:
            return "device"
    return "ffcv" if ffcv_available() else "torch"


def write_loader_files(cfg: Config, data: PreparedData, env: DistEnv) -> None:
    """`kd-ddp prepare-data`: also the files this run's loader will read, when it is FFCV's
    (its .beton files), so that the stages after it (Slurm jobs, say) find everything made."""
    if resolve_loader(cfg, data, env.device) == "ffcv":
        for split in ("train", "test"):
            ensure_beton(data, split, cfg.data.num_workers or env.cpus, show_bars(cfg, env))


def show_bars(cfg: Config, env: DistEnv) -> bool:
    """Whether this rank draws progress bars (training's, FFCV's writer's): rank 0 only, with
    tracking.progress, and never into a log file (stderr must be a terminal)."""
    return env.is_main and cfg.tracking.progress and sys.stderr.isatty()


class _FixedOrder:
    """An FFCV TraversalOrder whose per-epoch order comes from a function of the epoch."""

    def __init__(self, loader: Any, order_fn: Any) -> None:
        self.loader = loader
        self.order_fn = order_fn

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order_fn(epoch)


class FFCVLoader:
    """FFCV reading the .beton; the sample order comes from `epoch_order`/`eval_indices`.

    FFCV 1.0.2 cannot take a TraversalOrder object (its isinstance check rejects classes
    and it then calls the instance), so each order is registered in its ORDER_MAP.
    """

    def __init__(self, data: PreparedData, split: str, batch_size: int, device: torch.device,
                 order_fn: Any, drop_last: bool, workers: int, progress: bool = False) -> None:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.loader import loader as ffcv_loader_module
        from ffcv.transforms import ToDevice, ToTensor

        beton = ensure_beton(data, split, workers, progress)
        key = ("kd_ddp", id(self))
        ffcv_loader_module.ORDER_MAP[key] = functools.partial(_FixedOrder, order_fn=order_fn)
        to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        self.threads = torch.get_num_threads()  # the rank's (train.threads), which FFCV resets to its workers'
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=workers,
            order=key, drop_last=drop_last, os_cache=True,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), *to_device],
                "label": [IntDecoder(), ToTensor(), *to_device],
                "index": [IntDecoder(), ToTensor()],
            },
        )
        torch.set_num_threads(self.threads)

    def iterate(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches. FFCV sets torch's thread count to its own worker count (in
        `Loader`'s constructor and `__iter__`, and again in its batch thread); the rank's count
        (train.threads) is put back once the epoch has started and once its first batch is in."""
        self.loader.next_epoch = epoch
        batches = iter(self.loader)
        torch.set_num_threads(self.threads)
        for i, (images, labels, idx) in enumerate(batches):
            if i == 0:
                torch.set_num_threads(self.threads)
            yield images, labels.view(-1), idx.view(-1)


class TrainLoader:
    """Batches of one rank for a given epoch: `for images, labels, idx in loader.epoch(e)`."""

    def __init__(self, cfg: Config, data: PreparedData, env: DistEnv) -> None:
        self._start_step = 0
        self.n = data.size("train")
        self.batch_per_rank = cfg.optim.batch_size // env.world_size
        self.order = functools.partial(epoch_order, self.n, seed=cfg.seed, rank=env.rank,
                                       world=env.world_size, batch_per_rank=self.batch_per_rank)
        self.steps = len(self.order(epoch=0)) // self.batch_per_rank
        self.kind = resolve_loader(cfg, data, env.device)
        if self.kind == "ffcv":
            workers = cfg.data.num_workers or env.cpus
            self.impl: Any = FFCVLoader(data, "train", self.batch_per_rank, env.device,
                                        self._remaining_order, True, workers, show_bars(cfg, env))
        else:
            self.impl = TensorLoader(data, "train", self.batch_per_rank, env.device, self.kind == "device")

    def __len__(self) -> int:
        return self.steps

    def _remaining_order(self, epoch: int) -> np.ndarray:
        return self.order(epoch=epoch)[self._start_step * self.batch_per_rank:]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from step `start_step` on (a resumed epoch skips what it did)."""
        self._start_step = start_step
        if isinstance(self.impl, FFCVLoader):
            return self.impl.iterate(epoch)
        return self.impl.iterate(self._remaining_order(epoch), drop_last=True)

    def inputs(self, epoch: int, view: int, student_input: StudentInput, start_step: int = 0) -> Iterator[Batch]:
        """`epoch`'s batches as (student input of view `view`, labels, indices): what the
        training loop steps on (chunked with device-resident data, see TensorLoader.inputs)."""
        if isinstance(self.impl, FFCVLoader):
            return student_inputs(self.epoch(epoch, start_step), student_input, view)
        self._start_step = start_step
        return self.impl.inputs(self._remaining_order(epoch), True, student_input, view)


class EvalLoader:
    """This rank's disjoint shard of a split, in index order, every sample exactly once."""

    def __init__(self, cfg: Config, data: PreparedData, env: DistEnv, split: str = "test",
                 batch_size: int | None = None) -> None:
        self.indices = eval_indices(data.size(split), env.rank, env.world_size)
        bs = batch_size or cfg.train.eval_batch_size
        self.kind = resolve_loader(cfg, data, env.device)
        if self.kind == "ffcv":
            workers = cfg.data.num_workers or env.cpus
            self.impl: Any = FFCVLoader(data, split, bs, env.device, lambda e: self.indices, False, workers,
                                        show_bars(cfg, env))
        else:
            self.impl = TensorLoader(data, split, bs, env.device, self.kind == "device")

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.impl, FFCVLoader):
            return self.impl.iterate(0)
        return self.impl.iterate(self.indices, drop_last=False)

    def inputs(self, student_input: StudentInput, view: int) -> Iterator[Batch]:
        """The shard's batches as (student input of view `view`, labels, indices), in index
        order: what the logits cache is built from (chunked with device-resident data)."""
        if isinstance(self.impl, FFCVLoader):
            return student_inputs(iter(self), student_input, view)
        return self.impl.inputs(self.indices, False, student_input, view)
