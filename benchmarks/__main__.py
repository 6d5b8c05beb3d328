"""`python -m benchmarks [--only NAME ...] [--quick-sizes]`: side-by-side speed measurements.

Prints a Markdown table per benchmark and writes benchmarks/results.json and
benchmarks/results.md (paste into BENCHMARKS.md). Every figure is a ratio of runs made in
this one process, interleaved, after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from benchmarks import kd_epoch


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
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--only", nargs="*", default=["kd_epoch"], choices=["kd_epoch"])
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    out_dir = Path(__file__).parent
    results: dict = {"machine": machine(), "date": datetime.date.today().isoformat()}
    md = [f"Machine: {results['machine']}; date {results['date']}.", ""]
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        if "kd_epoch" in args.only:
            rows = []
            for teacher in (["model.teacher=teacher_cnn_lite", "model.teacher_width=32"],
                            ["model.teacher=teacher_cnn", "model.teacher_width=64"]):
                rows.append(kd_epoch.run("quick", [f"data.root={args.data_root}", *teacher],
                                         Path(tmp) / teacher[0].split("=")[1], repeats=args.repeats))
            results["kd_epoch"] = rows
            md += ["### KD student epoch (quick preset sizes)", "", kd_epoch.markdown(rows), ""]
    text = "\n".join(md)
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
