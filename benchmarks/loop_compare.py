"""The training loop against a baseline revision's, side by side on this machine.

    python -m benchmarks --only loop_compare --baseline REV

Extracts REV with `git archive` into a temp dir and runs the same short pipeline (teacher,
logits cache, both students; 3 epochs each) with the baseline's code and with this tree's,
alternately, `repeats` times, each code base preparing its own copy of the data once. Per
stage it compares the median epoch time of the epochs after the first (the first pays
FFCV's JIT compile). Both run as plain `python -m kd_ddp` processes with the same threads.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from kd_ddp import stages
from kd_ddp.metrics_io import read_metrics

REPO = Path(__file__).resolve().parents[1]
STAGES = tuple(s.name for s in stages.TRAINED)  # the run-dir entries, the same in the baseline's tree


def extract(rev: str, dest: Path) -> Path:
    """The source tree of `rev` (a commit, tag or branch of this repository) under dest."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return dest


def _pipeline(src: Path, run_dir: Path, cache: Path, preset: str, archive: str, epochs: int) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "kd_ddp", "pipeline", "--preset", preset, f"run.dir={run_dir}",
           f"data.cache_dir={cache}", f"data.root={archive}", f"optim.epochs={epochs}", "kd.views=2",
           "tracking.wandb.mode=disabled", "tracking.progress=false"]
    proc = subprocess.run(cmd, cwd=src, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{src}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    out = {}
    for stage in STAGES:
        out[stage] = [r["epoch_time_s"] for r in read_metrics(run_dir / stage / "metrics.jsonl")[1:]]
    return out


def run(baseline: str, archive: str, work: Path, preset: str = "quick", epochs: int = 3,
        repeats: int = 2) -> dict[str, Any]:
    archive = str(Path(archive).resolve())  # each tree runs in its own directory
    trees = {"baseline": extract(baseline, work / "baseline-src"), "current": REPO}
    samples: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STAGES} for name in trees}
    for i in range(repeats):  # alternated, so drift in machine load hits both alike
        for name, src in trees.items():
            times = _pipeline(src, work / f"{name}-{i}", work / f"cache-{name}", preset, archive, epochs)
            for stage, t in times.items():
                samples[name][stage] += t
    rows = []
    for stage in STAGES:
        base, cur = (statistics.median(samples[n][stage]) for n in ("baseline", "current"))
        rows.append({"stage": stage, "baseline_s": base, "current_s": cur, "current_over_baseline": cur / base})
    return {"baseline": baseline, "preset": preset, "epochs": epochs, "repeats": repeats, "rows": rows,
            "samples": samples}


def markdown(result: dict[str, Any]) -> str:
    out = [f"| stage ({result['preset']} preset, {result['epochs']} epochs x {result['repeats']} runs) | epoch, "
           f"baseline {result['baseline']} (s) | epoch, this tree (s) | this / baseline |", "|---|---|---|---|"]
    out += [f"| {r['stage']} | {r['baseline_s']:.2f} | {r['current_s']:.2f} | {r['current_over_baseline']:.3f} |"
            for r in result["rows"]]
    return "\n".join(out)
