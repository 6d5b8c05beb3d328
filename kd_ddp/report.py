"""The local comparison report, built from the run dirs alone (no W&B account needed).

Writes `<run_dir>/report/results.json`, `report.md` and PNG plots: test accuracy and
train loss per epoch of the three runs, and the final test accuracies as bars. report.md
names each run's model with its parameters and multiply-adds per image (from the summaries).

Two optional layouts under the run dir are picked up when present:

- Seeds: `<run_dir>/seeds/<name>/{teacher,student-normal,student-kd}/` (each a run dir
  of its own, e.g. `run.dir=<run_dir>/seeds/1 seed=1`). Every finished stage of the
  run dir itself and of each seed dir is one sample; with >= 2 samples of a stage the
  report adds mean +- std (sample std) and n. The per-epoch curves are those of the run
  dir itself, or of the first seed dir when the run dir has none.
- KD sweep: `<run_dir>/sweep/<name>/student-kd/summary.json`, whose `kd` holds the
  `alpha` and `temperature` it was trained with. With >= 2 distinct (alpha, T) settings
  the report adds a sweep table and an alpha x temperature heat map of the final test
  accuracy (`kd_sweep.png`; repeated settings are averaged), with the run dir's own KD
  student's (alpha, T) outlined (the config's when it has none).
- Variants: `<run_dir>/variants/<name>/student-kd/summary.json`, KD students trained another
  way with the same teacher (e.g. `kd.teacher=live`), listed in a table of their own.

What a run was trained with is read from its summary.json, not from the config the report
is built with: the header's KD settings (alpha, T, cached or live teacher, views, cache
dtype, precision), the sweep's and the variants'. Older summaries that lack a key leave it
out of the text.

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
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kd_ddp import stages, tracking  # noqa: E402
from kd_ddp.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from kd_ddp.config import Config  # noqa: E402
from kd_ddp.metrics_io import read_metrics  # noqa: E402

log = logging.getLogger(__name__)

RUNS = {s.key: s.name for s in stages.TRAINED}  # result key -> run-dir entry
SEEDS_DIR, SWEEP_DIR, VARIANTS_DIR = "seeds", "sweep", "variants"
LABELS = {s.key: s.label for s in stages.TRAINED}
KD, NORMAL = stages.STUDENT_KD.key, stages.STUDENT_NORMAL.key


def _read_run(d: Path) -> dict[str, Any] | None:
    summary = d / "summary.json"
    if not summary.is_file():
        return None
    metrics = read_metrics(d / "metrics.jsonl")
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


def plot_bars(accs: dict[str, float], path: Path, errors: dict[str, float] | None = None, n: int = 1) -> None:
    """Final test accuracy per run; with `errors` (std over n seeds) the bars are means with error bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(accs)
    yerr = [errors[k] for k in keys] if errors else None
    bars = ax.bar([LABELS[k] for k in keys], [accs[k] for k in keys], yerr=yerr, capsize=6,
                  color=["#4c72b0", "#dd8452", "#55a868"])
    for b, k in zip(bars, keys):
        text = f"{accs[k]:.3f}" + (f" ± {errors[k]:.3f}" if errors else "")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() / 2, text, ha="center", va="center", color="white")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Final test accuracy, mean ± std over {n} seeds" if errors else "Final test accuracy")
    _save_fig(fig, path)


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (needs >= 2 values), count and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values), "values": values}


