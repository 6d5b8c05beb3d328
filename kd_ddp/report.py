"""The local comparison report, built from the run dirs alone (no W&B account needed).

Writes `<run_dir>/report/results.json`, `report.md` and PNG plots: test accuracy and
train loss per epoch of the three runs, and the final test accuracies as bars.

Two optional layouts under the run dir are picked up when present:

- Seeds: `<run_dir>/seeds/<name>/{teacher,student-normal,student-kd}/` (each a run dir
  of its own, e.g. `run.dir=<run_dir>/seeds/1 seed=1`). Every finished stage of the
  run dir itself and of each seed dir is one sample; with >= 2 samples of a stage the
  report adds mean +- std (sample std) and n. The per-epoch curves are those of the run
  dir itself, or of the first seed dir when the run dir has none.
- KD sweep: `<run_dir>/sweep/<name>/student-kd/summary.json`, whose `kd` holds the
  `alpha` and `temperature` it was trained with. With >= 2 distinct (alpha, T) settings
  the report adds a sweep table and an alpha x temperature heat map of the final test
  accuracy (`kd_sweep.png`; repeated settings are averaged).

Members of both layouts share the run dir's W&B group (kd_ddp/tracking.py). When W&B
tracking is on, the PNGs are also logged to a `report` run of that group.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kd_ddp import tracking  # noqa: E402
from kd_ddp.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from kd_ddp.config import Config  # noqa: E402

log = logging.getLogger(__name__)

RUNS = {"teacher": "teacher", "student_normal": "student-normal", "student_kd": "student-kd"}
SEEDS_DIR, SWEEP_DIR = "seeds", "sweep"
LABELS = {"teacher": "Teacher (CE)", "student_normal": "Student (MSE, normal)", "student_kd": "Student (KD)"}


def _read_run(d: Path) -> dict[str, Any] | None:
    summary = d / "summary.json"
    if not summary.is_file():
        return None
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": json.loads(summary.read_text()), "metrics": metrics}


def collect(run_dir: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for key, sub in RUNS.items():
        r = _read_run(run_dir / sub)
        if r is not None:
            runs[key] = r
    return runs


def _save_fig(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(runs: dict[str, dict[str, Any]], metric: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in runs.items():
        ax.plot([m["epoch"] for m in r["metrics"]], [m[metric] for m in r["metrics"]],
                marker="o", label=LABELS[key])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_fig(fig, path)


def plot_bars(accs: dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(accs)
    bars = ax.bar([LABELS[k] for k in keys], [accs[k] for k in keys], color=["#4c72b0", "#dd8452", "#55a868"])
    for b, k in zip(bars, keys):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{accs[k]:.3f}", ha="center", va="bottom")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Final test accuracy")
    _save_fig(fig, path)


def collect_seeds(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Mean +- std of the final test accuracy per run, over the run dir and its seed dirs."""
    dirs = [run_dir, *sorted(d for d in (run_dir / SEEDS_DIR).glob("*") if d.is_dir())]
    samples: dict[str, list[float]] = {}
    for d in dirs:
        for key, r in collect(d).items():
            samples.setdefault(key, []).append(r["summary"]["test_acc"])
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "n": len(v), "values": v}
            for k, v in samples.items() if len(v) >= 2}


