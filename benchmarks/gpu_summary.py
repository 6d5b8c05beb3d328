"""The GPU check's summary: every step's outcome and key figures, in at most 8 files.

    python -m benchmarks.gpu_summary --work WORK --out OUT [--preset P] [--budget S] [--archive] [--print]

The device tool brings back at most 8 files from $OUT (16 MiB each, two folders down at
most) and only lists the others. `scripts/gpu_check.sh` therefore writes every log, JSON and
run dir into its work folder WORK and calls this after each step, which (re)writes in OUT:

    summary.json   every step in order: status, rc, seconds, limit, its key figures, the
                   targets it was measured against, the last log lines of a failed step;
                   the machine and the package versions (from the env step)
    summary.txt    the same for a person (also printed at the end of the check's output)
    logs.tar.gz    (--archive) WORK without weights, logits or prepared data: every log,
                   the preflight and benchmark JSON, the run dirs' metrics and reports
    pipeline-*.json  the pipeline records of the cold / warm / multi / strong steps

so that a call killed at its time limit still returns what its finished steps measured.
Each file is written beside its final name and renamed over it: a kill leaves the last
complete version (and at most one partial `.*.tmp`). Standard library only: it has to work
when the packages the steps need do not.

WORK/steps.jsonl, written by gpu_check.sh, drives it: one line per step event,
{"step", "event": "start" | "end" | "skipped", "t" (epoch seconds), "limit_s", "rc", "reason"}.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_ddp import stages  # plain Python: no torch, so the summary is written whatever the host lacks

MAX_FILES = 8  # the device tool's limit on files brought back from $OUT
FIXED = ("summary.json", "summary.txt", "logs.tar.gz")
ARCHIVE_MAX = 15 * 2**20  # under the tool's 16 MiB per file
# Weights, logits, prepared data, lock files, and their temporary copies that a killed run
# leaves (`.logits.npy.tmp-<token>`, `checkpoint.pt.tmp...`).
SKIP = re.compile(r"\.(pt|npy|npz|beton|lock)($|[.-])|\.tmp($|-)")
SKIP_BYTES = 4 * 2**20  # any other file this large is left out too (the run dirs hold none)
SMALL_SUFFIXES = (".log", ".json", ".jsonl", ".txt", ".md")  # what an over-size archive keeps
TIMED_OUT = (124, 137)  # timeout's rc after SIGTERM, after SIGKILL (-k)
STOPPED = (130, 143)  # the call itself was interrupted or terminated during the step

# The targets of issue 14 (docs/gpu.md), for the seed-gpu preset's steps and the strong step.
TARGETS: dict[str, list[tuple[str, str, Callable[[float], bool]]]] = {
    "cold": [("wall_s", "<= 45", lambda v: v <= 45)],
    "warm": [("wall_s", "<= 30", lambda v: v <= 30), ("teacher_acc", ">= 0.85", lambda v: v >= 0.85),
             ("kd_gain", "> 0.0056", lambda v: v > 0.0056)],
    "limit": [("worst_real_over_in_memory", "<= 1.15", lambda v: v <= 1.15),
              ("teacher_images_per_s", ">= 120000", lambda v: v >= 120000)],
    "strong": [("teacher_acc", ">= 0.94", lambda v: v >= 0.94), ("kd_gain", "> 0", lambda v: v > 0)],
    # issue 24: a cached-ensemble KD epoch costs <= 1.15x a normal student epoch, whatever N
    "ensemble": [(f"cached_{n}_over_normal", "<= 1.15", lambda v: v <= 1.15) for n in (3, 5)],
}
TARGET_PRESET = {"cold": "seed-gpu", "warm": "seed-gpu", "limit": "seed-gpu", "strong": "strong", "ensemble": "quick"}


# -- the steps' events and figures ------------------------------------------------------


def read_events(work: Path) -> list[dict[str, Any]]:
    """One entry per step run, in order, from WORK/steps.jsonl (a step named twice: twice)."""
    path = work / "steps.jsonl"
    steps: list[dict[str, Any]] = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for e in (json.loads(x) for x in lines if x.strip()):
        if e["event"] == "end" and steps and steps[-1]["name"] == e["step"] and steps[-1]["status"] == "running":
            s = steps[-1]
            s["rc"], s["seconds"] = e["rc"], round(e["t"] - s.pop("_t0"), 1)
            s["status"] = ("ok" if e["rc"] == 0 else "timed out" if e["rc"] in TIMED_OUT
                           else "stopped" if e["rc"] in STOPPED else "failed")
        elif e["event"] == "start":
            steps.append({"name": e["step"], "status": "running", "rc": None, "seconds": None,
                          "limit_s": e.get("limit_s"), "_t0": e["t"]})
        elif e["event"] == "skipped":
            steps.append({"name": e["step"], "status": "skipped", "rc": None, "seconds": 0.0,
                          "limit_s": None, "reason": e.get("reason", "")})
    now = time.time()
    for s in steps:
        if "_t0" in s:  # still running: killed with the call, or this is the summary written before it ends
            s["seconds"] = round(now - s.pop("_t0"), 1)
    return steps


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pipeline_figures(row: dict[str, Any]) -> dict[str, Any]:
    normal, kd = row.get("student_normal_acc"), row.get("student_kd_acc")
    return {
        "wall_s": row.get("wall_s"), "pipeline_s": row.get("pipeline_s"), "warm_data": row.get("warm_data"),
        "teacher_acc": row.get("teacher_acc"), "student_normal_acc": normal, "student_kd_acc": kd,
        "kd_gain": round(kd - normal, 4) if normal is not None and kd is not None else None,
        "cache_build_s": row.get("cache_build_s"), "preset": row.get("preset"), "card": row.get("card"),
        "stages": {k: {f: s.get(f) for f in ("train_steps_s", "eval_s", "train_time_s", "session_time_s",
                                               "images_per_s", "amp", "loader", "host_syncs_per_epoch")}
                   for k, s in (row.get("stages") or {}).items()},
    }


def limit_figures(results: dict[str, Any]) -> dict[str, Any]:
    rows = results.get("compute_limit") or []
    ratios = {r["stage"]: round(r["epoch_s"] / r["limit_s"], 3) for r in rows}
    teacher = next((r for r in rows if r["stage"] == stages.TEACHER.name), None)
    return {"real_over_in_memory": ratios, "worst_real_over_in_memory": max(ratios.values()) if ratios else None,
            "images_per_s": {r["stage"]: round(r["images_per_s"]) for r in rows},
            "teacher_images_per_s": round(teacher["images_per_s"]) if teacher else None,
            "batch": rows[0]["batch"] if rows else None, "loader": rows[0]["loader"] if rows else None}


def step_figures(results: dict[str, Any]) -> dict[str, Any]:
    return {r["model"]: {k: round(v) for k, v in r["images_per_s"].items()} for r in results.get("train_step") or []}


def smoke_figures(log: str) -> dict[str, Any]:
    timer = re.search(r"pipeline finished in ([\d.]+) s", log)
    accs = dict(re.findall(r"^(teacher|student normal|student KD)\s+test_acc ([\d.]+)", log, re.M))
    return {"pipeline_s": float(timer.group(1)) if timer else None, **{f"{k.replace(' ', '_')}_acc": float(v)
                                                                       for k, v in accs.items()}}


def env_figures(work: Path) -> dict[str, Any]:
    env = _json(work / "env.json") or _json(work / "preflight.json") or {}  # a call without env: the preflight's
    smi = (work / "logs" / "env.log").read_text() if (work / "logs" / "env.log").is_file() else ""
    return {"gpus": env.get("torch", {}).get("gpus"), "nvidia_smi": [x for x in smi.splitlines() if "MiB" in x],
            **{k: v for k, v in env.get("torch", {}).items() if k != "gpus"}, "python": env.get("python")}


def preflight_figures(work: Path) -> dict[str, Any]:
    pre = _json(work / "preflight.json") or {}
    return {"ok": pre.get("ok"), "problems": pre.get("problems"), "warnings": pre.get("warnings"),
            "checks": pre.get("checks"), "seconds": pre.get("seconds")}


def ensemble_figures(results: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/ensemble.py's figures per ensemble size N: the cached and live KD epoch over
    a normal epoch, the cache's build time (s) and size (MB)."""
    if not results:
        return {}
    out: dict[str, Any] = {k: results.get(k) for k in ("preset", "device", "amp", "train_images")}
    out["epoch_normal_s"] = round(results["epoch_normal_s"], 4)
    for row in results["rows"]:
        n = row["n"]
        out |= {f"cached_{n}_over_normal": round(row["cached_over_normal"], 3),
                f"live_{n}_over_normal": round(row["live_over_normal"], 3),
                f"cache_build_{n}_s": round(row["cache_build_s"], 2),
                f"cache_{n}_mb": round(row["cache_bytes"] / 1e6, 2)}
    return out


