"""`python -m benchmarks [--only NAME ...]`: side-by-side speed measurements (`make bench`).

Prints a Markdown table per benchmark. A full run writes benchmarks/results.json and
benchmarks/results.md (the source of BENCHMARKS.md); a run of some benchmarks (`--only`)
writes the same two files under benchmarks/partial/ (gitignored) unless `--out` says where,
so it never replaces the full run's record with a part of it. Every figure is a ratio of
runs made in this one invocation, interleaved where possible, after warm-up. Run it on a
quiet machine: with other processes on the cores, OpenMP threads spin-wait on each other
and small tensor ops get 10x slower, which distorts every ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import (
    ddp,
    ensemble,
    kd_accuracy,
    kd_epoch,
    kernel_count,
    loader,
    loop_compare,
    memory,
    pipeline,
    source_scan,
    train_step,
)
from kd_ddp.tracking import cpu_name

HERE = Path(__file__).parent


@dataclass
class Run:
    """One invocation: its arguments, its scratch dir, its data cache and what it has found."""

    args: argparse.Namespace
    work: Path
    cache: Path
    results: dict = field(init=False)
    md: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.results = {"machine": machine(), "date": datetime.date.today().isoformat()}
        self.md = [f"Machine: {self.results['machine']}. Date: {self.results['date']}.", ""]

    @property
    def data(self) -> list[str]:
        return [f"data.root={self.args.data_root}", f"data.cache_dir={self.cache}"]

    def section(self, title: str, table: str) -> None:
        self.md += [f"### {title}", "", table, ""]


def teachers() -> list[list[str]]:
    """The quick and seed presets' teachers; on a GPU also the wider w64 (too slow for a CPU run)."""
    rows = [["model.teacher=teacher_cnn_lite", "model.teacher_width=32"],
            ["model.teacher=teacher_cnn", "model.teacher_width=32"]]
    if torch.cuda.is_available():
        rows.append(["model.teacher=teacher_cnn", "model.teacher_width=64"])
    return rows


def bench_loader(r: Run) -> None:
    r.results["loader"] = loader.run(r.args.data_root, r.cache, repeats=r.args.repeats + 1)
    r.section("Data loading (training augmentation, batch 256)", loader.markdown(r.results["loader"]))


def bench_train_step(r: Run) -> None:
    r.results["train_step"] = train_step.run_steps(teachers(), r.cache, r.work / "steps", steps=5,
                                                   batch=r.args.batch, repeats=r.args.repeats)


def bench_tensor_step(r: Run) -> None:
    res = r.results["tensor_step"] = train_step.run_tensor_step(r.cache, r.work / "tensor-step", batch=r.args.batch,
                                                                repeats=r.args.repeats + 1)
    r.section(f"Training step forms: Python-number LR vs tensor-only (vs CUDA graph on a GPU), batch "
              f"{r.args.batch}, {res['amp']}", train_step.tensor_step_markdown(res))


def bench_compute_limit(r: Run) -> None:
    preset = r.args.limit_preset or ("seed-gpu" if torch.cuda.is_available() else "quick")
    r.results["compute_limit"] = train_step.run_compute_limit(r.args.data_root, r.cache, r.work / "limit",
                                                              preset=preset)


def step_table(r: Run) -> None:
    """train_step and compute_limit share one table, written once after both have run."""
    steps, limit = r.results.get("train_step"), r.results.get("compute_limit")
    if steps or limit:
        r.section(f"Training step (batch {r.args.batch}) and each stage's distance to its compute limit",
                  train_step.markdown(steps or [], limit))


def bench_loop_compare(r: Run) -> None:
    if not r.args.baseline:
        print("loop_compare: skipped (no --baseline revision)", file=sys.stderr)
        return
    r.results["loop_compare"] = loop_compare.run(r.args.baseline, r.args.data_root, r.work / "loop",
                                                 repeats=r.args.repeats)
    r.section(f"Training loop vs revision {r.args.baseline}, side by side",
              loop_compare.markdown(r.results["loop_compare"]))


def bench_kd_epoch(r: Run) -> None:
    # The quick preset's teacher and the seed preset's (4x its FLOPs); the seed row caches
    # 2 views to save build time (the epoch costs do not depend on the count).
    rows = [kd_epoch.run("quick", r.data, r.work / "kd-quick", repeats=r.args.repeats),
            kd_epoch.run("seed", [*r.data, "kd.views=2"], r.work / "kd-seed", repeats=r.args.repeats)]
    r.results["kd_epoch"] = rows
    r.section("KD student epoch (50,000 images, batch 256)", kd_epoch.markdown(rows))


