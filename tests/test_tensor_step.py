"""The tensor-only training step (issue 23, item 2): the LR, view and seed as device tensors,
so that the step can be captured as one CUDA graph. On the CPU: the same weights, bitwise, as
the step of a Python-number LR and view; the forward region compiles whole without
recompiling; no host sync in the step; a capture that fails falls back to eager steps."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.train_step import legacy_step, use_float_lr
from kd_ddp.augment import crop_flip_params, crop_flip_params_t
from kd_ddp.checkpoint import load_checkpoint, weights_hash
from kd_ddp.config import load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv
from kd_ddp.graphed_step import graph_refusal, lr_dtype
from kd_ddp.tracking import StageTracker
from kd_ddp.train import Trainer

pytestmark = pytest.mark.fast  # in-process (tests/conftest.py)


@pytest.fixture()
def make(tmp_path: Path, cache_dir: Path) -> Iterator:
    made: list[Trainer] = []

    def trainer(*overrides: str, stage: str = "teacher", run: str = "") -> Trainer:
        cfg = load_config("smoke", [f"run.dir={tmp_path / (run or f'run{len(made)}')}", f"data.cache_dir={cache_dir}",
                                    "tracking.wandb.mode=disabled", "tracking.progress=false", "data.loader=device",
                                    "train.amp=off", *overrides])
        env = DistEnv()
        t = Trainer(cfg, env, prepare_data(cfg, env), stage)
        t.resume()
        t.net.train()
        made.append(t)
        return t

    yield trainer
    for t in made:
        t.close()


def _batches(t: Trainer) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
    """(view, batch): 4 steps of epoch 0 in view 0, then 4 of epoch 1 in view 1 (the smoke
    preset warms up over its first epoch: every step has another LR)."""
    return [(e, b) for e in (0, 1) for b in list(t.loader.epoch(e))[:4]]


def _run(t: Trainer, n: int = 8) -> Trainer:
    """The first n steps of `_batches` (run right after making t: each Trainer seeds the
    process's dropout stream, so a trainer made later would restart the other's stream)."""
    for view, batch in _batches(t)[:n]:
        t.train_step(*batch, view)
    return t


def _state(t: Trainer) -> list[torch.Tensor]:
    return [*t.model.state_dict().values(), *(t.optimizer.state[p]["momentum_buffer"] for p in t.model.parameters())]


def test_tensor_params_are_bitwise_the_int_ones() -> None:
    idx = torch.arange(5000) * 7919 + 3
    for seed in (0, 3, 12345, -7, 2**40 + 5):
        for view in (0, 1, 19, 1000):
            for padding, flip in ((4, True), (2, False), (0, True)):
                a = crop_flip_params(seed, view, idx, padding, flip)
                b = crop_flip_params_t(torch.tensor(seed), torch.tensor(view), idx, padding, flip)
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (seed, view, padding, flip)


@pytest.mark.parametrize("stage", ["teacher", "student-normal"])
def test_tensor_step_gives_the_python_number_steps_weights_bitwise(make, stage: str) -> None:
    """fp32 on the CPU, across LR changes (every warm-up step) and a view change: the same
    weights, momentum and BatchNorm statistics, and a checkpoint state of today's format."""
    new = _run(make(stage=stage))
    old = make(stage=stage)
    use_float_lr(old)
    for view, batch in _batches(old):
        legacy_step(old, *batch, view)
    assert weights_hash(new.model.state_dict()) == weights_hash(old.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_state(new), _state(old)))
    # the host's LRs: of the last step taken (the log's), and of the next one (LambdaLR's)
    assert (new.lr, new.schedule.host_lr(8)) == (new.schedule.host[0][7], old.scheduler.get_last_lr()[0])
    opt, sched = new.schedule.checkpoint_states(new.optimizer, new.scheduler, new.steps_taken)
    assert sched == old.scheduler.state_dict()
    assert opt["param_groups"] == old.optimizer.state_dict()["param_groups"]


def test_lr_is_a_device_tensor_and_resume_puts_it_back(make) -> None:
    """A mid-epoch checkpoint holds float LRs (today's format); resuming from it makes the
    LRs device tensors again, and 4 + 4 steps equal 8 uninterrupted ones bitwise."""
    whole = _run(make())
    first = _run(make(run="split"), 4)
    first.save(0, 4, {"loss_sum": 0.0, "seen": 0, "time_s": 0.0})
    saved = load_checkpoint(first.ckpt_path)
    assert all(type(g["lr"]) is float for g in saved["optimizer"]["param_groups"])
    assert all(type(v) is float for v in saved["scheduler"]["_last_lr"])
    second = make(run="split")
    assert (second.start_step, second.steps_taken) == (4, 4)
    for group in second.optimizer.param_groups:
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == lr_dtype(second.env.device)
    for view, batch in _batches(second)[4:]:
        second.train_step(*batch, view)
    assert all(torch.equal(a, b) for a, b in zip(_state(whole), _state(second)))


class _HostSyncs(TorchDispatchMode):
    """Every op that reads a tensor's value into Python (.item(), .tolist(), bool(), int(),
    indexing with a 0-d tensor): on a GPU each one waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_step_reads_nothing_back_to_the_host(make) -> None:
    t = _run(make(), 1)
    (view, batch), *_ = _batches(t)
    with _HostSyncs() as syncs:
        images, labels, idx = batch
        x = t.student_input(images, idx, view)
        t._step(x, labels, idx)
    assert syncs.seen == []
    probe = _HostSyncs()
    with probe:
        t.tally.step.item()  # the probe sees a sync where there is one
    assert probe.seen


def test_the_forward_region_compiles_whole_without_recompiling(make) -> None:
    """torch.compile(fullgraph=True) of the forward region (model and loss), in the real
    step, across steps, a view change and LR changes: one graph, no recompilation, and the
    weights of the eager step."""
    torch._dynamo.reset()
    compiled = make()
    compiled.forward_loss = torch.compile(compiled.forward_loss, fullgraph=True, backend="eager")  # type: ignore[method-assign]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled)
    eager = _run(make())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(torch.equal(a, b) for a, b in zip(_state(compiled), _state(eager)))
    torch._dynamo.reset()


def test_cuda_graph_decision() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_refusal("auto", cuda, False, False, "device") is None
    assert graph_refusal("auto", cpu, False, False, "device") == "not on a GPU (cpu)"
    assert graph_refusal("auto", cuda, True, True, "torch") == "DDP, fp16 GradScaler, loader torch"
    assert graph_refusal("on", cpu, True, True, "ffcv") is None
    assert graph_refusal("off", cuda, False, False, "device") == "train.cuda_graph=off"


def test_a_failed_capture_falls_back_to_the_eager_step(make, caplog: pytest.LogCaptureFixture) -> None:
    """train.cuda_graph=on on the CPU: the warm-up steps run, the capture fails (no CUDA
    work to record), the log says why, and the stage ends with the eager run's weights."""
    forced = make("train.cuda_graph=on")
    with caplog.at_level(logging.WARNING, logger="kd_ddp.graphed_step"):
        done = forced.fit(StageTracker())
    eager = make("train.cuda_graph=off")
    assert [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()] == [
        "teacher: CUDA graph capture failed: RuntimeError: CUDA graphs record CUDA work; the step runs on cpu; "
        "the training steps run eagerly"]
    assert forced.runner.mode == "eager" and forced.runner.steps == forced.steps_taken == 16
    assert done["weights_hash"] == eager.fit(StageTracker())["weights_hash"]
    assert eager.runner.refusal == "train.cuda_graph=off"