def figures(work: Path, name: str) -> dict[str, Any]:
    """A step's key figures, read from what it left in WORK (nothing yet: {})."""
    kind = name.split("-")[0]
    if kind in ("cold", "warm", "multi", "strong"):
        rows = sorted((work / name).glob("pipeline-*.json"))
        return pipeline_figures(_json(rows[0]) or {}) if rows else {}
    if kind in ("limit", "step"):
        results = _json(work / name / "results.json")
        return {} if results is None else limit_figures(results) if kind == "limit" else step_figures(results)
    if kind == "graph":  # img/s per step form (benchmarks/train_step.py run_tensor_step)
        results = _json(work / name / "results.json") or {}
        return {k: round(v) for k, v in results.get("tensor_step", {}).get("images_per_s", {}).items()}
    if kind == "ensemble":
        return ensemble_figures(_json(work / name / "results.json") or {})
    if kind == "smoke" and (work / "logs" / "smoke.log").is_file():
        return smoke_figures((work / "logs" / "smoke.log").read_text())
    if kind == "env":
        return env_figures(work)
    if kind == "preflight":
        return preflight_figures(work)
    return {}


def targets(name: str, figs: dict[str, Any]) -> list[dict[str, Any]]:
    """The step's targets, measured against its figures when it ran the preset they are for."""
    kind = name.split("-")[0]
    preset = figs.get("preset")
    if kind not in TARGETS or preset != TARGET_PRESET[kind]:
        return []
    out = []
    for key, text, ok in TARGETS[kind]:
        value = figs.get(key)
        out.append({"figure": key, "target": text, "value": value, "met": None if value is None else ok(value)})
    return out


