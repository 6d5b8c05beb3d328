"""`pip install .` into an environment that already has torch: nothing replaced, nothing fetched.

A cluster's environment brings its own torch (its CUDA build, often older than ours). Real pip
installs kd-ddp from a copy of this checkout into a fresh venv that sees the project venv's
packages (through a .pth file: torch is a 6 GB install, and no index is reachable here),
with --no-index, so any attempt to download or replace a package fails the install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "kd_ddp", "launch")
# The new environment only: no PYTHONPATH leading back to this checkout.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture
def cluster_env(tmp_path: Path) -> tuple[Path, Path]:
    """(python of a venv holding the project venv's packages as if installed by the site, a
    copy of the sources to install)."""
    venv = tmp_path / "site-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=ENV)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True, check=True, env=ENV).stdout.strip())
    (site / "site-provided.pth").write_text(sysconfig.get_path("purelib") + "\n")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    return venv / "bin" / "python", src


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, timeout=600, cwd=python.parents[2], env=ENV)


def test_install_keeps_the_environments_torch(cluster_env: tuple[Path, Path]) -> None:
    python, src = cluster_env
    proc = pip(python, "install", "--no-index", "--no-build-isolation", str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Requirement already satisfied: torch>=2.11 " in proc.stdout
    assert "Successfully installed kd-ddp-0.1.0" in proc.stdout.splitlines()[-1]  # and nothing else
    where = subprocess.run([str(python), "-c", "import torch, kd_ddp; print(torch.__version__, torch.__file__, "
                            "kd_ddp.__file__)"], capture_output=True, text=True, check=True,
                           cwd=src.parent, env=ENV).stdout.split()  # not from this checkout's cwd
    assert where[:2] == [torch.__version__, torch.__file__]  # the environment's own torch, untouched
    assert where[2].startswith(str(python.parents[1]))  # kd-ddp itself went into the new venv
    doctor = subprocess.run([str(python.parent / "kd-ddp"), "doctor", "--preset", "smoke",
                             f"run.dir={src / 'run'}", f"data.cache_dir={src / 'cache'}"],
                            capture_output=True, text=True, timeout=300, cwd=src.parent, env=ENV)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"info  torch        {torch.__version__.split('+')[0]}" in doctor.stdout


def test_an_older_torch_in_the_range_is_kept(cluster_env: tuple[Path, Path]) -> None:
    """torch 2.11 as a site would provide it, stood in for by its metadata alone (the wheel is
    a 6 GB download): pip must take it as it is. With the old exact pins (torch==2.14.1) the
    same command fails, since --no-index cannot fetch another torch."""
    python, src = cluster_env
    site = python.parents[1] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    info = site / "torch-2.11.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    (info / "INSTALLER").write_text("site\n")
    (info / "RECORD").write_text("")
    proc = pip(python, "install", "--dry-run", "--report", "-", "--quiet", "--no-index", "--no-build-isolation",
               str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert [item["metadata"]["name"] for item in report["install"]] == ["kd-ddp"]
    loose = pip(python, "install", "--dry-run", "--no-index", "--no-build-isolation", str(src))
    assert "Requirement already satisfied: torch>=2.11 " in loose.stdout and "(2.11.0)" in loose.stdout
