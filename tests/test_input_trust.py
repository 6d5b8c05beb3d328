"""Inputs kd-ddp must not trust (issue 21, "Trust, round 2"): data files and Slurm result
files that are pickles never run code when read, and a malformed one is a message naming it;
config values of the right type that make no sense (nan, inf, a seed torch refuses, a line
break in a Slurm field) stop the run before any work; and the user's model directories
(model.python_path) never replace the packages kd-ddp imports."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import submitit
import torch
from submitit.core.utils import cloudpickle_dump

from kd_ddp.augment import sample_hash
from kd_ddp.config import Config, ConfigError, _leaf_fields, load_config
from kd_ddp.data import epoch_order
from kd_ddp.models import build_model
from kd_ddp.sources import DataError, cifar_batches
from kd_ddp.train import rank_seed
from launch.slurm import end_once_saved, job_error, read_outcome
from tests.conftest import assert_user_error, run_cli

QUIET = ["tracking.wandb.mode=disabled"]


class Payload:
    """Pickles as a call of `fn(*args)`: what a crafted pickle runs when it is loaded."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def write_official_cifar(root: Path, n_per_batch: int = 4) -> Path:
    """A cifar-10-batches-py directory pickled as the official files are: protocol 2, arrays
    named by numpy.core.multiarray._reconstruct (numpy 1's name, which the official Python 2
    pickles use), each batch a dict of b'data' (N, 3072) uint8, b'labels' (a list),
    b'batch_label' and b'filenames'; batches.meta holds b'label_names'."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": f"{name} of 5".encode(),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)]}
        blob = pickle.dumps(batch, protocol=2)
        (d / name).write_bytes(blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": [f"c{i}".encode() for i in range(10)],
            b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


# -- CIFAR python batches -------------------------------------------------------------


@pytest.mark.fast
def test_official_format_batches_still_load(tmp_path: Path) -> None:
    d = write_official_cifar(tmp_path)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (d / "test_batch").read_bytes()
    raw = cifar_batches(tmp_path, 32)
    assert raw.classes == [f"c{i}" for i in range(10)]
    assert raw.train.images.shape == (20, 32, 32, 3) and raw.test.images.shape == (4, 32, 32, 3)
    batch = pickle.loads((d / "data_batch_1").read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(raw.train.images[0], batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert raw.train.labels[:4].tolist() == batch[b"labels"]


@pytest.mark.fast
def test_crafted_batches_meta_is_refused_not_run(tmp_path: Path) -> None:
    d = write_official_cifar(tmp_path)
    marker = tmp_path / "pwned"
    crafted = pickle.dumps({b"label_names": Payload(builtins.open, str(marker), "w")}, protocol=2)
    pickle.loads(crafted)[b"label_names"].close()  # the file is a real exploit: a plain pickle.load creates the marker
    assert marker.exists()
    marker.unlink()
    (d / "batches.meta").write_bytes(crafted)
    with pytest.raises(DataError) as e:
        cifar_batches(tmp_path, 32)
    assert not marker.exists()
    assert str(d / "batches.meta") in str(e.value) and "names io.open" in str(e.value), e.value


@pytest.mark.fast
@pytest.mark.parametrize("damage, message", [
    (lambda blob: blob[: len(blob) // 2], "not a readable CIFAR batch"),
    (lambda blob: b"PK\x03\x04 a zip, not a pickle", "not a readable CIFAR batch"),
    (lambda blob: pickle.dumps([1, 2, 3], protocol=2), "holds a list, not a dict"),
    (lambda blob: pickle.dumps({b"labels": [0]}, protocol=2), "has no b'data' entry"),
    (lambda blob: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "has no b'labels' entry"),
    (lambda blob: pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, protocol=2),
     "b'data' must be an integer array of shape (N, 3072)"),
    (lambda blob: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2),
     "b'labels' must be a list of 2 class indices in 0..9"),
    (lambda blob: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, protocol=2),
     "b'labels' must be a list of 1 class indices in 0..9"),
])
def test_malformed_batch_is_named(tmp_path: Path, damage: Any, message: str) -> None:
    d = write_official_cifar(tmp_path)
    batch = d / "data_batch_3"
    batch.write_bytes(damage(batch.read_bytes()))
    with pytest.raises(DataError) as e:
        cifar_batches(tmp_path, 32)
    assert str(batch) in str(e.value) and message in str(e.value), e.value


def prepare_cifar(tmp_path: Path, root: Path) -> Any:
    return run_cli(["prepare-data", "--preset", "smoke", "data.source=cifar-batches", f"data.root={root}",
                    f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}", *QUIET], check=False)


def test_cli_refuses_crafted_and_truncated_batches(tmp_path: Path) -> None:
    d = write_official_cifar(tmp_path / "src")
    marker = tmp_path / "pwned"
    meta = (d / "batches.meta").read_bytes()
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload(os.system, f"touch {marker}")}, 2))
    proc = prepare_cifar(tmp_path, d)
    assert_user_error(proc, f"kd-ddp: error: CIFAR batch file {d / 'batches.meta'}", "posix.system")
    assert not marker.exists()

    (d / "batches.meta").write_bytes(meta)
    (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:100])
    proc = prepare_cifar(tmp_path, d)
    assert_user_error(proc, f"kd-ddp: error: CIFAR batch file {d / 'test_batch'} is not a readable CIFAR batch")
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.beton"))


# -- submitit result files (launch.slurm status --wait, end_once_saved) -----------------


@pytest.mark.fast
def test_genuine_result_files_are_read(tmp_path: Path) -> None:
    # What submitit's process_job writes: a job's return value may hold anything cloudpickle
    # takes (here a Path, a numpy scalar and a function pickled by value).
    cloudpickle_dump(("success", {"teacher": {"test_acc": np.float64(0.5), "dir": tmp_path, "f": lambda x: x}}),
                     tmp_path / "ok.pkl")
    assert read_outcome(tmp_path / "ok.pkl") == ("success", "")
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
    cloudpickle_dump(("error", trace), tmp_path / "err.pkl")
    assert read_outcome(tmp_path / "err.pkl") == ("error", trace)


@pytest.mark.fast
def test_crafted_result_file_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    job = submitit.SlurmJob(folder=tmp_path / "%j", job_id="4242", tasks=range(1))
    result = job.task(0).paths.result_pickle
    result.parent.mkdir(parents=True)
    cloudpickle_dump(Payload(builtins.open, str(marker), "w"), result)
    pickle.loads(result.read_bytes()).close()  # a real exploit: a plain pickle.load creates the marker
    marker.unlink()
    payload = Payload(builtins.open, str(marker), "w")
    # A success's value is never looked at (what it names loads as an inert stand-in): the
    # file's outcome is read, its code is not run.
    for crafted, expected in ((payload, "unreadable"), (("error", payload), "unreadable"),
                              (("success", payload), "success")):
        cloudpickle_dump(crafted, result)
        assert read_outcome(result)[0] == expected
        assert not marker.exists()
    cloudpickle_dump(("error", Payload(builtins.open, str(marker), "w")), result)
    assert job_error(job) == f"unreadable result: {result} holds neither a success nor an error as submitit writes them"
    end_once_saved(result)  # an error that is not one: the normal exit, nothing run
    result.write_bytes(result.read_bytes()[:20])
    assert job_error(job).startswith(f"unreadable result: {result} is not a result file: ")
    assert not marker.exists()


# -- values of the right type that make no sense ---------------------------------------


def refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    return str(e.value)


@pytest.mark.fast
@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed=-1: must be in [0, 2**64 - 1]"),
    (f"seed={2**64}", f"seed={2**64}: must be in [0, 2**64 - 1]"),
    ("optim.warmup_epochs=inf", "optim.warmup_epochs=inf: must be a finite number"),
    ("optim.student_warmup_epochs=inf", "optim.student_warmup_epochs=inf: must be a finite number"),
    ("optim.student_warmup_epochs=nan", "optim.student_warmup_epochs=nan: must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("optim.student_lr=nan", "optim.student_lr=nan: must be a finite number"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf: must be a finite number"),
    ("kd.temperature=inf", "kd.temperature=inf: must be a finite number"),
    ("slurm.teacher.mem_gb=inf", "slurm.teacher.mem_gb=inf: must be a finite number"),
    ("slurm.report.mem_gb=nan", "slurm.report.mem_gb=nan: must be a finite number"),
    ("slurm.student.partition=gpu\n#SBATCH --uid=0", "slurm.student.partition='gpu\\n#SBATCH --uid=0': holds "
     "control characters (\\n)"),
    ("slurm.teacher.extra=--exclusive\r--hold", "holds control characters (\\r)"),
])
def test_senseless_values_are_refused(override: str, message: str) -> None:
    assert message in refusal([override])


@pytest.mark.fast
def test_every_float_field_must_be_finite() -> None:
    floats = [key for key, (_, _, typ) in _leaf_fields(Config()).items() if typ is float]
    assert {"optim.warmup_epochs", "optim.student_warmup_epochs", "slurm.teacher.mem_gb"} <= set(floats)
    for key in floats:
        for value in ("inf", "-inf", "nan"):
            assert f"{key}={value}: must be a finite number" in refusal([f"{key}={value}"])


@pytest.mark.fast
def test_nonfinite_numbers_in_a_config_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optim:\n  warmup_epochs: .inf\nslurm:\n  teacher:\n    mem_gb: .nan\n")
    (tmp_path / "c.json").write_text('{"kd": {"temperature": Infinity}}')
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs=inf: must be a finite number\n  "
                                          r"slurm.teacher.mem_gb=nan: must be a finite number"):
        load_config("smoke", config_file=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="kd.temperature=inf: must be a finite number"):
        load_config("smoke", config_file=tmp_path / "c.json")


@pytest.mark.fast
def test_every_slurm_text_field_refuses_line_breaks_but_setup() -> None:
    texts = [key for key, (_, _, typ) in _leaf_fields(Config()).items()
             if typ is str and key.startswith("slurm.") and key != "slurm.setup"]
    assert {"slurm.log_dir", "slurm.wckey", "slurm.teacher.partition", "slurm.report.qos"} <= set(texts)
    for key in [*texts, "run.dir"]:
        assert f"{key}='a\\nb': holds control characters (\\n)" in refusal([f"{key}=a\nb"])
    # slurm.setup is shell lines on purpose; the batch script runs them one by one
    cfg = load_config("smoke", ["slurm.setup=module load cuda\nsource /shared/kd/bin/activate"])
    assert cfg.slurm.setup.splitlines() == ["module load cuda", "source /shared/kd/bin/activate"]


@pytest.mark.fast
def test_the_largest_seed_works_wherever_seeds_go() -> None:
    seed = load_config("smoke", [f"seed={2**64 - 1}"]).seed
    assert torch.manual_seed(seed).initial_seed() == seed
    assert torch.Generator().manual_seed(rank_seed(seed, 7)).initial_seed() == rank_seed(seed, 7)
    order = epoch_order(100, seed=seed, epoch=3, rank=1, world=2, batch_per_rank=10)
    assert sorted(order.tolist()) == sorted(set(order.tolist())) and len(order) == 50
    assert sample_hash(seed, 5, torch.arange(4)).shape == (4,)
    assert load_config("smoke", ["seed=0"]).seed == 0


def test_cli_refuses_senseless_values_before_any_work(tmp_path: Path) -> None:
    for i, bad in enumerate((["seed=-1"], ["optim.warmup_epochs=inf", "slurm.teacher.mem_gb=nan"],
                             ["slurm.teacher.qos=normal\n#SBATCH --exclusive"])):
        run_dir, cache = tmp_path / f"run{i}", tmp_path / f"cache{i}"
        proc = run_cli(["prepare-data", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache}",
                        *QUIET, *bad], check=False)
        assert_user_error(proc, *(f"{item.partition('=')[0]}=" for item in bad))
        assert proc.stderr.startswith("kd-ddp: error: invalid config:\n  "), proc.stderr
        assert not run_dir.exists() and not cache.exists()


# -- model.python_path never shadows what kd-ddp imports ---------------------------------

SHADOW = '''from pathlib import Path
Path(__file__).with_suffix(".imported").touch()
raise RuntimeError("the user's {name}.py was imported in place of the installed package")
'''
USER_MODEL = '''import json
from pathlib import Path

import tqdm  # the user's module gets the installed packages too
from torch import nn

from trust_layers import head  # its own file, beside it

Path(__file__).with_name("seen.json").write_text(json.dumps({"tqdm": tqdm.__file__}))


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head(4, num_classes))
'''


def write_user_dir(d: Path, shadows: tuple[str, ...]) -> Path:
    d.mkdir(parents=True)
    (d / "trust_model.py").write_text(USER_MODEL)
    (d / "trust_layers.py").write_text("from torch import nn\n\n\ndef head(cin, k):\n    return nn.Linear(cin, k)\n")
    for name in shadows:
        (d / f"{name}.py").write_text(SHADOW.format(name=name))
    return d


@pytest.mark.fast
def test_python_path_is_searched_first_for_the_users_module_only(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    user = write_user_dir(tmp_path / "user", ())
    elsewhere = tmp_path / "elsewhere"  # an earlier sys.path entry holding a module of the same name
    elsewhere.mkdir()
    (elsewhere / "trust_model.py").write_text("raise RuntimeError('not the python_path one')\n")
    monkeypatch.syspath_prepend(str(elsewhere))  # sys.path is restored after the test
    try:
        cfg = load_config("smoke", ["model.student=trust_model:build", f"model.python_path={user}"])
        model = build_model(cfg, "student", 10)  # the other trust_model.py raises on import
        # ... and stays what `import trust_model` gives the rest of the process
        assert "trust_model" not in sys.modules and sys.modules["trust_layers"].__file__.startswith(str(user))
    finally:
        for name in ("trust_model", "trust_layers"):
            sys.modules.pop(name, None)
    assert isinstance(model[-1], torch.nn.Linear) and model[-1].out_features == 10
    entry = str(user.resolve())
    assert sys.path[-1] == entry and sys.path.index(str(elsewhere)) < sys.path.index(entry)


def test_python_path_files_do_not_replace_the_packages_kd_ddp_imports(tmp_path: Path) -> None:
    """A python_path directory holding the user's model beside wandb.py, tqdm.py, yaml.py and
    filelock.py (each records that it was imported and raises): a training stage with W&B
    tracking on runs, and neither kd-ddp nor the user's module imports those files. Before
    the fix, wandb.py was imported and tracking went off ("wandb does not import")."""
    shadows = ("wandb", "tqdm", "yaml", "filelock")
    user = write_user_dir(tmp_path / "user", shadows)
    run_dir = tmp_path / "run"
    proc = run_cli(["train-student", "--mode", "normal", "--preset", "smoke", "optim.epochs=1",
                    f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", "tracking.wandb.mode=offline",
                    "model.student=trust_model:build", f"model.python_path={user}"],
                   env={"WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not [name for name in shadows if (user / f"{name}.imported").exists()]
    assert "site-packages" in json.loads((user / "seen.json").read_text())["tqdm"]
    assert (run_dir / "student-normal" / "summary.json").is_file()
    assert list(run_dir.rglob("offline-run-*")), "W&B (the installed package) logged no offline run"
