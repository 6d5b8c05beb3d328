"""Each data source, the FFCV round trip and the sample order, on data made here."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_ddp.checkpoint import NoSpaceError, atomic_output
from kd_ddp.config import load_config
from kd_ddp.data import (
    EvalLoader,
    TrainLoader,
    channel_stats,
    epoch_order,
    eval_indices,
    ffcv_available,
    prepare_data,
)
from kd_ddp.distributed import DistEnv
from kd_ddp.sources import DataError, cifar_batches, imagefolder, read_archive
from tests.conftest import REPO, assert_user_error, run_cli, small_tmpfs

needs_ffcv = pytest.mark.skipif(not ffcv_available(), reason="FFCV not installed")


def write_imagefolder(root: Path, classes: list[str], per_class: int, size: int, mode: str = "L") -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size) if mode == "L" else (size, size, 3)
                arr = np.clip(rng.normal(40 + 60 * c, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode).save(d / f"{i:04d}.png")


def write_cifar_batches(root: Path, n_per_batch: int) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        written[name] = data
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return written


@pytest.mark.fast
def test_imagefolder_grayscale_odd_size_becomes_rgb(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, ["a", "b", "c"], 4, 28, "L")
    raw = imagefolder(tmp_path, 32, workers=1)
    assert raw.classes == ["a", "b", "c"]
    assert raw.train.images.shape == (12, 32, 32, 3) and raw.train.images.dtype == np.uint8
    assert raw.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # grayscale -> RGB: three equal channels
    assert (raw.train.images[..., 0] == raw.train.images[..., 2]).all()


@pytest.mark.fast
def test_imagefolder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        imagefolder(tmp_path / "nope", 32, 1)
    write_imagefolder(tmp_path, ["a", "b"], 1, 8, "RGB")
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "z")
    with pytest.raises(DataError, match=r"classes differ.*only in train: \['b'\], only in test: \['z'\]"):
        imagefolder(tmp_path, 8, 1)


@pytest.mark.fast
def test_corrupt_image_is_named(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, ["a", "b"], 2, 8, "RGB")
    bad = tmp_path / "train" / "a" / "0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="0001.png"):
        imagefolder(tmp_path, 8, 1)


@pytest.mark.fast
def test_cifar_batches_reader(tmp_path: Path) -> None:
    written = write_cifar_batches(tmp_path, 7)
    raw = cifar_batches(tmp_path, 32)
    assert raw.classes == [f"c{i}" for i in range(10)]
    assert raw.train.images.shape == (35, 32, 32, 3) and raw.test.images.shape == (7, 32, 32, 3)
    # CHW rows of the pickle -> HWC pixels
    first = written["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(raw.train.images[0], first)


@pytest.mark.fast
def test_archive_source_decodes_the_tree_without_extracting_it(tmp_path: Path) -> None:
    """The archive's ImageFolder tree (under a top directory, with hidden entries a macOS or
    Jupyter user leaves behind) gives the arrays of the same tree read from disk, and nothing
    is extracted into the cache."""
    tree = tmp_path / "tree"
    write_imagefolder(tree / "mini", ["x", "y"], 3, 16, "RGB")
    (tree / "mini" / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16)).save(tree / "mini" / "train" / "x" / "._0000.png")
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "mini", arcname="./mini")
    cfg = load_config("smoke", ["data.source=archive", f"data.root={archive}", f"data.cache_dir={tmp_path / 'c'}",
                                "data.image_size=16"])
    data = prepare_data(cfg, DistEnv())
    assert data.meta["classes"] == ["x", "y"] and data.size("train") == 6
    assert not (tmp_path / "c" / "extracted").exists()
    ref = imagefolder(tree / "mini", 16, 1)
    for split, want in (("train", ref.train), ("test", ref.test)):
        np.testing.assert_array_equal(np.load(data.file(f"{split}_images.npy")), want.images)
        np.testing.assert_array_equal(np.load(data.file(f"{split}_labels.npy")), want.labels)


@pytest.mark.fast
def test_archive_without_a_train_test_tree_is_refused(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "tree", ["x", "y"], 1, 8, "RGB")
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "tree" / "train", arcname="train")  # no test/
    with pytest.raises(DataError, match="holds no directory with train/ and test/"):
        read_archive(archive, 8, 1)
    archive.write_bytes(b"not a tar")
    with pytest.raises(DataError, match=f"cannot read {archive}"):
        read_archive(archive, 8, 1)


@pytest.mark.fast
def test_prepare_is_done_once_and_stats_come_from_train(tmp_path: Path) -> None:
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=64", "data.synthetic_test=32"])
    data = prepare_data(cfg, DistEnv())
    train = np.load(data.file("train_images.npy")).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(data.meta["mean"], train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.meta["std"], train.std(0), rtol=1e-6)
    stamp = data.file("meta.json").stat().st_mtime_ns
    again = prepare_data(cfg, DistEnv())
    assert again.file("meta.json").stat().st_mtime_ns == stamp


@pytest.mark.fast
def test_truncated_prepared_file_is_rebuilt(tmp_path: Path) -> None:
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=64", "data.synthetic_test=32"])
    data = prepare_data(cfg, DistEnv())
    victim = data.file("train_images.npy")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    again = prepare_data(cfg, DistEnv())
    assert again.file(victim.name).stat().st_size == size


@needs_ffcv
@pytest.mark.fast
def test_beton_files_are_written_when_the_ffcv_loader_needs_them(tmp_path: Path) -> None:
    """Preparing writes the arrays only; the FFCV loader writes its .beton from them on first
    use, finds it on the next, and writes a truncated one again."""
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=64", "data.synthetic_test=32",
                                "data.loader=ffcv", "optim.batch_size=16"])
    data = prepare_data(cfg, DistEnv())
    assert not list(data.dir.glob("*.beton"))
    first = [idx.tolist() for _, _, idx in TrainLoader(cfg, data, DistEnv()).epoch(0)]
    beton = data.file("train.beton")
    size, stamp = beton.stat().st_size, beton.stat().st_mtime_ns
    TrainLoader(cfg, data, DistEnv())
    assert beton.stat().st_mtime_ns == stamp
    with open(beton, "r+b") as f:
        f.truncate(size // 2)
    again = [idx.tolist() for _, _, idx in TrainLoader(cfg, data, DistEnv()).epoch(0)]
    assert beton.stat().st_size == size and again == first
    # a record naming other arrays (an earlier preparation in this directory) vouches for nothing
    record = json.loads(data.file("ffcv.json").read_text())
    data.file("ffcv.json").write_text(json.dumps(record | {"content_hash": "another"}))
    stamp = beton.stat().st_mtime_ns
    TrainLoader(cfg, data, DistEnv())
    assert beton.stat().st_mtime_ns != stamp


def test_a_device_loader_run_neither_imports_ffcv_nor_writes_beton(tmp_path: Path) -> None:
    """data.loader=device (a GPU run's `auto`): the teacher trains from a preparation of arrays
    alone, and FFCV is never imported (its import alone costs a GPU run seconds)."""
    script = (
        "import sys\n"
        "from kd_ddp.cli import main\n"
        f"code = main(['train-teacher', '--preset', 'smoke', 'data.loader=device', 'data.cache_dir={tmp_path}/c',\n"
        f"             'run.dir={tmp_path}/run', 'tracking.wandb.mode=disabled'])\n"
        "print('ffcv imported:', 'ffcv' in sys.modules)\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ffcv imported: False" in proc.stdout
    assert not list((tmp_path / "c").rglob("*.beton")) and (tmp_path / "run" / "teacher" / "summary.json").is_file()


def test_prepare_on_a_full_disk_fails_clearly_and_leaves_no_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "cache", "64k") as cache:
        proc = run_cli(["prepare-data", "--preset", "smoke", f"data.cache_dir={cache}", f"run.dir={tmp_path / 'run'}",
                        "tracking.wandb.mode=disabled"], check=False)
        files = sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert_user_error(proc, "no space left on device to write", "MB needed")
    assert files == []


def test_a_short_write_on_a_disk_that_filled_up_is_no_space(tmp_path: Path) -> None:
    """numpy reports a full disk as "N requested and M written", without errno: when the disk
    fills after the entry check (here: the declared size understates the write), it is still
    a NoSpaceError and the temp file is gone; an errno-less error on a roomy disk stays itself."""
    with small_tmpfs(tmp_path / "small", "64k") as small:
        with (pytest.raises(NoSpaceError, match="no space left on device"),
              atomic_output(small / "a.npy", size=32_000) as tmp, open(tmp, "wb") as f):
            np.save(f, np.zeros(1_000_000, np.uint8))
        assert list(small.iterdir()) == []
    with pytest.raises(OSError, match="not a disk problem"), atomic_output(tmp_path / "b.npy", size=10) as tmp:
        tmp.write_bytes(b"x")
        raise OSError("not a disk problem")
    assert list(tmp_path.glob("*.npy*")) == list(tmp_path.glob(".b.npy*")) == []


@pytest.mark.fast
@needs_ffcv
def test_ffcv_round_trip_equals_what_was_written(tmp_path: Path) -> None:
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=100", "data.synthetic_test=30",
                                "train.eval_batch_size=16"])
    data = prepare_data(cfg, DistEnv())
    images = np.load(data.file("train_images.npy"))
    labels = np.load(data.file("train_labels.npy"))
    seen = []
    for imgs, labs, idx in EvalLoader(cfg, data, DistEnv(), split="train"):
        np.testing.assert_array_equal(imgs.numpy(), images[idx.numpy()])
        np.testing.assert_array_equal(labs.numpy(), labels[idx.numpy()])
        seen += idx.tolist()
    assert seen == list(range(100))


@pytest.mark.fast
@pytest.mark.parametrize("loader", ["ffcv", "torch"])
def test_train_loader_follows_epoch_order(tmp_path: Path, loader: str) -> None:
    if loader == "ffcv" and not ffcv_available():
        pytest.skip("FFCV not installed")
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=100", "data.synthetic_test=30",
                                "optim.batch_size=16", f"data.loader={loader}"])
    data = prepare_data(cfg, DistEnv())
    labels = np.load(data.file("train_labels.npy"))
    tl = TrainLoader(cfg, data, DistEnv())
    for epoch in (0, 3):
        got = []
        for _, labs, idx in tl.epoch(epoch):
            assert isinstance(idx, torch.Tensor) and len(idx) == 16
            np.testing.assert_array_equal(labs.numpy(), labels[idx.numpy()])
            got += idx.tolist()
        want = epoch_order(100, seed=cfg.seed, epoch=epoch, rank=0, world=1, batch_per_rank=16)
        assert got == want.tolist() and len(got) == 96


@pytest.mark.fast
def test_epoch_order_is_the_same_global_batches_for_any_world_size() -> None:
    one = epoch_order(1000, seed=1, epoch=2, rank=0, world=1, batch_per_rank=64).reshape(-1, 64)
    parts = [epoch_order(1000, seed=1, epoch=2, rank=r, world=2, batch_per_rank=32).reshape(-1, 32) for r in (0, 1)]
    np.testing.assert_array_equal(one, np.concatenate(parts, axis=1))
    assert len(set(one.ravel().tolist())) == one.size  # no sample twice
    other = epoch_order(1000, seed=1, epoch=3, rank=0, world=1, batch_per_rank=64)
    assert not np.array_equal(one.ravel(), other)


@pytest.mark.fast
def test_eval_shards_cover_every_sample_once() -> None:
    shards = [eval_indices(103, r, 4) for r in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(103))


@pytest.mark.fast
def test_unreadable_images_can_be_skipped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_imagefolder(tmp_path, ["a", "b"], 3, 8, "RGB")
    (tmp_path / "train" / "a" / "0001.png").write_bytes(b"not a png")
    raw = imagefolder(tmp_path, 8, 1, skip_bad=True)
    assert len(raw.train.labels) == 5 and raw.train.labels.tolist() == [0, 0, 1, 1, 1]
    assert "skipped 1 unreadable image(s)" in caplog.text and "0001.png" in caplog.text


@pytest.mark.fast
def test_a_single_class_is_refused(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, ["only"], 2, 8, "RGB")
    with pytest.raises(DataError, match=r"train needs at least two class sub-directories .*found only 'only'"):
        imagefolder(tmp_path, 8, 1)


@pytest.mark.fast
def test_hidden_entries_are_neither_classes_nor_images(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, ["a", "b"], 2, 8, "RGB")
    for split in ("train", "test"):
        checkpoints = tmp_path / split / ".ipynb_checkpoints"
        checkpoints.mkdir()
        (tmp_path / split / "a" / "0000.png").rename(checkpoints / "0000-checkpoint.png")
        (tmp_path / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (tmp_path / split / "b" / "._0000.png").write_bytes(b"\0\5\26\7 AppleDouble resource fork")
        (tmp_path / split / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    raw = imagefolder(tmp_path, 8, 1)
    assert raw.classes == ["a", "b"]
    assert raw.train.labels.tolist() == raw.test.labels.tolist() == [0, 1, 1]


@pytest.mark.fast
def test_channel_stats_in_chunks_equal_the_whole_array_formula() -> None:
    """The chunked integer sums against the float64 formula prepare_data used before (a copy of
    the whole split), on a split whose size no chunk divides, and against exact fractions."""
    images = np.random.default_rng(3).integers(0, 256, (1001, 9, 7, 3), dtype=np.uint8)
    images[:, :, :, 2] //= 5  # channels with different statistics
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    for chunk in (1, 64, 1000, 5000):
        mean, std = channel_stats(images, chunk=chunk)
        np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    tiny = images[:3, :2, :2]
    values = [[Fraction(int(v), 255) for v in tiny[..., c].ravel()] for c in range(3)]
    exact_mean = [sum(v) / len(v) for v in values]
    exact_var = [sum((x - m) ** 2 for x in v) / len(v) for v, m in zip(values, exact_mean)]
    mean, std = channel_stats(tiny, chunk=2)
    assert mean == [float(m) for m in exact_mean]
    np.testing.assert_allclose(std, [float(v) ** 0.5 for v in exact_var], rtol=1e-15)


def _prepare_folder(root: Path, cache: Path) -> tuple[object, list[str]]:
    cfg = load_config("smoke", ["data.source=imagefolder", f"data.root={root}", f"data.cache_dir={cache}",
                                "data.image_size=8"])
    data = prepare_data(cfg, DistEnv())
    return data, sorted(p.name for p in (cache / "prepared").iterdir() if p.is_dir())


@pytest.mark.fast
def test_an_edited_image_folder_is_prepared_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A directory source is identified by what it holds: recoloured images and an added class
    give a new preparation (new content hash, so no stage trained on the old data is reused),
    the change is said, and an unchanged folder is found again without being rebuilt."""
    root, cache = tmp_path / "folder", tmp_path / "cache"
    write_imagefolder(root, ["a", "b"], 3, 8, "RGB")
    first, dirs = _prepare_folder(root, cache)
    again, same_dirs = _prepare_folder(root, cache)
    assert (again.dir, again.content_hash, same_dirs) == (first.dir, first.content_hash, dirs)
    for split in ("train", "test"):
        for p in (root / split / "a").iterdir():
            Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
    write_imagefolder(tmp_path / "more", ["c"], 3, 8, "RGB")
    for split in ("train", "test"):
        (tmp_path / "more" / split / "c").rename(root / split / "c")
    with caplog.at_level("WARNING", logger="kd_ddp.data"):
        edited, edited_dirs = _prepare_folder(root, cache)
    assert edited.dir != first.dir and edited.content_hash != first.content_hash
    assert edited.meta["classes"] == ["a", "b", "c"] and len(edited_dirs) == 2
    assert "changed since it was prepared" in caplog.text and "will not be reused" in caplog.text


@pytest.mark.fast
def test_a_rewrite_that_keeps_size_and_mtime_is_seen(tmp_path: Path) -> None:
    """`cp -p`/`touch -r` leave size and mtime as they were; the listing's ctime still moves.
    Hidden files (an editor's or a notebook's droppings) are not data and change nothing."""
    root, cache = tmp_path / "folder", tmp_path / "cache"
    write_imagefolder(root, ["a", "b"], 2, 8, "RGB")
    victim = root / "train" / "a" / "0000.png"
    pixels = np.array(Image.open(victim))
    Image.fromarray(pixels).save(victim, compress_level=0)  # stored: the size depends on the shape alone
    first, _ = _prepare_folder(root, cache)
    (root / "train" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "a" / ".0000.png.swp").write_bytes(b"x")
    assert _prepare_folder(root, cache)[0].dir == first.dir
    st = victim.stat()
    Image.fromarray(255 - pixels).save(victim, compress_level=0)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    rewritten, _ = _prepare_folder(root, cache)
    assert rewritten.dir != first.dir


@pytest.mark.fast
def test_cifar_batches_dir_changed_is_prepared_again(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "src", 20)
    root = tmp_path / "src" / "cifar-10-batches-py"
    cfg = load_config("smoke", ["data.source=cifar-batches", f"data.root={root}",
                                f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=32"])
    first = prepare_data(cfg, DistEnv())
    with open(root / "test_batch", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"] = [(v + 1) % 10 for v in batch[b"labels"]]
    with open(root / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    second = prepare_data(cfg, DistEnv())
    assert second.content_hash != first.content_hash


def test_stages_on_an_edited_folder_are_not_reused(tmp_path: Path) -> None:
    """Through the CLI, as a user meets it: the teacher trained on a folder is reused while the
    folder is unchanged; once an image is replaced, the run dir's teacher (trained on the old
    data) is refused with what changed and how to go on, and a new run dir trains on the new data."""
    root = tmp_path / "folder"
    write_imagefolder(root, ["a", "b"], 16, 8, "RGB")
    args = ["train-teacher", "--preset", "smoke", "data.source=imagefolder", f"data.root={root}",
            "data.image_size=8", f"data.cache_dir={tmp_path / 'cache'}", "tracking.wandb.mode=disabled",
            "optim.batch_size=8"]
    run_cli([*args, f"run.dir={tmp_path / 'run'}"])
    assert "already trained" in run_cli([*args, f"run.dir={tmp_path / 'run'}"]).stderr
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "train" / "b" / "0003.png")
    refused = run_cli([*args, f"run.dir={tmp_path / 'run'}"], check=False)
    assert_user_error(refused, "changed since it was prepared", "data: checkpoint has",
                      "use another run.dir, or delete")
    fresh = run_cli([*args, f"run.dir={tmp_path / 'run2'}"]).stderr
    assert "prepared data found" in fresh and "already trained" not in fresh


@needs_ffcv
@pytest.mark.fast
def test_the_ffcv_loader_keeps_the_ranks_thread_count(tmp_path: Path) -> None:
    """FFCV sets torch's threads to its worker count as an epoch starts; train.threads (the
    rank's count, here 2 against 1 FFCV worker) holds through the epoch and after it."""
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path}", "data.synthetic_train=64", "data.synthetic_test=32",
                                "data.loader=ffcv", "optim.batch_size=16", "data.num_workers=1"])
    data = prepare_data(cfg, DistEnv())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        during = [torch.get_num_threads() for _ in TrainLoader(cfg, data, DistEnv()).epoch(0)]
        assert during == [2] * 4 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
