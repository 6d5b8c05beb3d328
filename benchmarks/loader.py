"""Data loading: kd-ddp's training loader vs torchvision ImageFolder + DataLoader.

Both deliver the training augmentation (random crop with 4-pixel zero padding + flip) as
normalized float batches of the same size, with as many workers as cores, on the device the
training would use (a GPU if there is one: kd-ddp then crops and normalizes there):
- kd-ddp: FFCV reads raw uint8 pixels from the .beton, the crop/flip is one gather on the
  batch (kd_ddp.augment), then normalize to channels_last floats;
- torchvision: ImageFolder decodes each JPEG with PIL, RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize, DataLoader(num_workers=cores, pin_memory on
  a GPU), then the copy to the device.
Images/s over a fixed number of batches after warm-up batches; interleaved repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_step import sync
from kd_ddp.augment import augment, normalize
from kd_ddp.config import load_config
from kd_ddp.data import TrainLoader, prepare_data
from kd_ddp.distributed import DistEnv, available_cores, pick_device
from kd_ddp.sources import extract_archive


def _rate(make_iter: Callable[[], Iterator[Any]], batches: int, warmup: int, batch_size: int,
          device: torch.device) -> float:
    it = make_iter()
    for _ in range(warmup):
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    sync(device)
    return batches * batch_size / (time.perf_counter() - t0)


def run(archive: str, cache_dir: Path, batch_size: int = 256, batches: int = 60, repeats: int = 3) -> dict[str, Any]:
    from torchvision import datasets, transforms

    cfg = load_config("quick", [f"data.root={archive}", f"data.cache_dir={cache_dir}",
                                f"optim.batch_size={batch_size}"])
    env = DistEnv(device=pick_device("auto", 0))
    data = prepare_data(cfg, env)
    mean, std = data.stats(env.device)
    loader = TrainLoader(cfg, data, env)
    epoch = iter(range(1000))

    def kd_ddp_batches() -> Iterator[torch.Tensor]:
        while True:
            e = next(epoch)
            for images, _, idx in loader.epoch(e):
                yield normalize(augment(images, idx, seed=0, view=e, padding=4, flip=True), mean, std)

    root = extract_archive(Path(archive), cfg.cache_dir)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(data.meta["mean"], data.meta["std"])])
    tv_loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), tf), batch_size=batch_size,
                                            shuffle=True, num_workers=available_cores(), drop_last=True,
                                            persistent_workers=True, pin_memory=env.device.type == "cuda")

    def tv_batches() -> Iterator[torch.Tensor]:
        while True:
            for x, _ in tv_loader:
                yield x.to(env.device, non_blocking=True)

    samples: dict[str, list[float]] = {"kd_ddp_ffcv": [], "torchvision": []}
    kd_iter, tv_iter = kd_ddp_batches(), tv_batches()  # kept alive: warm-up (JIT, workers) paid once
    for r in range(repeats):
        samples["kd_ddp_ffcv"].append(_rate(lambda: kd_iter, batches, 10 if r == 0 else 2, batch_size, env.device))
        samples["torchvision"].append(_rate(lambda: tv_iter, batches, 5 if r == 0 else 2, batch_size, env.device))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"images_per_s": med, "samples": samples, "ratio": med["kd_ddp_ffcv"] / med["torchvision"],
            "batch_size": batch_size, "workers": available_cores(), "device": str(env.device)}


def markdown(r: dict[str, Any]) -> str:
    m = r["images_per_s"]
    return ("| loader | images/s |\n|---|---|\n"
            f"| torchvision ImageFolder + DataLoader ({r['workers']} workers, PIL crop+flip) | "
            f"{m['torchvision']:.0f} |\n"
            f"| kd-ddp: FFCV + batched crop/flip | {m['kd_ddp_ffcv']:.0f} |\n"
            f"| **ratio** (target >= 5x) | **{r['ratio']:.1f}x** |")
