"""The W&B comparison report of one group, built with `wandb_workspaces.reports.v2`.

`build(group, results, ...)` makes the Report from the local `results.json` content: a
title and description, the accuracy table as markdown (the one report.md has), a runset
filtered on the group with line plots of test accuracy and losses per epoch and a bar
chart of the final test accuracy, and, when a KD sweep ran, a second runset (the sweep's
KD students) with parallel-coordinates, scatter and line panels over kd.alpha and
kd.temperature. With an ensemble of teachers (kd.ensemble=N), the first runset takes its
stages too (job types teacher-2 ... teacher-N, student-kd-ensemble), the table has their rows
and the ensemble's, and a runset of the ensemble's KD student shows the ensemble's own test
accuracy (its summary's `ensemble.test_acc`) beside the student's, under a table of members.

Building needs no network (`Report._to_model()` is local). Two things would call the
server, so they happen only in `push`: a Runset with both entity and project set looks
up the project's id, and `Report.save()` uploads. Hence:

- `kd-ddp report --wandb-report`: always writes `report/wandb_report.json` (the spec
  plus group, entity, project); with mode=online and an API key it also saves the report.
- `kd-ddp report --push-wandb-report`: after `wandb sync`, uploads that saved spec.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kd_ddp import stages, tracking
from kd_ddp.checkpoint import atomic_write_json
from kd_ddp.config import Config, ConfigError
from kd_ddp.report import ENSEMBLE, accuracy_table, ensemble_table, rows, stage_of, sweep_table

log = logging.getLogger(__name__)

SPEC_FILE = "wandb_report.json"
SPEC_FORMAT = "kd-ddp/wandb-report/v1"
EPOCH_METRICS = {"test_acc": "Test accuracy per epoch", "train_loss": "Train loss per epoch",
                 "test_loss": "Test loss per epoch"}
SWEEP_TAG = tracking.REPLICA_DIRS["sweep"]  # the tag tracking gives runs under <run_dir>/sweep/
ENSEMBLE_METRIC = f"{ENSEMBLE}.test_acc"  # the ensemble KD student's summary: the ensemble's own accuracy


def job_types(results: dict[str, Any]) -> list[str]:
    """The job types of the group's trained stages: the three of one teacher, and an ensemble's
    teachers and KD student when the results have an ensemble (its size, or the teachers found)."""
    members = [stage_of(key).member for key in rows(results) if key != ENSEMBLE]  # type: ignore[union-attr]
    n = max([*members, results.get(ENSEMBLE, {}).get("size", 0)], default=0)
    return [s.name for s in stages.trained(n)]


def _main_grid(wr: Any, expr: Any, group: str, grouped: bool, jobs: list[str]) -> Any:
    runset = wr.Runset(
        name=f"{group}: teacher and students",
        filters=[expr.Metric("Group") == group, expr.Metric("JobType").isin(jobs),
                 expr.Tags().notin([SWEEP_TAG])],
        # With seed replicas, one line (mean and spread) per stage instead of one per run.
        groupby=["JobType"] if grouped else [])
    panels = [wr.LinePlot(title=title, x="epoch", y=[metric]) for metric, title in EPOCH_METRICS.items()]
    panels.append(wr.BarPlot(title="Final test accuracy", metrics=["test_acc"], orientation="v"))
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _ensemble_grid(wr: Any, expr: Any, group: str) -> Any:
    """The ensemble's KD student's runs: the ensemble's own test accuracy (which its summary
    records) beside the student's."""
    runset = wr.Runset(
        name=f"{group}: ensemble of teachers",
        filters=[expr.Metric("Group") == group, expr.Metric("JobType") == stages.STUDENT_KD_ENSEMBLE.name,
                 expr.Tags().notin([SWEEP_TAG])])
    panels = [wr.BarPlot(title="Ensemble of teachers and its KD student: final test accuracy",
                         metrics=[ENSEMBLE_METRIC, "test_acc"], orientation="v")]
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _sweep_grid(wr: Any, expr: Any, group: str) -> Any:
    runset = wr.Runset(
        name=f"{group}: KD sweep",
        filters=[expr.Metric("Group") == group, expr.Metric("JobType") == stages.STUDENT_KD.name,
                 expr.Tags().isin([SWEEP_TAG])])
    alpha, temp, acc = wr.Config("kd.alpha"), wr.Config("kd.temperature"), wr.SummaryMetric("test_acc")
    panels = [
        wr.ParallelCoordinatesPlot(title="KD sweep: alpha, T -> test accuracy", columns=[
            wr.ParallelCoordinatesPlotColumn(metric=m) for m in (alpha, temp, acc)]),
        wr.ScatterPlot(title="KD sweep: alpha x T (colour: test accuracy)", x=alpha, y=temp, z=acc),
        wr.LinePlot(title="KD sweep: test accuracy per epoch", x="epoch", y=["test_acc"]),
    ]
    return wr.PanelGrid(runsets=[runset], panels=panels)


