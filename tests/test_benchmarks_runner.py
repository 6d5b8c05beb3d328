"""`python -m benchmarks`: which benchmarks a call runs and where their record goes. A part
of a run (`--only`) must not replace the full run's benchmarks/results.{md,json}, the
source of BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import ALL, BENCHMARKS, HERE, out_dir, parse
from tests.conftest import REPO


@pytest.mark.fast
def test_a_part_of_a_run_goes_to_partial_and_a_full_one_to_the_record() -> None:
    assert out_dir(parse([])) == HERE
    assert out_dir(parse(["--only", *ALL])) == HERE
    assert out_dir(parse(["--only", "memory"])) == HERE / "partial"
    assert out_dir(parse(["--only", "memory", "--out", "/x"])) == Path("/x")


@pytest.mark.fast
def test_every_benchmark_has_a_runner_and_an_unknown_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(BENCHMARKS) == set(ALL) and len(ALL) == len(set(ALL))
    with pytest.raises(SystemExit) as exc:
        parse(["--only", "no_such_bench"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def full_record() -> list[bytes | None]:
    """The full run's benchmarks/results.{md,json} as bytes (None: absent)."""
    return [(HERE / name).read_bytes() if (HERE / name).exists() else None for name in ("results.md", "results.json")]


def test_one_benchmark_writes_its_section_and_leaves_the_record_alone(tmp_path: Path) -> None:
    record = full_record()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "memory", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"machine", "date", "memory"}
    steps = [row["step"] for row in results["memory"]]
    assert steps[0] == "python" and all(row["peak_mb"] >= row["rss_mb"] > 0 for row in results["memory"])
    md = (tmp_path / "results.md").read_text()
    assert md.count("### ") == 1 and "### Memory of one process" in md
    assert full_record() == record
