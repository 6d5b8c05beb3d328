"""Training augmentation (random crop with zero padding + horizontal flip) as a pure function.

Each sample's crop offset and flip come from a counter-based hash of (seed, view, sample
index), not from any RNG state, so the exact pixels of any view of any sample can be
produced again at any time, on any rank, in any batch order. The teacher-logits cache and
exact resume both depend on that.

The hash (splitmix64) runs as torch ops on whatever device holds the batch's indices: with
device-resident data (`data.loader=device`) the indices, the parameters and the pixels never
leave the GPU. torch has no unsigned 64-bit shifts or remainders, so the 64-bit words are
kept in int64 tensors: multiplication and xor give the same bits either way (wrap-around
is the point of the hash), and the two operations that differ, right shift and remainder,
are written out for unsigned words below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kd_ddp.config import Config

_U64 = (1 << 64) - 1
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(word: int) -> int:
    """A 64-bit word as the int64 with the same bits (torch scalars must fit in int64)."""
    word &= _U64
    return word - (1 << 64) if word >> 63 else word


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64-held words: the arithmetic shift, sign bits masked off."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _urem(x: torch.Tensor, m: int) -> torch.Tensor:
    """Unsigned remainder x mod m (small m) of int64-held words, from their two 32-bit halves."""
    hi, lo = _shr(x, 32), x & 0xFFFFFFFF
    return ((hi % m) * ((1 << 32) % m) + lo) % m


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    return x ^ _shr(x, 31)


def _splitmix64_word(x: int) -> int:
    """The same finalizer on one Python int (exact arithmetic, masked to 64 bits)."""
    x &= _U64
    x = ((x ^ (x >> 30)) * _M1) & _U64
    x = ((x ^ (x >> 27)) * _M2) & _U64
    return x ^ (x >> 31)


def sample_hash(seed: int, view: int, indices: torch.Tensor) -> torch.Tensor:
    """A uniformly distributed 64-bit word per sample (in int64), a pure function of (seed, view, index)."""
    key = _splitmix64_word(seed * _GOLDEN + view)
    return _splitmix64((indices.to(torch.int64) * _signed(_GOLDEN)) ^ _signed(key))


def _params_of_hash(h: torch.Tensor, padding: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flipped) from each sample's 64-bit word: the word mod the span is the row offset,
    the word shifted right by 20 mod the span the column offset, bit 40 the flip."""
    span = 2 * padding + 1
    dy = _urem(h, span)
    dx = _shr(h, 20) % span
    flipped = (_shr(h, 40) & 1).bool() if flip else torch.zeros_like(h, dtype=torch.bool)
    return dy, dx, flipped


def crop_flip_params(seed: int, view: int, indices: torch.Tensor, padding: int,
                     flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (dy, dx, flipped), on the indices' device: crop offsets in [0, 2*padding], a flip bit."""
    return _params_of_hash(sample_hash(seed, view, indices), padding, flip)


def crop_flip_params_t(seed: torch.Tensor, view: torch.Tensor, indices: torch.Tensor, padding: int,
                       flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`crop_flip_params` with seed and view as int64 device tensors (0-d), bitwise the same
    params: the (seed, view) key is hashed on the device too (int64 multiply-add wraps as the
    masked Python arithmetic does), so nothing about the view is a Python number (a CUDA
    graph or a compiled region replays it for any view)."""
    key = _splitmix64(seed.to(torch.int64) * _signed(_GOLDEN) + view.to(torch.int64))
    return _params_of_hash(_splitmix64((indices.to(torch.int64) * _signed(_GOLDEN)) ^ key), padding, flip)


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
    """View `view` of the samples `indices`: NHWC uint8 in, NHWC uint8 out, on the images' device."""
    idx = indices if isinstance(indices, torch.Tensor) else torch.from_numpy(np.asarray(indices))
    dy, dx, fl = crop_flip_params(seed, view, to_device(idx, images.device), padding, flip)
    return crop_flip(images, dy, dx, fl, padding)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor onto `device` without stalling the host (a no-op when it is there already).

    A copy from pageable memory to a GPU waits for everything queued on the stream, so a
    per-batch copy would stall the training loop once per step; from pinned memory it is
    queued behind the step like a kernel (the caching host allocator keeps the pinned block
    until the copy has run).
    """
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = True) -> torch.Tensor:
    """NHWC uint8 -> NCHW float normalized; NHWC memory already *is* channels_last.

    In place after the one float copy: the same IEEE operations, element by element, as
    `(x - mean) / std`, without a second and third float copy of a chunk (`chunk_size`)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


# Chunked inputs (data.loader=device: `TensorLoader.inputs`). Every sample's pixels depend
# on (seed, view, index) alone and normalize works element by element, so StudentInput of a
# chunk of K batches is, sliced, bitwise the K per-batch results (tests/test_augment.py),
# made with the ~55 small kernels of one batch instead of K times them. A chunk's student
# input is float32: 12 KiB per 32x32x3 image, so a whole CIFAR-10 epoch would be 600 MB
# (150 MB as uint8). CHUNK_BYTES bounds it instead: 128 MiB = 10,922 such images, 42 batches
# of 256 or 10 of 1024 (from ~55 kernels a step to ~5 or fewer), while the memory in use
# stays under ~2.5 x CHUNK_BYTES (320 MiB) as a chunk is made: the previous chunk, which the
# step on its last batch still holds, the new float chunk, and its uint8 gather and crop
# (1/4 of it each; the padded copy, ~0.4, is freed before the float one is made). Bigger
# chunks would save no launches worth having and take GPU memory from the activations.
CHUNK_BYTES = 128 << 20


def chunk_size(batch: int, sample_bytes: int) -> int:
    """Samples per chunk: the most whole batches whose student input fits CHUNK_BYTES (read
    at each call, so a test can make chunks of a few batches), at least one batch."""
    return batch * max(1, CHUNK_BYTES // (batch * sample_bytes))


@dataclass(frozen=True)
class StudentInput:
    """What turns a loader batch (NHWC uint8 images and their sample indices) into the
    student's input for view `view`: crop + flip (`augment`, a pure function of seed, view
    and index), then `normalize`. The training step and the logits cache both call it, so
    the teacher's cached logits are those of the very pixels the student is given."""

    seed: int
    padding: int
    flip: bool
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool

    @classmethod
    def of(cls, cfg: Config, mean: torch.Tensor, std: torch.Tensor) -> StudentInput:
        return cls(cfg.seed, cfg.data.crop_padding, cfg.data.flip, mean, std, cfg.train.channels_last)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, view: int) -> torch.Tensor:
        """The input of a batch, or of a chunk of batches: the same pixels either way."""
        views = augment(images, indices, seed=self.seed, view=view, padding=self.padding, flip=self.flip)
        return normalize(views, self.mean, self.std, self.channels_last)

    @staticmethod
    def sample_bytes(images: torch.Tensor) -> int:
        """Bytes of one sample's input (float32) for NHWC `images`: what `chunk_size` divides by."""
        return images[0].numel() * 4