def build(group: str, results: dict[str, Any], *, entity: str = "", project: str = "kd-ddp",
          title: str = "") -> Any:
    """The Report for `group`; offline-safe (no entity+project on the runsets yet)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    cfg = results.get("config", {})
    description = (f"Knowledge distillation: teacher (CE) vs normal student (MSE) vs KD student "
                   f"(alpha={cfg.get('alpha')}, T={cfg.get('temperature')}), W&B group `{group}`.")
    if ENSEMBLE in results:
        description += (f" Ensemble of {results[ENSEMBLE]['size']} teachers ({results[ENSEMBLE]['rule']}) and "
                        "its KD student.")
    blocks = [
        wr.H1("Teacher vs students"),
        wr.MarkdownBlock("\n".join(accuracy_table(results))),
        _main_grid(wr, expr, group, grouped=bool(results.get("seeds")), jobs=job_types(results)),
    ]
    if ENSEMBLE in results:
        blocks += [wr.H2(f"Ensemble of {results[ENSEMBLE]['size']} teachers"),
                   wr.MarkdownBlock("\n".join(ensemble_table(results[ENSEMBLE]))), _ensemble_grid(wr, expr, group)]
    if results.get("sweep"):
        blocks += [wr.H2("KD sweep: alpha x temperature"), wr.MarkdownBlock("\n".join(sweep_table(results["sweep"]))),
                   _sweep_grid(wr, expr, group)]
    return wr.Report(entity=entity, project=project, title=(title or f"KD comparison: {group}")[:128],
                     description=description, blocks=blocks)


def spec(report: Any) -> dict[str, Any]:
    """What `Report.save()` would upload (the view spec), as plain JSON."""
    return report._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def spec_path(cfg: Config) -> Path:
    return cfg.run_dir / stages.REPORT.name / SPEC_FILE


def write_spec(cfg: Config, results: dict[str, Any]) -> Path:
    tracking.hermetic_env(cfg.run_dir)  # wandb_workspaces imports wandb, which may touch its dirs
    w = cfg.tracking.wandb
    group = tracking.group_name(cfg)
    doc = {"format": SPEC_FORMAT, "group": group, "entity": w.entity, "project": w.project,
           "viewspec": spec(build(group, results, entity=w.entity, project=w.project))}
    atomic_write_json(spec_path(cfg), doc)
    return spec_path(cfg)


def _attach(report: Any, entity: str, project: str) -> Any:
    """Point the report and its runsets at entity/project (the runsets' lookup needs network)."""
    import wandb_workspaces.reports.v2 as wr

    report.entity, report.project = entity, project
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            for rs in block.runsets:
                rs.entity, rs.project = entity, project
    return report


def _save(doc: dict[str, Any], cfg: Config) -> str:
    """Upload a spec document; returns the report's URL."""
    import wandb
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    if not tracking.find_api_key():
        raise ConfigError("no W&B API key (WANDB_API_KEY or ~/.netrc from `wandb login`): cannot push the report")
    report = wr.Report._from_model(internal.ReportViewspec.model_validate(doc["viewspec"]))
    entity = cfg.tracking.wandb.entity or doc.get("entity") or wandb.Api().default_entity
    project = cfg.tracking.wandb.project or doc.get("project") or "kd-ddp"
    _attach(report, entity, project).save()
    log.info("W&B report saved: %s", report.url)
    return str(report.url)


def publish(cfg: Config, results: dict[str, Any]) -> dict[str, Any]:
    """`--wandb-report`: write the spec; also save it when online with an API key."""
    path = write_spec(cfg, results)
    log.info("W&B report spec written to %s", path)
    out: dict[str, Any] = {"spec": str(path), "url": None}
    if cfg.tracking.wandb.mode == "online" and tracking.find_api_key():
        try:
            out["url"] = _save(json.loads(path.read_text()), cfg)
        except Exception as e:  # the spec is on disk: a failed upload loses nothing
            log.warning("saving the W&B report failed (%s: %s); push it later with "
                        "`kd-ddp report --push-wandb-report`", type(e).__name__, e)
    elif cfg.tracking.wandb.mode != "online":
        log.info("offline: after `wandb sync`, upload it with `kd-ddp report --push-wandb-report`")
    return out


def push_spec(cfg: Config) -> str:
    """`--push-wandb-report`: upload the spec a previous `--wandb-report` wrote."""
    path = spec_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run `kd-ddp report --wandb-report` first")
    doc = json.loads(path.read_text())
    if doc.get("format") != SPEC_FORMAT:
        raise ConfigError(f"{path} is not a kd-ddp W&B report spec (format {doc.get('format')!r})")
    tracking.hermetic_env(cfg.run_dir)
    return _save(doc, cfg)
