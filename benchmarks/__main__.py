"""`python -m benchmarks [--only NAME ...]`: side-by-side speed measurements (`make bench`).

Prints a Markdown table per benchmark and writes benchmarks/results.json and
benchmarks/results.md (the source of BENCHMARKS.md). Every figure is a ratio of runs made
in this one invocation, interleaved where possible, after warm-up. Run it on a quiet
machine: with other processes on the cores, OpenMP threads spin-wait on each other and
small tensor ops get 10x slower, which distorts every ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
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

ALL = ("loader", "train_step", "tensor_step", "compute_limit", "loop_compare", "kd_epoch", "ensemble", "kd_accuracy",
       "ddp", "memory", "pipeline", "source_scan", "kernel_count")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main() -> None:
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
    p.add_argument("--out", default=str(Path(__file__).parent), help="where results.md/json go")
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "date": datetime.date.today().isoformat()}
    md = [f"Machine: {results['machine']}. Date: {results['date']}.", ""]
    # The quick and seed presets' teachers; on a GPU also the wider w64 (too slow for a CPU run).
    teachers = [["model.teacher=teacher_cnn_lite", "model.teacher_width=32"],
                ["model.teacher=teacher_cnn", "model.teacher_width=32"]]
    if torch.cuda.is_available():
        teachers.append(["model.teacher=teacher_cnn", "model.teacher_width=64"])
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        work = Path(tmp)
        cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
        if "loader" in args.only:
            results["loader"] = loader.run(args.data_root, cache, repeats=args.repeats + 1)
            md += ["### Data loading (training augmentation, batch 256)", "", loader.markdown(results["loader"]), ""]
        steps = limit = None
        if "train_step" in args.only:
            steps = results["train_step"] = train_step.run_steps(teachers, cache, work / "steps", steps=5,
                                                                 batch=args.batch, repeats=args.repeats)
        if "tensor_step" in args.only:
            results["tensor_step"] = train_step.run_tensor_step(cache, work / "tensor-step", batch=args.batch,
                                                                repeats=args.repeats + 1)
            md += [f"### Training step forms: Python-number LR vs tensor-only (vs CUDA graph on a GPU), batch "
                   f"{args.batch}, {results['tensor_step']['amp']}", "",
                   train_step.tensor_step_markdown(results["tensor_step"]), ""]
        if "compute_limit" in args.only:
            preset = args.limit_preset or ("seed-gpu" if torch.cuda.is_available() else "quick")
            limit = results["compute_limit"] = train_step.run_compute_limit(args.data_root, cache, work / "limit",
                                                                            preset=preset)
        if steps or limit:
            md += [f"### Training step (batch {args.batch}) and each stage's distance to its compute limit", "",
                   train_step.markdown(steps or [], limit), ""]
        if "loop_compare" in args.only and args.baseline:
            results["loop_compare"] = loop_compare.run(args.baseline, args.data_root, work / "loop",
                                                       repeats=args.repeats)
            md += [f"### Training loop vs revision {args.baseline}, side by side", "",
                   loop_compare.markdown(results["loop_compare"]), ""]
        if "kd_epoch" in args.only:
            data = [f"data.root={args.data_root}", f"data.cache_dir={cache}"]
            # The quick preset's teacher and the seed preset's (4x its FLOPs); the seed row
            # caches 2 views to save build time (the epoch costs do not depend on the count).
            rows = [kd_epoch.run("quick", data, work / "kd-quick", repeats=args.repeats),
                    kd_epoch.run("seed", [*data, "kd.views=2"], work / "kd-seed", repeats=args.repeats)]
            results["kd_epoch"] = rows
            md += ["### KD student epoch (50,000 images, batch 256)", "", kd_epoch.markdown(rows), ""]
        if "ensemble" in args.only:  # synthetic data of its own: the cost of N teachers, not of the data
            results["ensemble"] = ensemble.run(work / "ensemble", repeats=args.repeats)
            md += ["### Ensemble distillation: N teachers, cached and live (quick models, synthetic data)", "",
                   ensemble.markdown(results["ensemble"]), ""]
        if "kd_accuracy" in args.only:
            results["kd_accuracy"] = kd_accuracy.run([f"data.root={args.data_root}", f"data.cache_dir={cache}"],
                                                     work / "kd-accuracy")
            md += ["### KD accuracy: cached logits vs live teacher (quick preset, 3 seeds)", "",
                   kd_accuracy.markdown(results["kd_accuracy"]), ""]
        if "memory" in args.only:  # a fresh process: the peak is per process
            proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--json"], check=True,
                                  capture_output=True, text=True)
            results["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
            md += ["### Memory of one process, step by step (synthetic data, smoke teacher)", "",
                   memory.markdown(results["memory"]), ""]
        if "pipeline" in args.only:
            results["pipeline"] = pipeline.run(args.data_root, work / "pipeline")
            md += ["### Whole pipeline vs a plain PyTorch script (quick preset, 1 process)", "",
                   pipeline.markdown(results["pipeline"]), ""]
        if "source_scan" in args.only:
            results["source_scan"] = source_scan.run(args.data_root)
            md += ["### Data identity: reading a directory source's listing (CIFAR-10 as an ImageFolder)", "",
                   source_scan.markdown(results["source_scan"]), ""]
        if "kernel_count" in args.only:
            trees = {"this tree": kernel_count.HERE}
            if args.baseline:
                trees = {args.baseline: loop_compare.extract(args.baseline, work / "kernel-count-base"), **trees}
            results["kernel_count"] = kernel_count.run(trees)
            md += ["### aten ops per training step of each role" + (f", vs revision {args.baseline}" if args.baseline
                                                                    else ""), "",
                   kernel_count.markdown(results["kernel_count"]), ""]
        if "ddp" in args.only:
            results["ddp"] = ddp.run(work / "ddp", cache)
            md += ["### DDP and memory", "", ddp.markdown(results["ddp"]), ""]
    text = "\n".join(md)
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
