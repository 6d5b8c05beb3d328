"""The trainer's step, in process: non-finite steps decided on the device, the flags read
every `train.check_every` steps, the LR logged, and the loaders giving the same batches."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kd_ddp import augment as augment_module
from kd_ddp.augment import StudentInput, augment
from kd_ddp.checkpoint import load_checkpoint, weights_hash
from kd_ddp.config import Config, load_config
from kd_ddp.data import PreparedData, TrainLoader, ffcv_available, prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.fingerprints import stage_fingerprint
from kd_ddp.metrics_io import read_metrics
from kd_ddp.models import make_model
from kd_ddp.precision import precision_name
from kd_ddp.tracking import StageTracker
from kd_ddp.train import NonFiniteLoss, Trainer, lr_at


def _config(run_dir: Path, cache_dir: Path, *overrides: str) -> Config:
    # data.loader=device: the GPU's loader, here on the CPU (and no FFCV JIT to wait for)
    return load_config("smoke", [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "tracking.wandb.mode=disabled",
                                 "tracking.progress=false", "data.loader=device", *overrides])


@pytest.fixture()
def trainer_factory(tmp_path: Path, cache_dir: Path) -> Iterator:
    made: list[Trainer] = []

    def make(*overrides: str, stage: str = "teacher") -> Trainer:
        cfg = _config(tmp_path / f"run{len(made)}", cache_dir, *overrides)
        env = DistEnv()
        data = prepare_data(cfg, env)
        trainer = Trainer(cfg, env, data, stage)
        trainer.resume()
        made.append(trainer)
        return trainer

    yield make
    for t in made:
        t.close()


def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss NaN at the given global steps (0-based), as a diverging run would."""
    real, count = trainer.objective, [0]

    def objective(*args: object) -> torch.Tensor:
        loss = real(*args)  # type: ignore[arg-type]
        step, count[0] = count[0], count[0] + 1
        return loss * math.nan if step in bad_steps else loss

    trainer.objective = objective  # type: ignore[assignment]


def _state(trainer: Trainer) -> list[torch.Tensor]:
    params = [p.detach().clone() for p in trainer.model.parameters()]
    buffers = [trainer.optimizer.state[p]["momentum_buffer"].clone() for p in trainer.model.parameters()]
    return params + buffers


@pytest.mark.fast
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_nonfinite_step_changes_nothing_and_is_counted(trainer_factory, amp: str) -> None:
    """The update of a bad step is skipped on the device (fused SGD's found_inf; under fp16 via
    GradScaler): weights and momentum stay bitwise as they were, the next good step moves them."""
    trainer = trainer_factory(f"train.amp={amp}", "train.nonfinite_skip_limit=5")
    _poison(trainer, {0})
    images, labels, idx = next(iter(trainer.loader.epoch(0)))
    before = _state(trainer)
    trainer.train_step(images, labels, idx, view=0)  # the first step: its momentum must not become garbage
    assert all(torch.equal(a, b) for a, b in zip(before, _state(trainer)))
    assert int(trainer.tally.nonfinite) == 1 and int(trainer.tally.seen) == 0
    trainer.train_step(images, labels, idx, view=0)
    after = _state(trainer)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(t).all() for t in after)
    assert int(trainer.tally.nonfinite) == 1 and int(trainer.tally.seen) == len(labels)


@pytest.mark.fast
@pytest.mark.parametrize("check_every", [1, 4])
def test_skipped_steps_are_counted_and_past_the_limit_the_run_stops_naming_the_step(
        trainer_factory, check_every: int) -> None:
    """smoke: 8 steps per epoch. Bad steps at global 3 (epoch 1 step 4) and 10 (epoch 2
    step 3); with the flags read every 4 steps the second is seen a step late, and still named."""
    trainer = trainer_factory("train.nonfinite_skip_limit=1", f"train.check_every={check_every}")
    _poison(trainer, {3, 10})
    with pytest.raises(NonFiniteLoss, match=r"teacher: non-finite loss at epoch 2 step 3 \(batch of samples \["
                                            r"[0-9, ]+\]\.\.\.\); stopped \(train.nonfinite_skip_limit=1\)"):
        trainer.fit(StageTracker())
    state = load_checkpoint(trainer.ckpt_path)  # the last good checkpoint: end of epoch 1
    assert (state["epoch"], state["step_in_epoch"], state["nonfinite_steps"]) == (0, 0, 1)
    rows = read_metrics(trainer.out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]


