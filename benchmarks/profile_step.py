"""Where the time of a training step goes: torch.profiler over a few steps, top ops by self time.

    python -m benchmarks.profile_step [--model teacher_cnn] [--width 32] [--steps 5]

Profiles the teacher step in fp32 channels_last and in bf16 autocast + channels_last (the
missed "AMP >= 3x" target: on a CPU without AVX512-BF16/AMX the bf16 convolutions run on
oneDNN's slower reference kernels), then a KD student step with cached logits vs with a
live teacher forward (the live/cached ratio is the teacher forward's share of the step).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import train_step
from kd_ddp import stages


def _profile(step: Callable[[], None], steps: int, title: str, rows: int) -> float:
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    print(f"\n### {title}: {total_ms:.1f} ms per step\n")
    print("| op | self CPU ms per step | share |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        ms = e.self_cpu_time_total / 1e3 / steps
        print(f"| {e.key} | {ms:.1f} | {100 * ms / total_ms:.0f}% |")
    return total_ms


def _setup(model_name: str, width: int, batch: int, amp: str) -> tuple:
    cache = Path(tempfile.gettempdir()) / "kd-profile-cache"
    work = Path(tempfile.mkdtemp(prefix="kd-profile-"))
    return train_step.synthetic(cache, work, batch, [f"model.teacher={model_name}", f"model.teacher_width={width}",
                                                     f"train.amp={amp}"], torch.device("cpu"))


def teacher_step(model_name: str, width: int, amp: str, batch: int) -> Callable[[], None]:
    return train_step.step_fn(*_setup(model_name, width, batch, amp))


def kd_step(model_name: str, width: int, live: bool, batch: int) -> Callable[[], None]:
    """The KD student's train_step with the teacher's logits from a table (as the cache gives
    them) or from a live forward of an (untrained: its cost is the same) teacher."""
    cfg, env, data = _setup(model_name, width, batch, "off")
    logits = train_step.kd_teacher_logits(cfg, env, data, live)
    return train_step.step_fn(cfg, env, data, stages.STUDENT_KD.name, logits)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    p.add_argument("--model", default="teacher_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows", type=int, default=6)
    a = p.parse_args()
    name = f"{a.model} w{a.width}"
    fp32 = _profile(teacher_step(a.model, a.width, "off", a.batch), a.steps, f"teacher {name}, fp32", a.rows)
    bf16 = _profile(teacher_step(a.model, a.width, "bf16", a.batch), a.steps,
                    f"teacher {name}, bf16 autocast", a.rows)
    cached = _profile(kd_step(a.model, a.width, False, a.batch), a.steps, "KD student step, cached logits", a.rows)
    live = _profile(kd_step(a.model, a.width, True, a.batch), a.steps, f"KD student step, live {name}", a.rows)
    print(f"\nbf16 / fp32 step time: {bf16 / fp32:.2f}x; live / cached KD step time: {live / cached:.2f}x "
          f"(batch {a.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
