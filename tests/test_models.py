"""Models beyond the seed's CNNs: torchvision builders by name, a user's module by import
path, a teacher adopted from a file, and checkpoints read with torch.load(weights_only=True).

The unit tests (marked fast) build models in process; the others run the real CLI
(`run_cli`), under torchrun where it says so, on small synthetic data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kd_ddp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kd_ddp.config import ConfigError, describe_differences, fingerprint, load_config
from kd_ddp.data import PreparedData
from kd_ddp.fingerprints import accepted_fingerprints, stage_fingerprint
from kd_ddp.models import ConvNet, architecture, build_model, check_output, model_facts
from kd_ddp.teachers import read_teacher_weights
from tests.conftest import REPO, assert_user_error, run_cli

fast = pytest.mark.fast

# 16x16 synthetic images, 256 of them, one epoch: a torchvision ResNet-18 trains in seconds.
SMALL = ["--preset", "smoke", "data.image_size=16", "data.synthetic_train=256", "data.synthetic_test=128",
         "optim.epochs=1", "kd.views=1", "tracking.wandb.mode=disabled", "tracking.progress=false"]

# A user's model file, as the README shows one: build(num_classes, width) -> nn.Module.
TINY_NET = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build(num_classes: int, width: int = 8) -> nn.Module:
    return TinyNet(num_classes, width)
'''


def tiny_net_params(width: int, classes: int) -> int:
    """TinyNet's parameters by hand: conv weights and bias, BatchNorm's scale and shift, the head."""
    return 3 * width * 9 + width + 2 * width + width * classes + classes


def _cfg(*overrides: str):
    return load_config("smoke", ["tracking.wandb.mode=disabled", *overrides])


def _summary(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- building (in process) ----------------------------------------------------------------


@fast
def test_resnet_gets_the_cifar_stem_on_small_images_only() -> None:
    """auto: at 32 px the 7x7 stride-2 conv becomes 3x3 stride 1 and the max-pool goes; at 96 px
    torchvision's stem stays; model.cifar_stem=false keeps it at 32 px too."""
    small = build_model(_cfg("model.teacher=torchvision:resnet18"), "teacher", 10)
    assert (small.conv1.kernel_size, small.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model(_cfg("model.teacher=torchvision:resnet18", "data.image_size=96"), "teacher", 10)
    off = build_model(_cfg("model.teacher=torchvision:resnet18", "model.cifar_stem=false"), "teacher", 10)
    for model in (large, off):
        assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
        assert isinstance(model.maxpool, nn.MaxPool2d)
    plain = torchvision.models.resnet18(num_classes=10)
    assert _params(off) == _params(plain)
    assert _params(small) == _params(plain) - 64 * 3 * (7 * 7 - 3 * 3)  # only conv1's kernel shrank


@fast
def test_torchvision_kwargs_reach_the_builder_and_the_stem_adapts_mobilenet() -> None:
    model = build_model(_cfg("model.student=torchvision:mobilenet_v3_small", 'model.student_kwargs={"dropout": 0.5}'),
                        "student", 7)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1) and first.kernel_size == (3, 3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert model.classifier[-1].out_features == 7


@fast
def test_forcing_the_cifar_stem_on_a_patchify_stem_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.teacher: model.cifar_stem=true: torchvision:convnext_tiny has no "
                                          r"stride-2 stem to adapt \(its first conv has stride \(4, 4\)\)"):
        build_model(_cfg("model.teacher=torchvision:convnext_tiny", "model.cifar_stem=true"), "teacher", 10)


@fast
def test_the_output_check_leaves_weights_buffers_mode_and_random_stream_as_they_were() -> None:
    torch.manual_seed(0)
    model = ConvNet(blocks=2, convs=1, width=4, hidden=8, num_classes=3, image_size=16, dropout=0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_output(model, "convnet", 3, 16)  # runs BatchNorm and dropout in training mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    with pytest.raises(ConfigError, match=r"convnet: on a \[2, 3, 16, 16\] batch in training mode the model gives "
                                          r"shape \[2, 3\], expected \[2, 5\]"):
        check_output(model, "convnet", 5, 16)


