"""Reading metrics.jsonl: strictly for a finished stage, up to the damage for a resumed one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kd_ddp.metrics_io import read_metrics, read_metrics_prefix, write_metrics

pytestmark = pytest.mark.fast  # in-process unit tests (tests/conftest.py)

RECORDS = [{"epoch": 1, "train_loss": 2.5, "test_acc": 0.25}, {"epoch": 2, "train_loss": 1.5, "test_acc": 0.5}]


def test_records_written_by_the_trainer_read_back_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, RECORDS)
    assert read_metrics(path) == RECORDS
    assert read_metrics_prefix(path) == RECORDS
    write_metrics(path, [])  # an adopted teacher: no epochs
    assert read_metrics(path) == [] and read_metrics_prefix(path) == []


@pytest.mark.parametrize("last_line", ['{"epoch": 3, "train_lo', "", "[3, 4]"])
def test_a_bad_line_fails_a_finished_stage_and_ends_a_resumed_ones_records(tmp_path: Path, last_line: str) -> None:
    """Half written (a kill while an older kd-ddp appended), blank, or JSON but no record."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + last_line + "\n" + json.dumps(RECORDS[0]))
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: not a metrics record")):
        read_metrics(path)
    assert read_metrics_prefix(path) == RECORDS


def test_a_missing_file_fails_a_finished_stage_and_is_no_records_to_resume(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "metrics.jsonl")
    assert read_metrics_prefix(tmp_path / "metrics.jsonl") == []