def collect_sweep(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per finished KD student under `<run_dir>/sweep/`, in name order."""
    entries = []
    for path in sorted((run_dir / SWEEP_DIR).glob("*/student-kd/summary.json")):
        s = json.loads(path.read_text())
        kd = s.get("kd") or {}
        if "alpha" in kd and "temperature" in kd:
            entries.append({"name": path.parents[1].name, "alpha": kd["alpha"], "temperature": kd["temperature"],
                            "test_acc": s["test_acc"], "test_loss": s["test_loss"]})
    return entries


def plot_sweep(entries: list[dict[str, Any]], path: Path) -> None:
    """alpha x temperature heat map of the final KD test accuracy; blank where not run."""
    alphas = sorted({e["alpha"] for e in entries})
    temps = sorted({e["temperature"] for e in entries})
    cells: dict[tuple[float, float], list[float]] = {}
    for e in entries:
        cells.setdefault((e["alpha"], e["temperature"]), []).append(e["test_acc"])
    grid = np.full((len(alphas), len(temps)), np.nan)
    for (a, t), accs in cells.items():
        grid[alphas.index(a), temps.index(t)] = statistics.fmean(accs)
    fig, ax = plt.subplots(figsize=(1.2 * len(temps) + 3, 0.8 * len(alphas) + 2))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            # dark text on the bright end of viridis, white on the dark end
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9,
                    color="black" if im.norm(v) > 0.6 else "white")
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha (weight of hard-label CE)")
    ax.set_title("KD student: final test accuracy")
    fig.colorbar(im, ax=ax, label="test accuracy")
    _save_fig(fig, path)


def accuracy_table(results: dict[str, Any]) -> list[str]:
    """The markdown accuracy table (report.md and the W&B report share it)."""
    lines = ["| run | test accuracy | test loss | epochs | train time (s) | images/s |",
             "|---|---|---|---|---|---|"]
    for key in RUNS:
        if key in results:
            r = results[key]
            lines.append(f"| {LABELS[key]} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | {r['epochs']} | "
                         f"{r['train_time_s']:.1f} | {r['images_per_s']:.0f} |")
    if "kd_minus_normal" in results:
        lines += ["", f"KD minus normal student: {results['kd_minus_normal']:+.4f}"]
    if results.get("seeds"):
        lines += ["", "Across seeds (final test accuracy):", "", "| run | mean +- std | n |", "|---|---|---|"]
        for key in RUNS:
            if key in results["seeds"]:
                st = results["seeds"][key]
                lines.append(f"| {LABELS[key]} | {st['mean']:.4f} +- {st['std']:.4f} | {st['n']} |")
    return lines


def sweep_table(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["| sweep run | alpha | T | test accuracy | test loss |", "|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: -e["test_acc"]):
        lines.append(f"| {e['name']} | {e['alpha']:g} | {e['temperature']:g} | {e['test_acc']:.4f} | "
                     f"{e['test_loss']:.4f} |")
    return lines


def _results(cfg: Config, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key, r in runs.items():
        s = r["summary"]
        results[key] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"], "epochs": s["epochs"],
                        "train_time_s": s["train_time_s"], "images_per_s": s["images_per_s"]}
    if "student_kd" in results and "student_normal" in results:
        results["kd_minus_normal"] = results["student_kd"]["test_acc"] - results["student_normal"]["test_acc"]
    results["config"] = {"preset": cfg.preset, "seed": cfg.seed, "alpha": cfg.kd.alpha,
                         "temperature": cfg.kd.temperature, "kd_teacher": cfg.kd.teacher}
    cache_manifest = cfg.run_dir / "teacher-logits" / "manifest.json"
    if cache_manifest.is_file():
        m = json.loads(cache_manifest.read_text())
        results["teacher_logits_cache"] = {"size_bytes": m["size_bytes"], "build_time_s": m["build_time_s"],
                                           "shape": m["shape"]}
    return results


def _plots(runs: dict[str, dict[str, Any]], results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the PNGs; {name: path} of those written, in report order."""
    written: dict[str, Path] = {}
    if runs:
        for metric, ylabel in (("test_acc", "test accuracy"), ("train_loss", "train loss")):
            plot_curves(runs, metric, ylabel, out / f"{metric}.png")
            written[metric] = out / f"{metric}.png"
        plot_bars({k: v["test_acc"] for k, v in results.items() if k in RUNS}, out / "final_accuracy.png")
        written["final_accuracy"] = out / "final_accuracy.png"
    sweep = results.get("sweep", [])
    if len({(e["alpha"], e["temperature"]) for e in sweep}) >= 2:
        plot_sweep(sweep, out / "kd_sweep.png")
        written["kd_sweep"] = out / "kd_sweep.png"
    return written


def build_report(cfg: Config) -> dict[str, Any]:
    run_dir = cfg.run_dir
    out = run_dir / "report"
    runs = collect(run_dir)
    for d in sorted(d for d in (run_dir / SEEDS_DIR).glob("*") if d.is_dir()):
        if runs:
            break
        runs = collect(d)  # no runs of its own: the curves of the first seed that has any
    results = _results(cfg, runs)
    results["seeds"] = collect_seeds(run_dir)
    results["sweep"] = collect_sweep(run_dir)
    if not runs and not results["sweep"]:
        raise FileNotFoundError(f"no finished runs under {run_dir}: train them first")

    out.mkdir(parents=True, exist_ok=True)
    images = _plots(runs, results, out)
    lines = [f"# Knowledge distillation on {cfg.data.source} data: comparison", "",
             f"Preset `{cfg.preset}`, seed {cfg.seed}, KD alpha={cfg.kd.alpha}, T={cfg.kd.temperature}, "
             f"teacher logits {cfg.kd.teacher}.", ""]
    lines += accuracy_table(results) + [""]
    if results["sweep"]:
        lines += ["## KD sweep", ""] + sweep_table(results["sweep"]) + [""]
    lines += [f"![{name.replace('_', ' ')}]({path.name})\n" for name, path in images.items()]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    atomic_write_json(out / "results.json", results)
    log.info("report written to %s", out)
    tracking.log_report(cfg, results, images)
    return results
