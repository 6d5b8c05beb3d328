"""`kd-ddp doctor` on this machine, checked against what other tools say about it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_ddp.config import ConfigError, load_config
from kd_ddp.doctor import filesystem, node_local
from launch.slurm import check_paths


def doctor(*overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kd_ddp", "doctor", "--preset", "smoke", *overrides],
                          capture_output=True, text=True, timeout=300)


def findmnt_type(path: Path) -> str:
    """util-linux's answer, from the same mount table; of mounts stacked on one point, the top one."""
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def test_doctor_reports_versions_cpus_and_filesystems(tmp_path: Path) -> None:
    proc = doctor(f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"info  torch        {torch.__version__.split('+')[0]}" in out
    assert re.search(rf"^info  python +{sys.version.split()[0]} ", out, re.M)
    assert re.search(rf"^info  cpus +{len(os.sched_getaffinity(0))} usable of {os.cpu_count()};", out, re.M)
    assert re.search(r"^(ok|warn|fail)  +ffcv ", out, re.M)
    fstype = findmnt_type(tmp_path)
    assert re.search(rf"^ok +data cache +{tmp_path / 'cache'} \({fstype} on .*not created yet", out, re.M), out
    assert not (tmp_path / "cache").exists()  # the probe writes into the nearest existing parent, then cleans up
    assert list(tmp_path.iterdir()) == []


def test_doctor_fails_on_what_the_config_needs_and_warns_on_node_local_paths(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"kd-doctor-{os.getpid()}"
    proc = doctor(f"run.dir={tmp_path / 'run'}", f"data.cache_dir={shm}", "train.device=cuda",
                  "data.source=imagefolder", f"data.root={tmp_path / 'no-data'}")
    assert proc.returncode == 1
    if not torch.cuda.is_available():
        assert re.search(r"^fail +gpus +none visible \(torch .*", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^fail +data.root +{tmp_path / 'no-data'} does not exist", proc.stdout, re.M)
    assert f"{findmnt_type(Path('/dev/shm'))} is local to this node" in proc.stdout
    assert "kd-ddp doctor:" in proc.stderr and "data.root" in proc.stderr


def test_filesystem_of_a_path_not_made_yet_is_its_parents(tmp_path: Path) -> None:
    assert filesystem(tmp_path / "a" / "b") == filesystem(tmp_path)
    assert filesystem(tmp_path)[0] == findmnt_type(tmp_path)
    assert node_local(Path("/dev/shm/x")) == findmnt_type(Path("/dev/shm"))


def test_launcher_warns_about_node_local_paths_and_refuses_a_missing_data_root(tmp_path: Path) -> None:
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "data.cache_dir=/dev/shm/kd-cache", "data.loader=torch"])
    warnings = check_paths(cfg, needs_data=True)
    shm = findmnt_type(Path("/dev/shm"))
    assert len(warnings) == 1 and warnings[0].startswith(f"data cache (data.cache_dir) /dev/shm/kd-cache is on {shm}")
    missing = load_config("smoke", [f"run.dir={tmp_path}", "data.source=imagefolder", f"data.root={tmp_path}/x"])
    with pytest.raises(ConfigError, match=f"data.root {tmp_path}/x does not exist"):
        check_paths(missing, needs_data=True)
    assert check_paths(missing, needs_data=False) == []  # the report alone reads no data