def collect_seeds(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Mean +- std of the final test accuracy per run, over the run dir and its seed dirs,
    with the mean training time of each run and the KD-minus-normal gap of each seed dir."""
    dirs = [run_dir, *sorted(d for d in (run_dir / SEEDS_DIR).glob("*") if d.is_dir())]
    samples: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    gaps: list[float] = []
    for d in dirs:
        runs = collect(d)
        for key, r in runs.items():
            samples.setdefault(key, []).append(r["summary"]["test_acc"])
            times.setdefault(key, []).append(r["summary"]["train_time_s"])
        if KD in runs and NORMAL in runs:
            gaps.append(runs[KD]["summary"]["test_acc"] - runs[NORMAL]["summary"]["test_acc"])
    stats = {k: mean_std(v) | {"train_time_s": statistics.fmean(times[k])} for k, v in samples.items() if len(v) >= 2}
    if len(gaps) >= 2:
        stats["kd_minus_normal"] = mean_std(gaps)
    return stats


def _kd_summaries(d: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, summary) of every finished KD student under `d/<name>/`, in name order."""
    return [(path.parents[1].name, json.loads(path.read_text()))
            for path in sorted(d.glob(f"*/{stages.STUDENT_KD.name}/summary.json"))]


def collect_variants(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per finished KD student under `<run_dir>/variants/`, in name order."""
    return [{"name": name, **(s.get("kd") or {}), "test_acc": s["test_acc"], "test_loss": s["test_loss"],
             "epochs": s["epochs"], "train_time_s": s["train_time_s"]}
            for name, s in _kd_summaries(run_dir / VARIANTS_DIR)]


def collect_sweep(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per finished KD student under `<run_dir>/sweep/`, in name order."""
    entries = []
    for name, s in _kd_summaries(run_dir / SWEEP_DIR):
        kd = s.get("kd") or {}
        if "alpha" in kd and "temperature" in kd:
            entries.append({"name": name, "alpha": kd["alpha"], "temperature": kd["temperature"],
                            "test_acc": s["test_acc"], "test_loss": s["test_loss"]})
    return entries


def plot_sweep(entries: list[dict[str, Any]], path: Path, default: tuple[float, float] | None = None) -> None:
    """alpha x temperature heat map of the final KD test accuracy; blank where not run; the
    `default` (alpha, T) cell outlined."""
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
    if default is not None and default[0] in alphas and default[1] in temps:
        i, j = alphas.index(default[0]), temps.index(default[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.plot([], [], color="red", linewidth=2.5, label=f"default (alpha={default[0]:g}, T={default[1]:g})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
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
        lines += ["", "Across seeds (final test accuracy):", "",
                  "| run | mean +- std | n | train time (s), mean |", "|---|---|---|---|"]
        for key in RUNS:
            if key in results["seeds"]:
                st = results["seeds"][key]
                lines.append(f"| {LABELS[key]} | {st['mean']:.4f} +- {st['std']:.4f} | {st['n']} | "
                             f"{st['train_time_s']:.0f} |")
        if "kd_minus_normal" in results["seeds"]:
            st = results["seeds"]["kd_minus_normal"]
            lines.append(f"| KD minus normal student | {st['mean']:+.4f} +- {st['std']:.4f} | {st['n']} | |")
    return lines


def model_table(results: dict[str, Any]) -> list[str]:
    """Each run's model, its parameters and multiply-adds per image (from its summary; runs
    made before summaries recorded them are left out)."""
    rows = []
    for key in RUNS:
        m = results.get(key, {}).get("model")
        if m:
            adopted = " (adopted, not trained here)" if "adopted_from" in results[key] else ""
            rows.append(f"| {LABELS[key]} | {m['name']}{adopted} | {m['params'] / 1e6:.2f} M | "
                        f"{m['macs_per_image'] / 1e6:.1f} M |")
    return ["| run | model | parameters | multiply-adds per image |", "|---|---|---|---|", *rows] if rows else []


def variants_table(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | teacher logits | alpha | T | epochs | test accuracy | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {e.get('teacher', '?')} | {e.get('alpha', float('nan')):g} | "
                     f"{e.get('temperature', float('nan')):g} | {e['epochs']} | {e['test_acc']:.4f} | "
                     f"{e['train_time_s']:.0f} |")
    return lines


def sweep_table(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["| sweep run | alpha | T | test accuracy | test loss |", "|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: -e["test_acc"]):
        lines.append(f"| {e['name']} | {e['alpha']:g} | {e['temperature']:g} | {e['test_acc']:.4f} | "
                     f"{e['test_loss']:.4f} |")
    return lines


def kd_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """How a KD student was trained, from its summary.json: alpha, temperature, teacher
    (cached | live), views, cache_dtype and amp (its precision); what an older summary does
    not record is left out."""
    kd = summary.get("kd") or {}
    facts = {k: kd[k] for k in ("alpha", "temperature", "teacher", "views", "cache_dtype") if k in kd}
    return facts | ({"amp": summary["amp"]} if "amp" in summary else {})


def precision(amp: str) -> str:
    """A summary's `amp` ("off", "bfloat16", "float16") in words."""
    return "fp32" if amp == "off" else f"{amp} autocast"


def kd_sentence(kd: dict[str, Any]) -> str:
    """`alpha=0.5, T=4.0, teacher logits cached (8 views, float16), precision fp32`, from what
    `kd_facts` found."""
    parts = [f"{name}={kd[key]}" for key, name in (("alpha", "alpha"), ("temperature", "T")) if key in kd]
    if "teacher" in kd:
        cache = [f"{kd['views']} views" if "views" in kd else "", kd.get("cache_dtype", "")]
        detail = ", ".join(c for c in cache if c) if kd["teacher"] == "cached" else ""
        parts.append(f"teacher logits {kd['teacher']}" + (f" ({detail})" if detail else ""))
    if "amp" in kd:
        parts.append(f"precision {precision(kd['amp'])}")
    return ", ".join(parts)


def _header(cfg: Config, results: dict[str, Any]) -> list[str]:
    """Title and the line saying how the runs were made: the KD student's settings come from
    its summary, so a report rebuilt under another config still says what was trained."""
    data = Path(cfg.data.root).name if cfg.data.root else f"{cfg.data.source} data"
    line = f"Preset `{cfg.preset}`, seed {cfg.seed}."
    kd = results.get(KD, {}).get("kd")
    if kd:
        line += f" KD student: {kd_sentence(kd)}."
    return [f"# Knowledge distillation on {data}: teacher vs students", "", line, ""]


def _results(cfg: Config, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key, r in runs.items():
        s = r["summary"]
        results[key] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"], "epochs": s["epochs"],
                        "train_time_s": s["train_time_s"], "images_per_s": s["images_per_s"]}
        results[key] |= {k: s[k] for k in ("model", "adopted_from") if k in s}
    if KD in results and NORMAL in results:
        results["kd_minus_normal"] = results[KD]["test_acc"] - results[NORMAL]["test_acc"]
    kd = kd_facts(runs[KD]["summary"]) if KD in runs else {}
    if kd:
        results[KD]["kd"] = kd
    # alpha, T and the teacher as the KD student was trained; the config's only without one
    results["config"] = {"preset": cfg.preset, "seed": cfg.seed, "alpha": kd.get("alpha", cfg.kd.alpha),
                         "temperature": kd.get("temperature", cfg.kd.temperature),
                         "kd_teacher": kd.get("teacher", cfg.kd.teacher)}
    cache_manifest = cfg.run_dir / stages.CACHE.name / "manifest.json"
    if cache_manifest.is_file():
        m = json.loads(cache_manifest.read_text())
        results["teacher_logits_cache"] = {"size_bytes": m["size_bytes"], "build_time_s": m["build_time_s"],
                                           "shape": m["shape"]}
    return results


def _plots(runs: dict[str, dict[str, Any]], results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the PNGs; {name: path} of those written, in report order. The heat map outlines
    the run dir's own KD student's (alpha, T) (the config's when it has none)."""
    written: dict[str, Path] = {}
    if runs:
        for metric, ylabel in (("test_acc", "test accuracy"), ("train_loss", "train loss")):
            plot_curves(runs, metric, ylabel, out / f"{metric}.png")
            written[metric] = out / f"{metric}.png"
        seeds = results.get("seeds", {})
        if all(k in seeds for k in runs):
            plot_bars({k: seeds[k]["mean"] for k in runs}, out / "final_accuracy.png",
                      errors={k: seeds[k]["std"] for k in runs}, n=min(seeds[k]["n"] for k in runs))
        else:
            plot_bars({k: v["test_acc"] for k, v in results.items() if k in RUNS}, out / "final_accuracy.png")
        written["final_accuracy"] = out / "final_accuracy.png"
    sweep = results.get("sweep", [])
    if len({(e["alpha"], e["temperature"]) for e in sweep}) >= 2:
        plot_sweep(sweep, out / "kd_sweep.png", default=(results["config"]["alpha"], results["config"]["temperature"]))
        written["kd_sweep"] = out / "kd_sweep.png"
    return written


def build_report(cfg: Config) -> dict[str, Any]:
    run_dir = cfg.run_dir
    out = run_dir / stages.REPORT.name
    runs = collect(run_dir)
    for d in sorted(d for d in (run_dir / SEEDS_DIR).glob("*") if d.is_dir()):
        if runs:
            break
        runs = collect(d)  # no runs of its own: the curves of the first seed that has any
    results = _results(cfg, runs)
    results["seeds"] = collect_seeds(run_dir)
    results["sweep"] = collect_sweep(run_dir)
    results["variants"] = collect_variants(run_dir)
    results["machines"] = sorted({r["summary"]["machine"] for r in runs.values() if r["summary"].get("machine")})
    if not runs and not results["sweep"]:
        raise FileNotFoundError(f"no finished runs under {run_dir}: train them first")

    out.mkdir(parents=True, exist_ok=True)
    images = _plots(runs, results, out)
    lines = _header(cfg, results) + accuracy_table(results) + [""]
    if model_table(results):
        lines += [*model_table(results), ""]
    if results["machines"]:
        lines += [f"Machine: {'; '.join(results['machines'])}.", ""]
    cache = results.get("teacher_logits_cache")
    if cache:
        lines += [f"Teacher-logits cache: {' x '.join(map(str, cache['shape']))} (views x samples x classes), "
                  f"{cache['size_bytes'] / 1e6:.1f} MB, built in {cache['build_time_s']:.0f} s.", ""]
    if results["variants"]:
        lines += ["## KD variants (same teacher)", ""] + variants_table(results["variants"]) + [""]
    if results["sweep"]:
        lines += ["## KD sweep", ""] + sweep_table(results["sweep"]) + [""]
    lines += [f"![{name.replace('_', ' ')}]({path.name})\n" for name, path in images.items()]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    atomic_write_json(out / "results.json", results)
    log.info("report written to %s", out)
    tracking.log_report(cfg, results, images)
    return results
