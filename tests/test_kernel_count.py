"""benchmarks/kernel_count.py: the ops a training step dispatches, counted in-process on the
smoke preset's models (the counting the before/after benchmark runs in each checkout)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_count

pytestmark = pytest.mark.fast

SMOKE_MODELS = ["model.teacher_width=8", "model.teacher_hidden=32", "model.student_width=4",
                "model.student_hidden=16"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Counts do not depend on the thread count; the time does (OpenMP spin-waits on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_counts_are_real_deterministic_and_see_the_live_teacher(tmp_path: Path) -> None:
    steps = kernel_count.role_steps(32, SMOKE_MODELS, torch.device("cpu"), tmp_path,
                                    roles=("teacher", "student-kd cached", "student-kd live"))
    teacher = kernel_count.count_step(steps["teacher"], steps=2, warmup=1)
    again = kernel_count.count_step(steps["teacher"], steps=2, warmup=0)
    assert teacher["stable"] and again["stable"]
    assert 0 < teacher["aten_top"] < teacher["aten_all"]
    for key in ("aten_top", "aten_all", "phases", "top_ops"):
        assert teacher[key] == again[key], key
    # every op lands in exactly one phase, and the step's parts are all seen
    assert sum(p["all"] for p in teacher["phases"].values()) == teacher["aten_all"]
    assert sum(p["top"] for p in teacher["phases"].values()) == teacher["aten_top"]
    assert {"augment+normalize", "forward", "loss", "backward", "optimizer", "tally"} <= set(teacher["phases"])
    assert "teacher forward" not in teacher["phases"]
    assert all(teacher["phases"][p]["top"] > 0 for p in ("forward", "loss", "backward")), teacher["phases"]

    cached = kernel_count.count_step(steps["student-kd cached"], steps=1, warmup=1)
    live = kernel_count.count_step(steps["student-kd live"], steps=1, warmup=1)
    assert live["aten_all"] > cached["aten_all"] and live["aten_top"] > cached["aten_top"]
    assert "teacher forward" in live["phases"] and "teacher forward" not in cached["phases"]
    # the same student: its own forward and backward dispatch the same ops either way
    for phase in ("augment+normalize", "forward", "backward", "optimizer", "tally"):
        assert live["phases"][phase] == cached["phases"][phase], phase


def test_markdown_puts_before_and_after_side_by_side() -> None:
    def run(n: int) -> dict:
        role = {"aten_top": n, "aten_all": 3 * n, "phases": {"forward": {"top": n, "all": 3 * n, "launches": 0}},
                "top_ops": [("aten::empty", n)], "stable": True, "cuda_launches": None, "cuda_kernels": None}
        return {"roles": {r: role for r in kernel_count.ROLES}}

    table = kernel_count.markdown({"before": run(10), "after": run(7)})
    assert "| role | per step | before | after | after - before |" in table
    assert "| teacher | aten ops, top-level | 10 | 7 | -3 |" in table
    assert "|  | aten ops, all | 30 | 21 | -9 |" in table
    assert "|  |   forward: top-level / all | 10/30 | 7/21 | -3/-9 |" in table
    assert "aten::empty 10/7" in table