def bench_ensemble(r: Run) -> None:
    # Synthetic data of its own: the cost of N teachers, not of the data.
    r.results["ensemble"] = ensemble.run(r.work / "ensemble", repeats=r.args.repeats)
    r.section("Ensemble distillation: N teachers, cached and live (quick models, synthetic data)",
              ensemble.markdown(r.results["ensemble"]))


def bench_kd_accuracy(r: Run) -> None:
    r.results["kd_accuracy"] = kd_accuracy.run(r.data, r.work / "kd-accuracy")
    r.section("KD accuracy: cached logits vs live teacher (quick preset, 3 seeds)",
              kd_accuracy.markdown(r.results["kd_accuracy"]))


def bench_memory(r: Run) -> None:
    # A fresh process: the peak is per process.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--json"], check=True,
                          capture_output=True, text=True)
    r.results["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
    r.section("Memory of one process, step by step (synthetic data, smoke teacher)",
              memory.markdown(r.results["memory"]))


def bench_pipeline(r: Run) -> None:
    r.results["pipeline"] = pipeline.run(r.args.data_root, r.work / "pipeline")
    r.section("Whole pipeline vs a plain PyTorch script (quick preset, 1 process)",
              pipeline.markdown(r.results["pipeline"]))


def bench_source_scan(r: Run) -> None:
    r.results["source_scan"] = source_scan.run(r.args.data_root)
    r.section("Data identity: reading a directory source's listing (CIFAR-10 as an ImageFolder)",
              source_scan.markdown(r.results["source_scan"]))


def bench_kernel_count(r: Run) -> None:
    trees = {"this tree": kernel_count.HERE}
    if r.args.baseline:
        trees = {r.args.baseline: loop_compare.extract(r.args.baseline, r.work / "kernel-count-base"), **trees}
    r.results["kernel_count"] = kernel_count.run(trees)
    r.section("aten ops per training step of each role" + (f", vs revision {r.args.baseline}" if r.args.baseline
                                                           else ""), kernel_count.markdown(r.results["kernel_count"]))


def bench_ddp(r: Run) -> None:
    r.results["ddp"] = ddp.run(r.work / "ddp", r.cache)
    r.section("DDP and memory", ddp.markdown(r.results["ddp"]))


# Every benchmark, in the order a full run makes them (and BENCHMARKS.md lists them).
BENCHMARKS: dict[str, Callable[[Run], None]] = {
    "loader": bench_loader, "train_step": bench_train_step, "tensor_step": bench_tensor_step,
    "compute_limit": bench_compute_limit, "loop_compare": bench_loop_compare, "kd_epoch": bench_kd_epoch,
    "ensemble": bench_ensemble, "kd_accuracy": bench_kd_accuracy, "memory": bench_memory,
    "pipeline": bench_pipeline, "source_scan": bench_source_scan, "kernel_count": bench_kernel_count,
    "ddp": bench_ddp,
}
ALL = tuple(BENCHMARKS)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--only", nargs="*", default=list(ALL), choices=ALL)
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--cache-dir", default="", help="data cache (default: a temp dir, so data is prepared anew)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="train_step: the batch of the step variants")
    p.add_argument("--baseline", default="",
                   help="loop_compare, kernel_count: the git revision this tree's training loop (its step's op "
                        "counts) is timed (counted) against")
    p.add_argument("--limit-preset", default="",
                   help="compute_limit: the preset whose stages are timed (default: seed-gpu on a GPU, quick on a CPU)")
    p.add_argument("--out", default="",
                   help="where results.md/json go (default: benchmarks/ for a full run, benchmarks/partial/ "
                        "for a part of one)")
    return p.parse_args(argv)


def out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return HERE if set(args.only) == set(ALL) else HERE / "partial"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        work = Path(tmp)
        r = Run(args, work, Path(args.cache_dir) if args.cache_dir else work / "cache")
        for name, bench in BENCHMARKS.items():
            if name in args.only:
                bench(r)
            if name == "compute_limit":
                step_table(r)
    text = "\n".join(r.md)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(r.results, indent=1) + "\n")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