def log_tail(work: Path, name: str, lines: int = 8) -> list[str]:
    path = work / "logs" / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


# -- the summary --------------------------------------------------------------------------


def build(work: Path, preset: str, budget: int | None) -> dict[str, Any]:
    steps = read_events(work)
    for s in steps:
        try:  # a step's odd output must not cost the summary of the others
            s["figures"] = figures(work, s["name"])
        except Exception as e:
            s["figures"], s["figures_error"] = {}, f"{type(e).__name__}: {e}"
        if s["figures"] and s["name"].split("-")[0] == "limit":
            s["figures"]["preset"] = preset  # the limit step ran the check's preset
        s["targets"] = targets(s["name"], s["figures"])
        if s["status"] in ("failed", "timed out", "stopped", "running"):
            s["log_tail"] = log_tail(work, s["name"])
        s["log"] = f"logs/{s['name']}.log"
    env = _json(work / "env.json") or _json(work / "preflight.json") or {}
    started = _json(work / "started.json") or {}
    return {
        "preset": preset, "budget_s": budget, "started": started.get("at"),
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started["t"], 1) if "t" in started else None,
        "done": (work / "done").is_file(),
        "failed_steps": [s["name"] for s in steps if s["status"] in ("failed", "timed out", "stopped")],
        "skipped_steps": [s["name"] for s in steps if s["status"] == "skipped"],
        "steps": steps, "versions": env.get("versions", {}), "machine": env_figures(work),
    }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def step_line(s: dict[str, Any]) -> str:
    f = s["figures"]
    kind = s["name"].split("-")[0]
    if kind in ("cold", "warm", "multi", "strong") and f:
        text = (f"wall {_fmt(f['wall_s'])} s (in-process {_fmt(f['pipeline_s'])} s), warm_data {f['warm_data']}; "
                f"teacher {_fmt(f['teacher_acc'])}, normal {_fmt(f['student_normal_acc'])}, "
                f"KD {_fmt(f['student_kd_acc'])} (gain {_fmt(f['kd_gain'])}); " + ", ".join(
                    f"{k} {_fmt(v['train_steps_s'])}+{_fmt(v['eval_s'])} s, {_fmt(v['host_syncs_per_epoch'])} syncs/ep"
                    for k, v in f["stages"].items()))
    elif kind == "limit" and f:
        text = ("real / in-memory " + ", ".join(f"{k} {v}" for k, v in f["real_over_in_memory"].items())
                + f"; teacher {f['teacher_images_per_s']} img/s")
    elif kind == "step" and f:
        text = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in r.items()) + " img/s" for m, r in f.items())
    elif kind in ("smoke", "graph") and f:
        text = ", ".join(f"{k} {_fmt(v)}" for k, v in f.items())
    elif kind == "preflight" and f:
        text = ("ok" if f["ok"] else "; ".join(f["problems"] or [])) + "".join(
            f"; warning: {w}" for w in f.get("warnings") or [])
    elif kind == "env" and f:
        text = f"GPUs {f.get('gpus') or 'none'}, torch {f.get('torch')}, CUDA {f.get('cuda')}"
    else:
        text = s.get("reason", "")
    for t in s["targets"]:
        text += f" [{t['figure']} {_fmt(t['value'])} {t['target']}: {'met' if t['met'] else 'MISSED'}]"
    return f"{s['name']:10} {_fmt(s['rc']):>4} {_fmt(s['seconds']):>7}  {s['status']:9} {text}"


