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
import tempfile
from pathlib import Path

import torch

from benchmarks import ddp, kd_epoch, loader, train_step

ALL = ("loader", "train_step", "compute_limit", "kd_epoch", "ddp")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--only", nargs="*", default=list(ALL), choices=ALL)
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--cache-dir", default="", help="data cache (default: a temp dir, so data is prepared anew)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    out_dir = Path(__file__).parent
    results: dict = {"machine": machine(), "date": datetime.date.today().isoformat()}
    md = [f"Machine: {results['machine']}. Date: {results['date']}.", ""]
    # The quick preset's teacher. The seed preset's teacher_cnn w64 trains at ~45 img/s on a
    # 2-core AVX2 CPU (one epoch: ~20 min), too slow to benchmark here; pass it on a GPU.
    teachers = [["model.teacher=teacher_cnn_lite", "model.teacher_width=32"]]
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
            steps = results["train_step"] = train_step.run_steps(teachers, steps=5, repeats=args.repeats)
        if "compute_limit" in args.only:
            limit = results["compute_limit"] = train_step.run_compute_limit(args.data_root, cache, work / "limit")
        if steps or limit:
            md += ["### Teacher training step (batch 256)", "", train_step.markdown(steps or [], limit), ""]
        if "kd_epoch" in args.only:
            rows = [kd_epoch.run("quick", [f"data.root={args.data_root}", f"data.cache_dir={cache}", *t],
                                 work / t[0].split("=")[1], repeats=args.repeats) for t in teachers]
            results["kd_epoch"] = rows
            md += ["### KD student epoch (quick preset sizes: 50,000 images, batch 256)", "",
                   kd_epoch.markdown(rows), ""]
        if "ddp" in args.only:
            results["ddp"] = ddp.run(work / "ddp", cache)
            md += ["### DDP and memory", "", ddp.markdown(results["ddp"]), ""]
    text = "\n".join(md)
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
