"""The local comparison report, built from the run dirs alone (no W&B account needed).

Writes `<run_dir>/report/results.json`, `report.md` and PNG plots: test accuracy and
train loss per epoch of the three runs, and the final test accuracies as bars.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from kd_ddp.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from kd_ddp.config import Config  # noqa: E402

log = logging.getLogger(__name__)

RUNS = {"teacher": "teacher", "student_normal": "student-normal", "student_kd": "student-kd"}
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


def build_report(cfg: Config) -> dict[str, Any]:
    run_dir = cfg.run_dir
    out = run_dir / "report"
    runs = collect(run_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {run_dir}: train them first")
    results: dict[str, Any] = {}
    for key, r in runs.items():
        s = r["summary"]
        results[key] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"], "epochs": s["epochs"],
                        "train_time_s": s["train_time_s"], "images_per_s": s["images_per_s"]}
    if "student_kd" in results and "student_normal" in results:
        results["kd_minus_normal"] = results["student_kd"]["test_acc"] - results["student_normal"]["test_acc"]
    results["config"] = {"preset": cfg.preset, "seed": cfg.seed, "alpha": cfg.kd.alpha,
                         "temperature": cfg.kd.temperature, "kd_teacher": cfg.kd.teacher}
    cache_manifest = run_dir / "teacher-logits" / "manifest.json"
    if cache_manifest.is_file():
        m = json.loads(cache_manifest.read_text())
        results["teacher_logits_cache"] = {"size_bytes": m["size_bytes"], "build_time_s": m["build_time_s"],
                                           "shape": m["shape"]}

    out.mkdir(parents=True, exist_ok=True)
    plots = {"test_acc.png": ("test_acc", "test accuracy"), "train_loss.png": ("train_loss", "train loss")}
    for name, (metric, ylabel) in plots.items():
        plot_curves(runs, metric, ylabel, out / name)
    plot_bars({k: v["test_acc"] for k, v in results.items() if k in RUNS}, out / "final_accuracy.png")

    lines = [f"# Knowledge distillation on {cfg.data.source} data: comparison", "",
             f"Preset `{cfg.preset}`, seed {cfg.seed}, KD alpha={cfg.kd.alpha}, T={cfg.kd.temperature}, "
             f"teacher logits {cfg.kd.teacher}.", "",
             "| run | test accuracy | test loss | epochs | train time (s) | images/s |",
             "|---|---|---|---|---|---|"]
    for key in RUNS:
        if key in results:
            r = results[key]
            lines.append(f"| {LABELS[key]} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | {r['epochs']} | "
                         f"{r['train_time_s']:.1f} | {r['images_per_s']:.0f} |")
    if "kd_minus_normal" in results:
        lines += ["", f"KD minus normal student: {results['kd_minus_normal']:+.4f}"]
    lines += ["", "![test accuracy](test_acc.png)", "", "![train loss](train_loss.png)", "",
              "![final accuracy](final_accuracy.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    atomic_write_json(out / "results.json", results)
    log.info("report written to %s", out)
    return results
