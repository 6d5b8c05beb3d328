"""The teacher-logits cache replays exactly what the KD student sees, and refuses what it must."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ddp import augment as augment_module
from kd_ddp import teacher_logits
from kd_ddp.augment import StudentInput
from kd_ddp.config import load_config
from kd_ddp.data import PreparedData, prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.metrics_io import read_metrics
from kd_ddp.models import make_model
from kd_ddp.teacher_logits import CacheError, TeacherRecord, build_cache, check_cache, teacher_view_logits
from kd_ddp.teachers import load_trained_teacher
from tests.conftest import assert_user_error, run_cli, run_worker, small_tmpfs


def _replay(run_dir: Path, cache_dir: Path, nproc: int, *overrides: str) -> list[dict]:
    out = run_worker("replay_check", ["smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides],
                     torchrun=nproc if nproc > 1 else 0)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _check_replay(rows: list[dict], nproc: int) -> None:
    assert sorted(r["rank"] for r in rows) == list(range(nproc))
    for r in rows:
        assert r["batches"] > 0
        # fp16 storage: about 3 significant digits of the logits
        assert r["max_abs_diff"] <= 2e-3 * max(1.0, r["max_abs_logit"]), r
        # and the check can tell views apart: another view's logits are far off
        assert r["max_abs_diff_wrong_view"] > 50 * max(r["max_abs_diff"], 1e-3), r


def test_cache_replays_the_student_batches_one_process(smoke_run: Path, cache_dir: Path) -> None:
    _check_replay(_replay(smoke_run, cache_dir, 1), 1)


def test_cache_replays_the_student_batches_two_processes(smoke_run_ddp: Path, cache_dir: Path) -> None:
    _check_replay(_replay(smoke_run_ddp, cache_dir, 2), 2)


def test_cache_replays_the_student_batches_from_device_resident_data(smoke_run: Path, cache_dir: Path) -> None:
    """data.loader=device (the GPU loader, here on the CPU): the cache, built through FFCV,
    holds the logits of exactly the pixels the device-resident batches give the student."""
    _check_replay(_replay(smoke_run, cache_dir, 1, "data.loader=device"), 1)


def test_two_process_cache_build_equals_one_process(smoke_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    """Two ranks, each writing only its own file (rank 0 the cache, rank 1 a shard it joins):
    the rows of a one-process build, and the manifest's sha256 is the file's."""
    shutil.copytree(smoke_run / "teacher", tmp_path / "teacher")
    run_cli(["cache-logits", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
             "tracking.wandb.mode=disabled"], torchrun=2)
    d = tmp_path / "teacher-logits"
    assert sorted(p.name for p in d.iterdir()) == ["logits.npy", "manifest.json"]  # no shard left behind
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert hashlib.sha256((d / "logits.npy").read_bytes()).hexdigest() == manifest["sha256"]
    one = np.load(smoke_run / "teacher-logits" / "logits.npy").astype(np.float32)
    two = np.load(d / "logits.npy").astype(np.float32)
    assert one.shape == two.shape
    np.testing.assert_allclose(two, one, atol=2e-3 * max(1.0, float(np.abs(one).max())))


def test_live_teacher_after_a_cached_kd_student_is_not_reused(cache_copy: Path, cache_dir: Path) -> None:
    """The stage fingerprint holds the teacher mode: a finished cached-KD student is neither
    reported as live nor resumed as one."""
    common = ["train-student", "--mode", "kd", "--preset", "smoke", f"run.dir={cache_copy}",
              f"data.cache_dir={cache_dir}", "optim.student_epochs=1", "tracking.wandb.mode=disabled"]
    run_cli(common)
    proc = run_cli([*common, "kd.teacher=live"], check=False)
    assert_user_error(proc, "kd.teacher: checkpoint has 'cached', this run needs 'live'")
    assert "already trained" not in proc.stderr
    summary = json.loads((cache_copy / "student-kd" / "summary.json").read_text())
    assert summary["kd"]["teacher"] == "cached"


@pytest.fixture()
def cache_copy(smoke_run: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run's teacher and cache, safe to damage."""
    for sub in ("teacher", "teacher-logits"):
        shutil.copytree(smoke_run / sub, tmp_path / sub)
    return tmp_path