class _Views(nn.Module):
    """A conv, then .view() to flatten: works on contiguous tensors, not on channels_last ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(len(y), -1))


@fast
def test_the_output_check_feeds_the_memory_format_training_uses() -> None:
    check_output(_Views(), "views", 5, 8)
    with pytest.raises(ConfigError, match=r"views: a forward pass on a \[2, 3, 8, 8\] batch in training mode failed: "
                                          r"RuntimeError: .* train.channels_last=true gives it channels_last tensors"):
        check_output(_Views(), "views", 5, 8, channels_last=True)


@fast
def test_multiply_adds_of_the_seed_teacher_match_its_layers() -> None:
    """flop_counter's count against the conv and linear layers' multiply-adds, summed here."""
    cfg = _cfg("model.teacher=teacher_cnn", "model.teacher_width=8", "model.teacher_hidden=32")
    model = build_model(cfg, "teacher", 10)
    side, macs = cfg.data.image_size, 0
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            macs += side * side * layer.out_channels * layer.in_channels * 9
        elif isinstance(layer, nn.MaxPool2d):
            side //= 2
        elif isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
    assert model_facts(model, cfg.data.image_size) == {"params": _params(model), "macs_per_image": macs}


@fast
def test_the_readme_example_module_builds(tmp_path: Path) -> None:
    """The copy-paste example of README's "Your own models", written to a directory on
    model.python_path and built by its README name, as a run would."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own models"):]
    code = re.search(r"```python\n# (\w+)\.py\n(.*?)```", section, re.S)
    assert code, "no ```python block starting with '# <name>.py' in README's 'Your own models'"
    (tmp_path / f"{code.group(1)}.py").write_text(code.group(2))
    name = re.search(r"model\.student=(\w+:\w+)", section).group(1)
    model = build_model(_cfg(f"model.student={name}", f"model.python_path={tmp_path}"), "student", 10)
    assert isinstance(model, nn.Module)


@fast
def test_the_strong_preset_distills_a_cifar_resnet18_into_the_seed_student() -> None:
    strong, seed_gpu = load_config("strong"), load_config("seed-gpu")
    teacher = build_model(strong, "teacher", 10)
    assert strong.model.teacher == "torchvision:resnet18" and teacher.conv1.stride == (1, 1)  # CIFAR stem
    student = ("student", "student_width", "student_hidden", "dropout")  # the seed's student, unchanged
    assert all(getattr(strong.model, f) == getattr(seed_gpu.model, f) for f in student)
    assert strong.optim.lr == pytest.approx(0.1 * strong.optim.batch_size / 128)  # linear scaling from 0.1 per 128
    rule = seed_gpu.lr_for("student") * (strong.optim.batch_size / seed_gpu.optim.batch_size) ** 0.5
    assert strong.lr_for("student") == pytest.approx(rule, abs=0.005)  # the students: seed-gpu's sqrt rule
    assert strong.kd.views == strong.epochs_for("student")  # a fresh cached view every student epoch
    assert strong.data.source == "archive" and strong.optim.label_smoothing == 0


# -- fingerprints and checkpoints (in process) ----------------------------------------------


