"""Precision in one place: the autocast dtype a run uses, its one name, and the autocast.

`train.amp` = auto | bf16 | fp16 | off. `auto` resolves per device: bf16 on a GPU that has
it (else fp16), bf16 on a CPU with bf16 instructions, else off (full fp32). The dtype's
name (`bfloat16`, `float16`, `off`) is what summaries, fingerprints, the logits cache's key
and the W&B config record; the report prints it for a person (`bfloat16 autocast`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kd_ddp.config import Config


def cpu_has_native_bf16() -> bool:
    """bf16 autocast only pays on CPUs with bf16 instructions (AVX512-BF16 or AMX);
    elsewhere oneDNN emulates it and a step gets several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run on `device`, or None for full fp32."""
    amp = cfg.train.amp
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """The one name of a precision: `bfloat16`, `float16`, or `off` (fp32)."""
    return str(dtype).replace("torch.", "") if dtype else "off"


def autocast(device: torch.device, dtype: torch.dtype | None,
             cache_enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """torch.autocast in `dtype` on the device's type; a no-op context for full fp32.
    `cache_enabled=False` for a region a CUDA graph captures (the guide's rule: the cache of
    cast weights would hold tensors the capture does not own); the casts are the same."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                          cache_enabled=cache_enabled)