def _check(run_dir: Path, cache_dir: Path, *overrides: str) -> None:
    cfg = load_config("smoke", [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides])
    data = prepare_data(cfg, DistEnv())
    _, teacher = load_trained_teacher(cfg, data, DistEnv())
    check_cache(cfg, data, teacher)


def test_valid_cache_is_accepted(cache_copy: Path, cache_dir: Path) -> None:
    _check(cache_copy, cache_dir)


def test_cache_for_another_augmentation_is_refused(cache_copy: Path, cache_dir: Path) -> None:
    with pytest.raises(CacheError, match=r"augmentation\.crop_padding: cache has 4, this run needs 2"):
        _check(cache_copy, cache_dir, "data.crop_padding=2")
    with pytest.raises(CacheError, match=r"views: cache has 2, this run needs 3"):
        _check(cache_copy, cache_dir, "kd.views=3")


def test_cache_for_another_teacher_is_refused(cache_copy: Path, cache_dir: Path) -> None:
    import torch

    ckpt = cache_copy / "teacher" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    first = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][first] = state["model"][first] + 0.01  # another teacher, same architecture
    torch.save(state, ckpt)
    with pytest.raises(CacheError, match=r"teacher_weights: cache has '\w+', this run needs '\w+'") as e:
        _check(cache_copy, cache_dir)
    assert "kd-ddp cache-logits" in str(e.value)


def test_truncated_or_corrupted_cache_is_detected(cache_copy: Path, cache_dir: Path) -> None:
    path = cache_copy / "teacher-logits" / "logits.npy"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 40])
    with pytest.raises(CacheError, match="truncated"):
        _check(cache_copy, cache_dir)
    flipped = bytearray(blob)
    flipped[-3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="checksum mismatch"):
        _check(cache_copy, cache_dir)


def test_kd_student_refuses_a_bad_cache_and_pipeline_rebuilds_it(cache_copy: Path, cache_dir: Path) -> None:
    path = cache_copy / "teacher-logits" / "logits.npy"
    path.write_bytes(path.read_bytes()[:-40])
    common = ["--preset", "smoke", f"run.dir={cache_copy}", f"data.cache_dir={cache_dir}"]
    proc = run_cli(["train-student", "--mode", "kd", *common], check=False)
    assert_user_error(proc, "truncated", "kd-ddp cache-logits")
    proc = run_cli(["pipeline", *common])
    assert "rebuilding the teacher-logits cache" in proc.stderr
    cfg = load_config("smoke")
    assert json.loads((cache_copy / "report" / "results.json").read_text())["student_kd"]["epochs"] == cfg.optim.epochs


def test_cache_on_a_full_disk_fails_clearly_and_leaves_nothing(cache_copy: Path, cache_dir: Path) -> None:
    """A real full filesystem: a 16 KiB tmpfs mounted where the cache goes (needs root)."""
    target = cache_copy / "teacher-logits"
    shutil.rmtree(target)
    target.mkdir()
    with small_tmpfs(target, "16k"):
        proc = run_cli(["cache-logits", "--preset", "smoke", f"run.dir={cache_copy}", f"data.cache_dir={cache_dir}",
                        "tracking.wandb.mode=disabled"], check=False)
        left = sorted(p.name for p in target.iterdir())
    assert_user_error(proc, f"no space left on device to write {target}", "MB needed")
    assert left == []  # no half-written array, no manifest


