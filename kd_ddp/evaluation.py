"""A model's test loss and accuracy over a whole split, every rank its shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kd_ddp.augment import normalize
from kd_ddp.config import Config
from kd_ddp.data import EvalLoader
from kd_ddp.distributed import DistEnv, all_reduce_tensor
from kd_ddp.precision import autocast


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics). In training each
    rank's last forward updated its own; evaluated as they are, each rank's shard of the
    test set would meet another model, and the metrics would depend on the world size.
    Rank 0's are the ones its checkpoint holds."""
    if env.distributed and env.world_size > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: EvalLoader, env: DistEnv, mean: torch.Tensor, std: torch.Tensor,
             cfg: Config, dtype: torch.dtype | None) -> tuple[float, float]:
    """(mean CE loss, accuracy) over the whole split: each rank its shard, then summed."""
    model.eval()
    # summed on the device and read once: a read per batch would stall a GPU per batch
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
    for images, labels, _ in loader:
        x = normalize(images, mean, std, cfg.train.channels_last)
        with autocast(env.device, dtype):
            logits = model(x).float()
        sums[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
    loss_sum, correct, total = all_reduce_tensor(sums, env).tolist()  # host sync: once per evaluation
    return loss_sum / total, correct / total