def render(summary: dict[str, Any], files: list[str]) -> str:
    m = summary["machine"]
    lines = [f"GPU check, preset {summary['preset']}, budget {summary['budget_s']} s, started {summary['started']}, "
             f"{summary['elapsed_s']} s so far{', done' if summary['done'] else ', NOT done (running or killed)'}",
             f"machine: {'; '.join(m.get('nvidia_smi') or []) or m.get('gpus') or 'no GPU'}; cpus {m.get('cpus')}; "
             f"Python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}, "
             f"NCCL {m.get('nccl')})",
             "versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
             f"{'step':10} {'rc':>4} {'seconds':>7}  {'status':9} figures"]
    for s in summary["steps"]:
        try:
            lines.append(step_line(s))
        except Exception as e:
            lines.append(f"{s['name']:10} {_fmt(s['rc']):>4} {_fmt(s['seconds']):>7}  {s['status']:9} "
                         f"(figures unreadable: {type(e).__name__}: {e}; see summary.json)")
        lines += [f"{'':12}| {x}" for x in s.get("log_tail", [])]
    lines.append(f"failed: {', '.join(summary['failed_steps']) or 'none'}; skipped: "
                 f"{', '.join(summary['skipped_steps']) or 'none'}; files: {' '.join(files)}")
    return "\n".join(lines) + "\n"


# -- the files in OUT -------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def archive_bytes(work: Path, small_only: bool = False) -> bytes:
    """WORK as a tar.gz, without weights, logits or prepared data (and, small_only, only
    logs and JSON: what is kept when the run dirs would push it past ARCHIVE_MAX)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.isdir():
            return info
        dropped = (SKIP.search(Path(info.name).name) is not None or small_only and not info.name.endswith(
            SMALL_SUFFIXES) or info.size > SKIP_BYTES and not info.name.endswith(".log"))
        return info if info.isfile() and not dropped else None  # no links: they would point off the machine

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        tar.add(work, arcname="gpu-check", filter=keep)
    return buf.getvalue()


def write_archive(work: Path, out: Path) -> str:
    data = archive_bytes(work)
    note = "logs, JSON and run dirs (no weights, logits or prepared data)"
    if len(data) > ARCHIVE_MAX:
        data, note = archive_bytes(work, small_only=True), "logs and JSON only: the run dirs made it too large"
    write_atomic(out / "logs.tar.gz", data)
    return f"{note}, {len(data) / 2**20:.2f} MiB"


def publish_records(work: Path, out: Path, steps: list[dict[str, Any]]) -> list[str]:
    """Copy the steps' pipeline records into OUT, as many as the file limit leaves room for
    (the archive holds them all in any case)."""
    names: list[str] = []
    for s in steps:
        for path in sorted((work / s["name"]).glob("pipeline-*.json")) if (work / s["name"]).is_dir() else []:
            # one place kept for a partial .tmp that a kill mid-write would leave
            if path.name not in names and len(names) < MAX_FILES - len(FIXED) - 1:
                write_atomic(out / path.name, path.read_bytes())
                names.append(path.name)
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--archive", action="store_true", help="rewrite logs.tar.gz too")
    p.add_argument("--print", action="store_true", help="print summary.txt")
    a = p.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = build(work, a.preset, a.budget)
    records = publish_records(work, out, summary["steps"])
    if a.archive or (out / "logs.tar.gz").is_file():
        summary["archive"] = write_archive(work, out) if a.archive else _json(work / "archive.json")
        if a.archive:
            (work / "archive.json").write_text(json.dumps(summary["archive"]))
    files = [*FIXED[: 2 + (out / "logs.tar.gz").is_file()], *records]
    summary["files"] = files
    text = render(summary, files)
    write_atomic(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(out / "summary.txt", text.encode())
    if a.print:
        print(text, end="")


if __name__ == "__main__":
    main()