def test_live_teacher_kd_sees_a_fresh_view_each_epoch(cache_copy: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Cached KD replays views 0..kd.views-1; the live teacher follows a fresh view per epoch.
    While the two see the same views their training matches up to the cache's fp16 rounding."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copytree(cache_copy / "teacher", live / "teacher")
    common = ["train-student", "--mode", "kd", "--preset", "smoke", f"data.cache_dir={cache_dir}",
              "optim.student_epochs=3", "tracking.wandb.mode=disabled"]
    run_cli([*common, f"run.dir={cache_copy}"])
    run_cli([*common, f"run.dir={live}", "kd.teacher=live"])
    rows = {"cached": read_metrics(cache_copy / "student-kd" / "metrics.jsonl"),
            "live": read_metrics(live / "student-kd" / "metrics.jsonl")}
    assert [r["view"] for r in rows["cached"]] == [0, 1, 0]  # smoke: kd.views=2
    assert [r["view"] for r in rows["live"]] == [0, 1, 2]
    for c, v in zip(rows["cached"][:2], rows["live"][:2], strict=True):
        assert c["train_loss"] == pytest.approx(v["train_loss"], rel=1e-2)
    summary = json.loads((live / "student-kd" / "summary.json").read_text())
    assert summary["kd"]["teacher"] == "live"


CIFAR_SAMPLE_BYTES = 32 * 32 * 3 * 4  # one 32x32 RGB image's student input (float32)


def _build(run_dir: Path, cache_dir: Path, loader: str
           ) -> tuple[np.ndarray, torch.nn.Module, StudentInput, PreparedData]:
    """A cache built in process from an untrained smoke teacher (its weights do not matter
    here), its eval batches of 100 ending in one of 12 (512 samples): rows, teacher, input,
    and the prepared data it was built from."""
    cfg = load_config("smoke", [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", f"data.loader={loader}",
                                "train.eval_batch_size=100", "tracking.wandb.mode=disabled"])
    env = DistEnv()
    data = prepare_data(cfg, env)
    teacher = make_model(cfg, "teacher", data.num_classes, env.device)
    build_cache(cfg, env, data, teacher, TeacherRecord("untrained", {}, "off"), None)
    rows = np.load(teacher_logits.cache_dir(cfg) / "logits.npy")
    return rows, teacher, StudentInput.of(cfg, *data.stats(env.device)), data


@pytest.mark.fast
def test_cache_built_from_chunks_is_the_per_batch_cache_bitwise(tmp_path: Path, cache_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """data.loader=device builds a view 3 batches at a time (chunks of 300 samples, the last
    of 212), data.loader=torch batch by batch: the same rows, bit for bit. And the rows are
    the teacher's logits on the student's input of those samples made another way: one
    shuffled batch, per batch (fp16 storage: ~3 significant digits; an untrained teacher's
    logits differ little between views, ~20 such tolerances here, but they do)."""
    monkeypatch.setattr(augment_module, "CHUNK_BYTES", 3 * 100 * CIFAR_SAMPLE_BYTES)
    chunked, teacher, student_input, data = _build(tmp_path / "device", cache_dir, "device")
    per_batch, *_ = _build(tmp_path / "torch", cache_dir, "torch")
    assert chunked.shape == (2, 512, 10) and chunked.tobytes() == per_batch.tobytes()
    # this build's own arrays: the session's data cache holds other tests' preparations too
    images = torch.from_numpy(np.load(data.file("train_images.npy")))
    idx = torch.from_numpy(np.random.default_rng(0).permutation(512)[:64])
    for view in (0, 1):
        live = teacher_view_logits(teacher, images[idx], idx, view, student_input, None)
        got = torch.from_numpy(chunked[view, idx.numpy()]).float()
        tolerance = 1e-3 * live.abs().max().item()  # fp16 keeps 11 significant bits: 2^-11 = 4.9e-4
        assert (got - live).abs().max().item() <= tolerance
        other = torch.from_numpy(chunked[1 - view, idx.numpy()]).float()
        assert (other - live).abs().max().item() > 5 * tolerance  # the check tells views apart
