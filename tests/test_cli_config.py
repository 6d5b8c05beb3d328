"""`kd-ddp config` and `--config FILE` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import assert_user_error, run_cli


def test_help_points_at_the_config_command() -> None:
    out = run_cli(["--help"]).stdout
    assert "kd-ddp config [--preset P]" in out and "--config FILE" in out


def test_printed_config_drives_a_stage_and_its_run_dir_copy_reads_back(tmp_path: Path) -> None:
    """config -> YAML file -> a real stage with --config (plus an override) -> the run dir's
    config.<stage>.json -> --config again: the same config at every step."""
    printed = run_cli(["config", "--preset", "smoke", "kd.alpha=0.3", "tracking.wandb.mode=disabled",
                       f"data.cache_dir={tmp_path / 'cache'}"]).stdout
    assert "# weight of hard-label CE; (1 - alpha) goes to the KL term\n  alpha: 0.3\n" in printed
    (tmp_path / "smoke.yaml").write_text(printed)
    run_dir = tmp_path / "run"
    run_cli(["prepare-data", "--config", str(tmp_path / "smoke.yaml"), f"run.dir={run_dir}", "seed=3"])
    written = json.loads((run_dir / "config.prepare-data.json").read_text())
    assert (written["preset"], written["kd"]["alpha"], written["seed"]) == ("smoke", 0.3, 3)
    assert written["data"]["cache_dir"] == str(tmp_path / "cache")
    again = run_cli(["config", "--format", "json", "--config", str(run_dir / "config.prepare-data.json")]).stdout
    assert json.loads(again) == written
    assert again == (run_dir / "config.prepare-data.json").read_text()  # the same bytes as the run dir's


def test_bad_config_file_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kd:\n  alhpa: 0.3\n")
    proc = run_cli(["config", "--config", str(tmp_path / "bad.yaml")], check=False)
    assert_user_error(proc, f"{tmp_path / 'bad.yaml'}: unknown config key(s) 'kd.alhpa' (did you mean kd.alpha?)")
    (tmp_path / "seed.json").write_text('{"preset": "seed"}')
    proc = run_cli(["pipeline", "--preset", "smoke", "--config", str(tmp_path / "seed.json"),
                    f"run.dir={tmp_path / 'run'}"], check=False)
    assert_user_error(proc, "made with preset 'seed'")
    assert not (tmp_path / "run").exists()
