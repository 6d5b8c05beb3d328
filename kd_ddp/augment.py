"""Training augmentation (random crop with zero padding + horizontal flip) as a pure function.

Each sample's crop offset and flip come from a counter-based hash of (seed, view, sample
index), not from any RNG state, so the exact pixels of any view of any sample can be
produced again at any time, on any rank, in any batch order. The teacher-logits cache and
exact resume both depend on that.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Wrap-around multiplication is the point of the hash.
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def sample_hash(seed: int, view: int, indices: np.ndarray) -> np.ndarray:
    """A uniformly distributed uint64 per sample, a pure function of (seed, view, index)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(view))
        return _splitmix64(np.asarray(indices, dtype=np.uint64) * _GOLDEN ^ key)


def crop_flip_params(seed: int, view: int, indices: np.ndarray, padding: int,
                     flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (dy, dx, flipped): crop offsets in [0, 2*padding] and a flip bit."""
    h = sample_hash(seed, view, indices)
    span = np.uint64(2 * padding + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(20)) % span).astype(np.int64)
    flipped = ((h >> np.uint64(40)) & np.uint64(1)).astype(bool) if flip else np.zeros(len(h), bool)
    return dy, dx, flipped


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flipped: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Crop each NHWC image at its own offset in the zero-padded image, flipping some.

    One gather for the whole batch; works on uint8 and on any device.
    """
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding)) if padding else images
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = torch.arange(w, device=images.device).expand(b, w)
    cols = torch.where(flipped[:, None], w - 1 - cols, cols) + dx[:, None]  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def augment(images: torch.Tensor, indices: torch.Tensor | np.ndarray, *, seed: int, view: int,
            padding: int, flip: bool) -> torch.Tensor:
    """View `view` of the samples `indices`: NHWC uint8 in, NHWC uint8 out."""
    idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    dy, dx, fl = crop_flip_params(seed, view, idx, padding, flip)
    params = to_device(torch.from_numpy(np.stack([dy, dx, fl.astype(np.int64)])), images.device)
    return crop_flip(images, params[0], params[1], params[2].bool(), padding)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without stalling the host.

    A copy from pageable memory to a GPU waits for everything queued on the stream, so a
    per-batch copy would stall the training loop once per step; from pinned memory it is
    queued behind the step like a kernel (the caching host allocator keeps the pinned block
    until the copy has run).
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = True) -> torch.Tensor:
    """NHWC uint8 -> NCHW float normalized; NHWC memory already *is* channels_last."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)