@pytest.mark.fast
def test_within_the_limit_the_stage_finishes_and_reports_the_skips(trainer_factory) -> None:
    trainer = trainer_factory("train.nonfinite_skip_limit=2", "train.check_every=3")
    _poison(trainer, {3, 10})
    summary = trainer.fit(StageTracker())
    assert summary["nonfinite_steps"] == 2
    rows = read_metrics(trainer.out / "metrics.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in rows)


@pytest.mark.fast
@pytest.mark.parametrize("stage", ["teacher", "student-normal"])
def test_logged_lr_is_the_one_the_last_step_used(trainer_factory, stage: str) -> None:
    # the students' own LR and warm-up (seed-gpu sets both); the teacher keeps optim.lr/warmup_epochs
    trainer = trainer_factory("optim.epochs=3", "optim.student_lr=0.03", "optim.student_warmup_epochs=2",
                              stage=stage)
    trainer.fit(StageTracker())
    rows = read_metrics(trainer.out / "metrics.jsonl")
    steps, cfg = len(trainer.loader), trainer.cfg
    peak, warmup_epochs = (cfg.optim.lr, cfg.optim.warmup_epochs) if stage == "teacher" else (0.03, 2)
    total, warmup = trainer.epochs * steps, int(warmup_epochs * steps)
    for r in rows:
        last = r["epoch"] * steps - 1
        assert r["lr"] == pytest.approx(peak * lr_at(last, total, warmup), rel=1e-12)
    if stage != "teacher":
        assert rows[0]["lr"] < rows[1]["lr"]  # still warming up after epoch 1
    assert rows[-1]["lr"] > 0  # not the schedule's value after the end


@pytest.mark.fast
def test_precision_is_part_of_the_fingerprint(trainer_factory) -> None:
    trainer = trainer_factory()
    fp = {p: stage_fingerprint(trainer.cfg, "teacher", trainer.data, p) for p in ("off", "bfloat16", "float16")}
    assert len({json.dumps(v, sort_keys=True) for v in fp.values()}) == 3
    assert precision_name(torch.float16) == "float16" and precision_name(None) == "off"


def _batches(cfg: Config, data: PreparedData, epoch: int, view: int) -> list[tuple[torch.Tensor, ...]]:
    loader = TrainLoader(cfg, data, DistEnv())
    out = []
    for images, labels, idx in loader.epoch(epoch):
        aug = augment(images, idx, seed=cfg.seed, view=view, padding=cfg.data.crop_padding, flip=cfg.data.flip)
        out.append(tuple(t.cpu().clone() for t in (idx, labels, images, aug)))  # FFCV reuses its buffers
    return out


@pytest.mark.skipif(not ffcv_available(), reason="FFCV is not installed")
@pytest.mark.parametrize("loader", ["device", "torch"])
def test_tensor_loaders_give_the_ffcv_batches_bitwise(tmp_path: Path, cache_dir: Path, loader: str) -> None:
    """data.loader=device (here on the CPU: the same code as on a GPU) and torch against FFCV:
    the same sample indices, labels, raw and augmented pixels in every batch, for several
    (epoch, view), so the logits cache replays under any loader."""
    ffcv_cfg = _config(tmp_path, cache_dir, "data.loader=ffcv", "seed=3")
    other = _config(tmp_path, cache_dir, f"data.loader={loader}", "seed=3")
    data = prepare_data(ffcv_cfg, DistEnv())
    for epoch, view in ((0, 0), (1, 1), (5, 3)):
        a, b = _batches(ffcv_cfg, data, epoch, view), _batches(other, data, epoch, view)
        assert len(a) == len(b) == data.size("train") // ffcv_cfg.optim.batch_size
        for x, y in zip(a, b):
            assert all(torch.equal(s, t) for s, t in zip(x, y))


CIFAR_SAMPLE_BYTES = 32 * 32 * 3 * 4  # one 32x32 RGB image's student input (float32)


@pytest.mark.fast
def test_chunked_inputs_are_the_per_batch_inputs_bitwise(tmp_path: Path, cache_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """data.loader=device makes the student's inputs 3 batches at a time (here: 8 steps of 64
    in chunks of 192, the last of 128; a resumed epoch's chunks start at its first step):
    every step's input is, bit for bit, StudentInput of the loader's raw batch, the per-batch
    path (train_step's), with the same labels and indices."""
    monkeypatch.setattr(augment_module, "CHUNK_BYTES", 3 * 64 * CIFAR_SAMPLE_BYTES)
    cfg = _config(tmp_path, cache_dir, "seed=5")
    data = prepare_data(cfg, DistEnv())
    loader = TrainLoader(cfg, data, DistEnv())
    si = StudentInput.of(cfg, *data.stats(torch.device("cpu")))
    assert loader.kind == "device" and len(loader) == 8
    for epoch, view, start in ((0, 0, 0), (1, 1, 0), (2, 1, 3)):
        chunked = list(loader.inputs(epoch, view, si, start))
        per_batch = [(si(images, idx, view), labels, idx) for images, labels, idx in loader.epoch(epoch, start)]
        assert len(chunked) == len(per_batch) == 8 - start
        for (x, labels, idx), (y, labels_b, idx_b) in zip(chunked, per_batch):
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x.contiguous().view(torch.int32), y.contiguous().view(torch.int32))
            assert torch.equal(labels, labels_b) and torch.equal(idx, idx_b)


@pytest.mark.fast
def test_training_on_chunked_inputs_gives_the_per_batch_weights(trainer_factory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two epochs of the teacher stage with data.loader=device (inputs in chunks of 3 batches)
    and data.loader=torch (per batch, the same samples: test_tensor_loaders_give_the_ffcv_batches_bitwise):
    the same weights_hash. Bitwise, because the arithmetic is the same: the same fp32 kernels
    on the same input values in the same memory format; only where each batch's input lies
    in memory differs (a slice of its chunk)."""
    monkeypatch.setattr(augment_module, "CHUNK_BYTES", 3 * 64 * CIFAR_SAMPLE_BYTES)
    hashes = []
    for loader in ("device", "torch"):  # one after the other: a Trainer seeds the dropout stream it then uses
        trainer = trainer_factory(f"data.loader={loader}")
        assert trainer.loader.kind == loader
        hashes.append(trainer.fit(StageTracker())["weights_hash"])
    assert hashes[0] == hashes[1]
    assert hashes[0] != weights_hash(make_model(trainer.cfg, "teacher", 10, torch.device("cpu")).state_dict())
