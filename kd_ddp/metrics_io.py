"""Reading metrics.jsonl, the per-epoch records a training stage writes (one JSON object a line).

One reader for every consumer: the trainer resuming a stage, the report, the benchmarks and
the tests. A finished stage's file is read whole and strictly (`read_metrics`); a stage being
resumed takes what a kill left readable (`read_metrics_prefix`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_ddp.checkpoint import atomic_write_bytes


def parse_record(line: str) -> dict[str, Any]:
    """One line of metrics.jsonl as its record; ValueError if the line is not a JSON object."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {line[:80]!r}")
    return record


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a finished stage's metrics.jsonl, in order.

    A missing file raises FileNotFoundError, and a line that is not a record (blank, half
    written, not an object) a ValueError naming the file and the line: a finished stage wrote
    the file whole, so anything else is a fault to report, not to skip.
    """
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            records.append(parse_record(line))
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not a metrics record ({e})") from e
    return records


def read_metrics_prefix(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl up to the first line that is not one; none if there is no file.

    For resuming: an older kd-ddp appended to the file, so a kill could leave its last line
    half written, and the records before it are still good.
    """
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(parse_record(line))
        except ValueError:
            break
    return records


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, whole and atomically (temp file + rename): after any kill it holds the
    records of the checkpoint before this one or of this one, never a half line."""
    atomic_write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in history).encode())
