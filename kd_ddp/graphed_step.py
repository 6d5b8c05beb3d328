"""The training step with nothing that changes between steps held as a Python number, and its
capture as one CUDA graph (PyTorch's CUDA Graphs guide, "whole-network capture").

A CUDA graph replays the kernels it recorded with the arguments they were launched with: a
Python number (a float LR, an int view) is frozen into it. So everything that changes from
step to step lives in a device tensor the step reads:
- the LR: `DeviceSchedule`, the schedule as a table on the device (one row per param group,
  one column per global step, LambdaLR's own values), indexed by the tally's device step
  counter and copied into the tensors that are the optimizer's `group["lr"]` (fused SGD
  takes a tensor LR: on a GPU it reads it from device memory);
- the view (which view's cached logits the KD student reads): an int64 device tensor. The
  augmentation itself (crop + flip keyed by seed and view, then normalize) is made by the
  loader before the step, a chunk of batches at a time with device-resident data
  (augment.StudentInput); `augment.crop_flip_params_t` is its key as device tensors, for a
  step that augments inside the graph;
- the batch (the student's input, labels, indices): static buffers it is copied into (`GraphedStep`).

`GraphedStep` runs a step function eagerly for a few warm-up steps (real training steps, on
a side stream, as the guide says: cuDNN's algorithm search, the allocator and lazy inits happen
outside the capture), captures the next one once and replays it from then on. Any exception
while capturing falls back to the eager step for good, with a warning naming the reason.

Arithmetic: on the CPU every value is bitwise what the Python-number step computes (fused SGD
reads a CPU tensor LR as a double: the table is float64 there). On a GPU the fused kernel reads
the LR as a float32 (`lr.data_ptr<float>()`, promoted to double), so each LR is rounded to
float32 (relative error <= 6e-8) against the double a Python LR passes: eager and graphed
steps agree with each other, not bitwise with the step of a Python LR.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, sample indices
StepBody = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
WARMUP_STEPS = 3  # the guide's count for one process (DDP would need 11)


# -- the LR on the device ------------------------------------------------------------------


def lr_dtype(device: torch.device) -> torch.dtype:
    """The dtype fused SGD reads a tensor LR in: float32 on a GPU, a double on the CPU."""
    return torch.float32 if device.type == "cuda" else torch.float64


class DeviceSchedule:
    """A LambdaLR's values for global steps 0..total as a device table, and the tensors that
    are the optimizer's `group["lr"]`. After the last step the value of step `total` holds
    (LambdaLR's lambda is constant there: the cosine's end)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR, total: int, device: torch.device) -> None:
        self.host = [[base * fn(s) for s in range(total + 1)]  # exactly LambdaLR's base_lr * lambda(step)
                     for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
        self.table = torch.tensor(self.host, dtype=lr_dtype(device), device=device)
        self.last = total
        self.lrs = [row[:1].clone().squeeze(0) for row in self.table]  # one 0-d tensor per group

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the device tensors the optimizer's LRs (again after a state load put floats there)."""
        for group, lr in zip(optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr

    def set(self, step: torch.Tensor) -> None:
        """The LRs of global step `step` (a device tensor): device ops only, no host sync."""
        col = self.table.index_select(1, step.clamp(max=self.last).view(1))
        for i, lr in enumerate(self.lrs):
            lr.copy_(col[i, 0])

    def host_lr(self, step: int, group: int = 0) -> float:
        """The LR of global step `step` as LambdaLR gives it (the log's and the checkpoint's)."""
        return self.host[group][min(step, self.last)]

    def checkpoint_states(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          done: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The optimizer's and the scheduler's state after `done` steps, as a LambdaLR stepped
        once per step leaves them (float LRs: a checkpoint any version of kd-ddp reads)."""
        nxt = [self.host_lr(done, i) for i in range(len(self.host))]
        opt = optimizer.state_dict()
        for group, lr in zip(opt["param_groups"], nxt, strict=True):
            group["lr"] = lr
        sched = scheduler.state_dict() | {"last_epoch": done, "_step_count": done + 1, "_last_lr": nxt}
        return opt, sched


# -- capture ---------------------------------------------------------------------------------


def graph_refusal(mode: str, device: torch.device, distributed: bool, grad_scaler: bool, loader: str) -> str | None:
    """Why the step stays eager under `train.cuda_graph=mode`, or None to capture it. `auto`
    captures where the guide's whole-network capture applies as written: a GPU, one process
    (no DDP: its buckets need 11 warm-up steps and more care), no GradScaler (fp16: its
    update is not written for capture) and the device-resident loader. `on` always tries."""
    if mode == "off":
        return "train.cuda_graph=off"
    if mode == "on":
        return None
    reasons = [(device.type != "cuda", f"not on a GPU ({device.type})"), (distributed, "DDP"),
               (grad_scaler, "fp16 GradScaler"), (loader != "device", f"loader {loader}")]
    found = [why for bad, why in reasons if bad]
    return ", ".join(found) if found else None


@contextlib.contextmanager
def side_stream(device: torch.device, stream: torch.cuda.Stream | None) -> Iterator[None]:
    """The guide's warm-up: work on a side stream that waits for the current one and is
    waited for by it. A no-op off the GPU (stream None)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def capture(body: StepBody, static: Batch) -> torch.cuda.CUDAGraph:
    """Record one call of `body` on the static buffers as a CUDA graph (nothing runs yet)."""
    if static[0].device.type != "cuda":
        raise RuntimeError(f"CUDA graphs record CUDA work; the step runs on {static[0].device.type}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body(*static)
    return graph


class GraphedStep:
    """`body(images, labels, idx)`, eagerly for `warmup` steps, then captured once and
    replayed on static buffers (`refusal` not None: eagerly throughout). A batch of another
    shape than the captured one (none in training: every batch is full) runs eagerly."""

    def __init__(self, body: StepBody, device: torch.device, refusal: str | None, name: str,
                 warmup: int = WARMUP_STEPS) -> None:
        self.body, self.device, self.name, self.warmup = body, device, name, warmup
        self.refusal = refusal  # why the steps run eagerly (None: not decided against yet)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and refusal is None else None  # warm-up's
        self.steps = 0

    @property
    def mode(self) -> str:
        return "graphed" if self.graph is not None else "eager"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> None:
        batch = (images, labels, idx)
        if self.graph is not None and self._fits(batch):
            self._replay(batch)
        elif self.refusal is not None or self.graph is not None:
            self.body(*batch)
        elif self.steps < self.warmup:
            with side_stream(self.device, self.stream):
                self.body(*batch)
        else:
            self._capture_and_run(batch)
        self.steps += 1

    def _fits(self, batch: Batch) -> bool:
        assert self.static is not None
        return all(s.shape == b.shape and s.dtype == b.dtype for s, b in zip(self.static, batch))

    def _replay(self, batch: Batch) -> None:
        assert self.graph is not None and self.static is not None
        for s, b in zip(self.static, batch):
            s.copy_(b, non_blocking=True)
        self.graph.replay()

    def _capture_and_run(self, batch: Batch) -> None:
        """Capture the step on static copies of this batch, then replay it (capture only
        records); on any failure run this batch eagerly and every later one too."""
        try:
            self.static = tuple(t.clone() for t in batch)  # type: ignore[assignment]
            self.graph = capture(self.body, self.static)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - any failure to capture means: stay eager
            self.graph, self.static = None, None
            self.refusal = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("%s: CUDA graph %s; the training steps run eagerly", self.name, self.refusal)
            self.body(*batch)
            return
        log.info("%s: training step captured as a CUDA graph after %d warm-up step(s)", self.name, self.steps)
        self.graph.replay()
