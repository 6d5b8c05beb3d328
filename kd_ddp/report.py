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

An ensemble of teachers (`kd.ensemble=N`: `teacher-2/` ... `teacher-N/` beside `teacher/`, and
`student-kd-ensemble/`) adds rows to every table, plot and results.json: each teacher
(`teacher`, `teacher_2`, ...), the ensemble itself (`ensemble`: its own test accuracy, the
mean of the members' probabilities, which the ensemble KD student's summary records) and the
ensemble's KD student (`student_kd_ensemble`), beside the KD student of one teacher and the
normal student. Besides `kd_minus_normal`, the paired gaps `kd_ensemble_minus_kd`,
`kd_ensemble_minus_normal` and `ensemble_minus_teacher` (teacher 1) are computed within each
run dir (and seed dir); with >= 2 seeds, their mean +- std, and each seed's in
`paired_gaps`. A run dir without an ensemble gives the report it gave before ensembles.

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

RUNS = {s.key: s.name for s in stages.TRAINED}  # result key -> run-dir entry (one teacher)
SEEDS_DIR, SWEEP_DIR, VARIANTS_DIR = "seeds", "sweep", "variants"
LABELS = {s.key: s.label for s in stages.TRAINED}
TEACHER, KD, NORMAL = stages.TEACHER.key, stages.STUDENT_KD.key, stages.STUDENT_NORMAL.key
KD_ENSEMBLE = stages.STUDENT_KD_ENSEMBLE.key
ENSEMBLE = "ensemble"  # results key of the ensemble's own accuracy (from its KD student's summary)
ENSEMBLE_LABEL = "Ensemble of teachers"
STUDENT_ORDER = (stages.STUDENT_NORMAL, stages.STUDENT_KD, stages.STUDENT_KD_ENSEMBLE)
# paired gaps, each within one run dir: results key -> (minuend, subtrahend, label)
GAPS = {
    "kd_minus_normal": (KD, NORMAL, "KD minus normal student"),
    "kd_ensemble_minus_kd": (KD_ENSEMBLE, KD, "KD (ensemble) minus KD student"),
    "kd_ensemble_minus_normal": (KD_ENSEMBLE, NORMAL, "KD (ensemble) minus normal student"),
    "ensemble_minus_teacher": (ENSEMBLE, TEACHER, "Ensemble minus teacher 1"),
}
COLORS = {TEACHER: "#4c72b0", NORMAL: "#dd8452", KD: "#55a868", ENSEMBLE: "#8172b3", KD_ENSEMBLE: "#c44e52"}
MEMBER_COLOR = "#64b5cd"  # teachers 2..N


def stage_of(key: str) -> stages.Stage | None:
    """The trained stage whose results key is `key` (teacher_3 included); None for any other key."""
    try:
        stage = stages.get(key.replace("_", stages.MEMBER_SEP))
    except KeyError:
        return None
    return stage if stage.trains and stage.key == key else None


def label(key: str) -> str:
    """A row's name in the tables and plots."""
    return ENSEMBLE_LABEL if key == ENSEMBLE else stage_of(key).label  # type: ignore[union-attr]


def _order(key: str) -> tuple[int, int]:
    """Report order: the teachers by member, the ensemble, then the students."""
    if key == ENSEMBLE:
        return 1, 0
    stage = stage_of(key)
    assert stage is not None
    return (0, stage.member) if stage.member else (2, STUDENT_ORDER.index(stage))


def rows(d: dict[str, Any]) -> list[str]:
    """The keys of `d` (results, or its "seeds") that are rows: the trained stages and the ensemble, in report order."""
    return sorted((k for k in d if k == ENSEMBLE or stage_of(k) is not None), key=_order)