@fast
def test_the_fingerprint_names_the_architecture_and_only_the_fields_that_apply() -> None:
    data = PreparedData(Path("."), {"content_hash": "h", "classes": list("abcdefghij")})
    seed = stage_fingerprint(_cfg(), "student-normal", data, "off")
    tv = stage_fingerprint(_cfg("model.student=torchvision:mobilenet_v3_small", "model.student_width=99",
                                'model.student_kwargs={"dropout": 0.1}'), "student-normal", data, "off")
    assert seed["model"] == ["student_cnn", 4, 16, 0.25]  # as every earlier checkpoint recorded it
    assert tv["model"] == {"arch": "torchvision:mobilenet_v3_small", "kwargs": {"dropout": 0.1}, "cifar_stem": True}
    assert describe_differences(tv, seed, have_name="checkpoint has") == [
        f"model: checkpoint has {seed['model']!r}, this run needs {tv['model']!r}"]
    assert "sync_bn" not in seed
    # auto: the stem is recorded as on only for a model it applies to (a stride-2 first conv)
    patchify = architecture(_cfg("model.teacher=torchvision:convnext_tiny"), "teacher")
    assert patchify == {"arch": "torchvision:convnext_tiny", "kwargs": {}, "cifar_stem": False}
    assert stage_fingerprint(_cfg("train.sync_bn=true"), "student-normal", data, "off")["sync_bn"] is True


@fast
def test_a_stage_fingerprint_holds_its_own_epochs_and_lr_not_the_other_roles() -> None:
    data = PreparedData(Path("."), {"content_hash": "h", "classes": list("abcdefghij")})
    base = _cfg("optim.lr=0.4", "optim.epochs=3")
    students = _cfg("optim.lr=0.4", "optim.epochs=3", "optim.student_lr=0.2", "optim.student_epochs=5",
                    "optim.student_warmup_epochs=2")
    teacher_b = stage_fingerprint(students, "teacher", data, "off")
    assert stage_fingerprint(base, "teacher", data, "off") == teacher_b  # a student sweep keeps its teacher
    assert teacher_b["optim"]["lr"] == 0.4 and teacher_b["optim"]["epochs"] == 3
    student = stage_fingerprint(students, "student-kd", data, "off")
    assert (student["optim"]["lr"], student["optim"]["epochs"], student["optim"]["warmup_epochs"]) == (0.2, 5, 2)
    assert student != stage_fingerprint(base, "student-kd", data, "off")
    teacher_c = stage_fingerprint(_cfg("optim.lr=0.4", "optim.epochs=3", "optim.teacher_epochs=4"), "teacher", data,
                                  "off")
    assert teacher_c != teacher_b and teacher_c["optim"]["epochs"] == 4


@fast
def test_stages_recorded_before_the_per_role_fingerprint_stay_valid() -> None:
    """Until 2026-11-29 a stage's optim part held every optim field but the per-stage epochs
    (optim.student_lr included): what such a run recorded is still accepted, with the same
    student_lr, and not with another."""
    data = PreparedData(Path("."), {"content_hash": "h", "classes": list("abcdefghij")})
    cfg = _cfg("optim.lr=0.4")
    for stage, role in (("teacher", "teacher"), ("student-normal", "student")):
        fp = stage_fingerprint(cfg, stage, data, "off")
        fields = vars(cfg.optim)
        old_optim = {k: v for k, v in fields.items() if k not in ("teacher_epochs", "student_epochs",
                                                                  "student_warmup_epochs")}
        old = fp | {"optim": old_optim | {"epochs": cfg.epochs_for(role), "lr": cfg.lr_for(role)}}
        assert fingerprint(old) in accepted_fingerprints(fp, cfg.optim.student_lr)
        assert fingerprint(old) not in accepted_fingerprints(fp, 0.3)


