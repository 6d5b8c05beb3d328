"""What knowing that a directory source is unchanged costs: `kd_ddp.data.scan_source` on
CIFAR-10 as an ImageFolder (60,000 files), beside the floor of one os.stat per file.

    python -m benchmarks.source_scan [--archive A | --folder F] [--repeats 5]

Rank 0 reads this listing once per run, under the data lock, before it decides whether
the prepared data can be reused; the figure is per 10,000 files, warm (the file system's
metadata cached, as on a second run) and first (right after extraction, or after
`echo 3 > /proc/sys/vm/drop_caches` when run as root).
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from kd_ddp.data import scan_source


def _stat_floor(root: Path) -> float:
    start = time.perf_counter()
    for folder, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(folder, name))
    return time.perf_counter() - start


def _drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def measure(folder: Path, repeats: int = 5) -> dict[str, Any]:
    os.sync()
    cold = _drop_caches()
    start = time.perf_counter()
    listing = scan_source(folder)
    first = time.perf_counter() - start
    warm, floor = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        start = time.perf_counter()
        scan_source(folder)
        warm.append(time.perf_counter() - start)
        floor.append(_stat_floor(folder))
    per_10k = 1e4 / listing.files
    return {"files": listing.files, "first_s": round(first, 3), "first_after_drop_caches": cold,
            "warm_s": round(min(warm), 3), "stat_floor_s": round(min(floor), 3),
            "warm_per_10k_s": round(min(warm) * per_10k, 4), "first_per_10k_s": round(first * per_10k, 4)}


def run(archive: str, folder: str = "", repeats: int = 5) -> dict[str, Any]:
    if folder:
        return measure(Path(folder), repeats)
    with tempfile.TemporaryDirectory(prefix="kd-scan-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return measure(Path(tmp), repeats)


def markdown(r: dict[str, Any]) -> str:
    first = "first (after drop_caches)" if r["first_after_drop_caches"] else "first (after extraction)"
    return "\n".join([
        "| files | warm scan | per 10,000 files | os.stat floor | " + first + " | per 10,000 files |",
        "|---|---|---|---|---|---|",
        f"| {r['files']} | {r['warm_s']} s | {r['warm_per_10k_s']} s | {r['stat_floor_s']} s | {r['first_s']} s "
        f"| {r['first_per_10k_s']} s |"])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.source_scan")
    p.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--folder", default="", help="an extracted ImageFolder (default: extract --archive)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    r = run(a.archive, a.folder, a.repeats)
    print(markdown(r))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