def run_stages(run_dir: Path) -> list[stages.Stage]:
    """The trained stages whose entries `run_dir` may hold, in report order: the three of one
    teacher, and an ensemble's teachers 2..N (those it has) and KD student."""
    members = [stage for stage in (stage_of(d.name.replace(stages.MEMBER_SEP, "_"))
                                   for d in run_dir.glob(f"{stages.TEACHER.name}{stages.MEMBER_SEP}*"))
               if stage is not None and stage.member >= 2]
    return sorted([*stages.TRAINED, *members, stages.STUDENT_KD_ENSEMBLE], key=lambda s: _order(s.key))


def ensemble_of(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The ensemble's facts as its KD student's summary records them (None without one)."""
    return runs[KD_ENSEMBLE]["summary"].get("ensemble") if KD_ENSEMBLE in runs else None


def _read_run(d: Path) -> dict[str, Any] | None:
    summary = d / "summary.json"
    if not summary.is_file():
        return None
    metrics = read_metrics(d / "metrics.jsonl")
    return {"summary": json.loads(summary.read_text()), "metrics": metrics}


def collect(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{results key: {"summary", "metrics"}} of each finished trained stage of `run_dir`, in report order."""
    runs = {}
    for stage in run_stages(run_dir):
        r = _read_run(run_dir / stage.name)
        if r is not None:
            runs[stage.key] = r
    return runs


def _save_fig(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(runs: dict[str, dict[str, Any]], metric: str, ylabel: str, path: Path,
                levels: dict[str, float] | None = None) -> None:
    """`metric` per epoch of each run; `levels` ({key: value}: the ensemble's test accuracy) as
    dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in runs.items():
        ax.plot([m["epoch"] for m in r["metrics"]], [m[metric] for m in r["metrics"]],
                marker="o", label=label(key))
    for key, value in (levels or {}).items():
        ax.axhline(value, linestyle="--", color="black", label=label(key))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_fig(fig, path)


def plot_bars(accs: dict[str, float], path: Path, errors: dict[str, float] | None = None, n: int = 1) -> None:
    """Final test accuracy per run; with `errors` (std over n seeds) the bars are means with error bars."""
    keys = list(accs)
    wide = len(keys) > 3  # an ensemble's rows: room for each label, the values upright in the bars
    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 1, 4.5) if wide else (6, 4))
    yerr = [errors[k] for k in keys] if errors else None
    bars = ax.bar([label(k) for k in keys], [accs[k] for k in keys], yerr=yerr, capsize=6,
                  color=[COLORS.get(k, MEMBER_COLOR) for k in keys])
    for b, k in zip(bars, keys):
        text = f"{accs[k]:.3f}" + (f" ± {errors[k]:.3f}" if errors else "")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() / 2, text, ha="center", va="center", color="white",
                rotation=90 if wide and errors else 0)
    if wide:
        ax.tick_params(axis="x", labelrotation=25)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Final test accuracy, mean ± std over {n} seeds" if errors else "Final test accuracy")
    _save_fig(fig, path)


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (needs >= 2 values), count and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values), "values": values}


def accuracies(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The final test accuracy of each run, and the ensemble's own when there is one."""
    accs = {key: r["summary"]["test_acc"] for key, r in runs.items()}
    ensemble = ensemble_of(runs)
    return accs | ({ENSEMBLE: ensemble["test_acc"]} if ensemble else {})


def gaps_of(accs: dict[str, float]) -> dict[str, float]:
    """The paired gaps (GAPS) whose two sides `accs` has, in GAPS order."""
    return {gap: accs[a] - accs[b] for gap, (a, b, _) in GAPS.items() if a in accs and b in accs}


def _samples(run_dir: Path) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(name, runs) of the run dir (".") and each seed dir (`seeds/<name>`), in that order."""
    seeds = sorted(d for d in (run_dir / SEEDS_DIR).glob("*") if d.is_dir())
    return [(".", collect(run_dir)), *((f"{SEEDS_DIR}/{d.name}", collect(d)) for d in seeds)]


def collect_seeds(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Mean +- std of the final test accuracy per run (the ensemble's own included), over the
    run dir and its seed dirs, with the mean training time of each run, and of each paired
    gap (GAPS: KD minus normal, ...) over the dirs that have both of its sides."""
    samples: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    for _, runs in _samples(run_dir):
        accs = accuracies(runs)
        for key, acc in accs.items():
            samples.setdefault(key, []).append(acc)
        for key, r in runs.items():
            times.setdefault(key, []).append(r["summary"]["train_time_s"])
        for gap, value in gaps_of(accs).items():
            gaps.setdefault(gap, []).append(value)
    stats = {k: mean_std(v) | ({"train_time_s": statistics.fmean(times[k])} if k in times else {})
             for k, v in samples.items() if len(v) >= 2}
    stats |= {gap: mean_std(v) for gap, v in gaps.items() if len(v) >= 2}
    return stats


def paired_gaps(run_dir: Path) -> list[dict[str, Any]]:
    """Each dir's paired gaps ({"dir", gap: value}) when an ensemble's gaps have >= 2 samples;
    else [] (a report without an ensemble keeps the form it had)."""
    per_dir = [{"dir": name, **gaps_of(accuracies(runs))} for name, runs in _samples(run_dir)]
    per_dir = [row for row in per_dir if len(row) > 1]
    ensemble_gaps = [g for g, (a, b, _) in GAPS.items() if ENSEMBLE in (a, b) or KD_ENSEMBLE in (a, b)]
    return per_dir if any(sum(g in row for row in per_dir) >= 2 for g in ensemble_gaps) else []


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
    for key in rows(results):
        r = results[key]
        if key == ENSEMBLE:  # trained as its members: no epochs or time of its own
            lines.append(f"| {label(key)} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | | | |")
        else:
            lines.append(f"| {label(key)} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | {r['epochs']} | "
                         f"{r['train_time_s']:.1f} | {r['images_per_s']:.0f} |")
    for gap, (_, _, text) in GAPS.items():
        if gap in results:
            lines += ["", f"{text}: {results[gap]:+.4f}"]
    seeds = results.get("seeds")
    if seeds:
        lines += ["", "Across seeds (final test accuracy):", "",
                  "| run | mean +- std | n | train time (s), mean |", "|---|---|---|---|"]
        for key in rows(seeds):
            st = seeds[key]
            time_s = f" {st['train_time_s']:.0f} " if "train_time_s" in st else " "  # the ensemble: none
            lines.append(f"| {label(key)} | {st['mean']:.4f} +- {st['std']:.4f} | {st['n']} |{time_s}|")
        for gap, (_, _, text) in GAPS.items():
            if gap in seeds:
                st = seeds[gap]
                lines.append(f"| {text} | {st['mean']:+.4f} +- {st['std']:.4f} | {st['n']} | |")
    if results.get("paired_gaps"):
        lines += ["", *paired_gaps_table(results["paired_gaps"], seeds or {})]
    return lines


def paired_gaps_table(per_dir: list[dict[str, Any]], seeds: dict[str, Any]) -> list[str]:
    """Each run dir's (seed's) paired gaps, and their mean +- std over the dirs that have both sides."""
    gaps = [g for g in GAPS if any(g in row for row in per_dir)]
    lines = ["Paired gaps per seed (final test accuracy, within each run dir):", "",
             "| run dir | " + " | ".join(GAPS[g][2] for g in gaps) + " |", "|---" * (len(gaps) + 1) + "|"]
    for row in per_dir:
        lines.append(f"| {row['dir']} | " + " | ".join(f"{row[g]:+.4f}" if g in row else "" for g in gaps) + " |")
    if any(g in seeds for g in gaps):
        lines.append("| mean +- std | " + " | ".join(
            f"{seeds[g]['mean']:+.4f} +- {seeds[g]['std']:.4f}" if g in seeds else "" for g in gaps) + " |")
    return lines


def ensemble_table(ensemble: dict[str, Any]) -> list[str]:
    """The ensemble's members (stage, seed, model, test accuracy, adopted from) and the ensemble itself."""
    lines = ["| member | seed | model | test accuracy |", "|---|---|---|---|"]
    for m in ensemble["members"]:
        model = m["model"][0] if isinstance(m["model"], list) and m["model"] else m["model"]
        adopted = f", adopted from {m['adopted_from']}" if m.get("adopted_from") else ""
        acc = f"{m['test_acc']:.4f}" if isinstance(m.get("test_acc"), (int, float)) else "?"
        lines.append(f"| {m['stage']} | {m['seed']} | {model}{adopted} | {acc} |")
    lines.append(f"| ensemble ({ensemble['rule']}) | | | {ensemble['test_acc']:.4f} |")
    return lines


def model_table(results: dict[str, Any]) -> list[str]:
    """Each run's model, its parameters and multiply-adds per image (from its summary; runs
    made before summaries recorded them are left out)."""
    lines = []
    for key in rows(results):
        m = results[key].get("model")
        if m:
            adopted = " (adopted, not trained here)" if "adopted_from" in results[key] else ""
            lines.append(f"| {label(key)} | {m['name']}{adopted} | {m['params'] / 1e6:.2f} M | "
                         f"{m['macs_per_image'] / 1e6:.1f} M |")
    return ["| run | model | parameters | multiply-adds per image |", "|---|---|---|---|", *lines] if lines else []


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
    if ENSEMBLE in results:
        ens = results[ENSEMBLE]
        line += f" Ensemble of {ens['size']} teachers ({ens['rule']})"
        kd_ens = results.get(KD_ENSEMBLE, {}).get("kd")
        line += f"; its KD student: {kd_sentence(kd_ens)}." if kd_ens else "."
    return [f"# Knowledge distillation on {data}: teacher vs students", "", line, ""]


def _results(cfg: Config, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key, r in runs.items():
        s = r["summary"]
        results[key] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"], "epochs": s["epochs"],
                        "train_time_s": s["train_time_s"], "images_per_s": s["images_per_s"]}
        results[key] |= {k: s[k] for k in ("model", "adopted_from") if k in s}
    ensemble = ensemble_of(runs)
    if ensemble:
        results[ENSEMBLE] = {k: ensemble[k] for k in ("size", "rule", "test_acc", "test_loss", "members")}
    results |= gaps_of({k: v["test_acc"] for k, v in results.items()})
    kd = kd_facts(runs[KD]["summary"]) if KD in runs else {}
    if kd:
        results[KD]["kd"] = kd
    kd_ens = kd_facts(runs[KD_ENSEMBLE]["summary"]) if KD_ENSEMBLE in runs else {}
    if kd_ens:
        results[KD_ENSEMBLE]["kd"] = kd_ens
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
        levels = {ENSEMBLE: results[ENSEMBLE]["test_acc"]} if ENSEMBLE in results else {}
        for metric, ylabel in (("test_acc", "test accuracy"), ("train_loss", "train loss")):
            plot_curves(runs, metric, ylabel, out / f"{metric}.png", levels if metric == "test_acc" else None)
            written[metric] = out / f"{metric}.png"
        seeds = results.get("seeds", {})
        keys = rows(results)
        if all(k in seeds for k in keys):
            plot_bars({k: seeds[k]["mean"] for k in keys}, out / "final_accuracy.png",
                      errors={k: seeds[k]["std"] for k in keys}, n=min(seeds[k]["n"] for k in keys))
        else:
            plot_bars({k: results[k]["test_acc"] for k in keys}, out / "final_accuracy.png")
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
    if paired := paired_gaps(run_dir):
        results["paired_gaps"] = paired
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
    if ENSEMBLE in results:
        lines += [f"## Ensemble of {results[ENSEMBLE]['size']} teachers", "",
                  *ensemble_table(results[ENSEMBLE]), ""]
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