class _Runs:
    """An object whose unpickling calls os.mkdir(path): what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def _booby_trapped(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Runs(marker)}, path)
    return path


@fast
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ckpt = _booby_trapped(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match=r"needs more than tensors and plain data to load: its pickle asks for "
                                              r"posix\.mkdir"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the trap is real: the unsafe load runs it
    assert marker.is_dir()


@fast
def test_a_checkpoint_as_the_trainer_writes_it_loads_weights_only(tmp_path: Path) -> None:
    """Model, fused SGD, LambdaLR, GradScaler, per-rank RNG states, config and fingerprint
    fields: what Trainer.save puts in a checkpoint, all tensors and plain data."""
    cfg = _cfg()
    model = build_model(cfg, "student", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    data = PreparedData(Path("."), {"content_hash": "h", "classes": list("abcdefghij")})
    fp = stage_fingerprint(cfg, "student-normal", data, "off")
    save_checkpoint(tmp_path / "c.pt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": [{"cpu": torch.get_rng_state(), "cuda": None}] * 2, "epoch": 0,
        "step_in_epoch": 3, "partial": {"loss_sum": 1.5, "seen": 64.0, "time_s": 0.1}, "nonfinite_steps": 0,
        "fingerprint": "f", "fingerprint_fields": fp, "config": cfg.to_dict(), "num_classes": 10})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["config"] == cfg.to_dict() and state["fingerprint_fields"] == fp
    assert torch.equal(state["rng"][1]["cpu"], torch.get_rng_state())


@fast
def test_teacher_weights_are_read_from_a_state_dict_a_ddp_state_dict_or_a_kd_ddp_checkpoint(tmp_path: Path) -> None:
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({f"module.{k}": v for k, v in weights.items()}, tmp_path / "ddp.pt")
    torch.save({"model": weights, "epoch": 3}, tmp_path / "kd.pt")
    for name in ("plain.pt", "ddp.pt", "kd.pt"):
        got = read_teacher_weights(tmp_path / name)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_teacher_weights(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_teacher_weights(tmp_path / "missing.pt")


# -- the real CLI -------------------------------------------------------------------------


def test_torchvision_teacher_and_student_pipeline(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(["pipeline", *SMALL, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
             "model.teacher=torchvision:resnet18", "model.student=torchvision:mobilenet_v3_small"])
    resnet = torchvision.models.resnet18(num_classes=10)
    expected = {"teacher": _params(resnet) - 64 * 3 * (7 * 7 - 3 * 3),  # CIFAR stem: conv1 7x7 -> 3x3
                "student-normal": _params(torchvision.models.mobilenet_v3_small(num_classes=10))}
    expected["student-kd"] = expected["student-normal"]  # a 3x3 stem conv stays 3x3: same count
    for stage, params in expected.items():
        s = _summary(run_dir, stage)
        assert s["model"]["params"] == params and s["model"]["macs_per_image"] > 0
        assert s["model"]["name"].endswith("(CIFAR stem)")
        assert 0 <= s["test_acc"] <= 1
    teacher = torch.load(run_dir / "teacher" / "checkpoint.pt", weights_only=True)
    assert teacher["model"]["conv1.weight"].shape == (64, 3, 3, 3)
    md = (run_dir / "report" / "report.md").read_text()
    assert "| Teacher (CE) | torchvision:resnet18 (CIFAR stem) | 11.17 M |" in md
    assert "| Student (KD) | torchvision:mobilenet_v3_small (CIFAR stem) | 1.53 M |" in md


def test_two_process_torchrun_with_a_torchvision_teacher_and_a_user_module_student(tmp_path: Path,
                                                                                  cache_dir: Path) -> None:
    """The user's module lies in the test's temp dir, named by model.python_path: every rank
    imports it from the config, nothing in the environment points there."""
    (tmp_path / "models_dir").mkdir()
    (tmp_path / "models_dir" / "tinynet.py").write_text(TINY_NET)
    run_dir = tmp_path / "run"
    run_cli(["pipeline", *SMALL, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
             "model.teacher=torchvision:resnet18", "model.student=tinynet:build", 'model.student_kwargs={"width": 6}',
             f"model.python_path={tmp_path / 'models_dir'}"], torchrun=2)
    for stage in ("teacher", "student-normal", "student-kd"):
        assert _summary(run_dir, stage)["world_size"] == 2
    kd = _summary(run_dir, "student-kd")
    assert kd["model"] | {"macs_per_image": 0} == {"name": 'tinynet:build ({"width": 6})', "arch": "tinynet:build",
                                                  "params": tiny_net_params(6, 10), "macs_per_image": 0}
    assert _summary(run_dir, "teacher")["model"]["arch"] == "torchvision:resnet18"


MODULES = {
    "tinynet.py": TINY_NET,
    "broken.py": "from torch import nn\n\ndef build(num_classes):\n    return nn.Linear(\n",
    "notmodule.py": "def build(num_classes):\n    return {'classes': num_classes}\n",
    "hardcoded.py": TINY_NET.replace("nn.Linear(width, num_classes)", "nn.Linear(width, 3)"),
    "raises.py": "def build(num_classes, width=8):\n    raise ValueError('width must be even')\n",
}


@pytest.mark.parametrize("override, message", [
    ("model.teacher=resnet18", "unknown model 'resnet18' (a torchvision model is written torchvision:resnet18)"),
    ("model.teacher=torchvision:resnet19", "model.teacher: 'torchvision:resnet19' is not a torchvision "
                                           "classification model (did you mean torchvision:resnet18"),
    ("model.student=nosuchmodule:build", "model.student: nosuchmodule:build: no module named 'nosuchmodule' on the "
                                         "Python path; put the directory that holds it in model.python_path"),
    ("model.student=broken:build", "model.student: broken:build: importing broken failed: SyntaxError: "),
    ("model.student=tinynet:make", "module tinynet ({dir}/tinynet.py) has no attribute 'make'"),
    ("model.student=notmodule:build", "model.student: notmodule:build(num_classes=10) returned a dict, not a "
                                      "torch.nn.Module"),
    ("model.student=hardcoded:build", "model.student: hardcoded:build: on a [2, 3, 32, 32] batch in training mode "
                                      "the model gives shape [2, 3], expected [2, 10] (batch, num_classes)"),
    ("model.student=raises:build", "model.student: raises:build(num_classes=10) failed: ValueError: width must be "
                                   "even (at {dir}/raises.py:2)"),
])
def test_a_bad_model_stops_the_run_before_data_preparation(tmp_path: Path, override: str, message: str) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    for name, text in MODULES.items():
        (models_dir / name).write_text(text)
    cache = tmp_path / "cache"
    proc = run_cli(["pipeline", "--preset", "smoke", f"run.dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                    "tracking.wandb.mode=disabled", f"model.python_path={models_dir}", override], check=False)
    assert_user_error(proc, message.format(dir=models_dir))
    assert not cache.exists() and not (tmp_path / "run").exists()  # nothing prepared, nothing written


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    args = ["train-student", "--mode", "normal", *SMALL, f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    run_cli(args)
    proc = run_cli([*args, "model.student=torchvision:mobilenet_v3_small"], check=False)
    assert_user_error(proc, "student-normal/checkpoint.pt was made with another config",
                      "model: checkpoint has ['student_cnn', 4, 16, 0.25], this run needs {'arch': "
                      "'torchvision:mobilenet_v3_small', 'kwargs': {}, 'cifar_stem': True}")


def test_a_teacher_adopted_from_a_state_dict_is_distilled_without_training(smoke_run: Path, tmp_path: Path,
                                                                          cache_dir: Path) -> None:
    """smoke_run's trained teacher, saved as a plain state_dict, becomes another run's teacher:
    train-teacher evaluates it (the accuracy its own run measured), the cache is keyed by its
    weights, and the KD student learns from it."""
    trained = torch.load(smoke_run / "teacher" / "checkpoint.pt", weights_only=True)["model"]
    torch.save(trained, tmp_path / "teacher.pt")
    run_dir = tmp_path / "run"
    args = ["pipeline", "--preset", "smoke", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
            "tracking.wandb.mode=disabled", f"model.teacher_checkpoint={tmp_path / 'teacher.pt'}"]
    proc = run_cli(args)
    assert "teacher: adopted" in proc.stderr and "teacher epoch" not in proc.stderr
    own, adopted = _summary(smoke_run, "teacher"), _summary(run_dir, "teacher")
    assert adopted["epochs"] == 0 and adopted["adopted_from"] == str(tmp_path / "teacher.pt")
    assert adopted["test_acc"] == own["test_acc"] and adopted["weights_hash"] == own["weights_hash"]
    assert (run_dir / "teacher" / "metrics.jsonl").read_text() == ""
    assert "| Teacher (CE) | teacher_cnn (width 8, hidden 32) (adopted, not trained here) |" in (
        run_dir / "report" / "report.md").read_text()
    manifest = json.loads((run_dir / "teacher-logits" / "manifest.json").read_text())
    assert manifest["key"]["teacher_weights"] == own["weights_hash"]
    # the same teacher weights, the same cached logits: the very KD student of the run that trained it
    assert _summary(run_dir, "student-kd")["weights_hash"] == _summary(smoke_run, "student-kd")["weights_hash"]
    assert "already adopted" in run_cli(args).stderr  # a rerun finds it done
    # the same teacher given as kd-ddp's own checkpoint file
    other = tmp_path / "from-checkpoint"
    run_cli(["train-teacher", "--preset", "smoke", f"run.dir={other}", f"data.cache_dir={cache_dir}",
             "tracking.wandb.mode=disabled", f"model.teacher_checkpoint={smoke_run / 'teacher' / 'checkpoint.pt'}"])
    assert _summary(other, "teacher")["test_acc"] == own["test_acc"]


def test_adopting_never_overwrites_a_trained_teacher(smoke_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    import shutil

    shutil.copytree(smoke_run / "teacher", tmp_path / "teacher")
    torch.save(torch.load(smoke_run / "teacher" / "checkpoint.pt", weights_only=True)["model"], tmp_path / "t.pt")
    before = (tmp_path / "teacher" / "checkpoint.pt").read_bytes()
    proc = run_cli(["train-teacher", "--preset", "smoke", f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "tracking.wandb.mode=disabled", f"model.teacher_checkpoint={tmp_path / 't.pt'}"], check=False)
    assert_user_error(proc, "teacher/checkpoint.pt was made with another config")
    assert (tmp_path / "teacher" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("where", ["model.teacher_checkpoint", "the run dir's teacher checkpoint"])
def test_a_booby_trapped_checkpoint_is_refused_through_the_cli(tmp_path: Path, cache_dir: Path,
                                                               where: str) -> None:
    marker = tmp_path / "ran"
    common = ["--preset", "smoke", f"run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
              "tracking.wandb.mode=disabled"]
    if where == "model.teacher_checkpoint":
        trap = _booby_trapped(tmp_path / "teacher.pt", marker)
        proc = run_cli(["train-teacher", *common, f"model.teacher_checkpoint={trap}"], check=False)
    else:
        (tmp_path / "run" / "teacher").mkdir(parents=True)
        (tmp_path / "run" / "teacher" / "summary.json").write_text("{}")
        trap = _booby_trapped(tmp_path / "run" / "teacher" / "checkpoint.pt", marker)
        proc = run_cli(["cache-logits", *common], check=False)
    assert_user_error(proc, f"{trap} needs more than tensors and plain data to load: its pickle asks for posix.mkdir")
    assert not marker.exists()


def test_sync_bn_on_cpu_ranks_is_refused_before_training(tmp_path: Path, cache_dir: Path) -> None:
    proc = run_cli(["train-teacher", *SMALL, f"run.dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "train.sync_bn=true"], torchrun=2, check=False)
    assert proc.returncode != 0
    assert "train.sync_bn=true needs CUDA devices: torch's SyncBatchNorm does not run on cpu (2 ranks here)" \
        in proc.stderr
    assert not (tmp_path / "teacher").exists()
