from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kd_ddp.checkpoint import atomic_write_json
from kd_ddp.config import Config, ConfigError, config_yaml, field_comments, fingerprint, from_dict, load_config
from tests.conftest import REPO

pytestmark = pytest.mark.fast  # in-process unit tests (tests/conftest.py)


def test_presets_load_and_differ() -> None:
    smoke, quick, seed = (load_config(p) for p in ("smoke", "quick", "seed"))
    assert smoke.data.source == "synthetic"
    assert quick.data.source == seed.data.source == "archive"
    assert quick.epochs_for("teacher") < seed.epochs_for("teacher")


def test_overrides_are_typed() -> None:
    cfg = load_config("smoke", ["kd.alpha=0.3", "optim.batch_size=32", "optim.nesterov=false",
                                "tracking.wandb.tags=a,b", "seed=7", "run.dir=/x/y", "data.root=/d"])
    assert cfg.kd.alpha == 0.3 and isinstance(cfg.kd.alpha, float)
    assert cfg.optim.batch_size == 32 and cfg.optim.nesterov is False
    assert cfg.tracking.wandb.tags == ["a", "b"]
    assert cfg.seed == 7 and str(cfg.run_dir) == "/x/y" and cfg.data.root == "/d"


def test_epochs_override_sets_every_stage() -> None:
    quick = load_config("quick")
    assert quick.epochs_for("teacher") != quick.epochs_for("student")
    cfg = load_config("quick", ["optim.epochs=1"])
    assert cfg.epochs_for("teacher") == cfg.epochs_for("student") == 1
    cfg = load_config("quick", ["optim.epochs=1", "optim.teacher_epochs=3"])
    assert cfg.epochs_for("teacher") == 3 and cfg.epochs_for("student") == 1


@pytest.mark.parametrize("override, message", [
    ("kd.alpha=1.5", "kd.alpha=1.5: must be in [0, 1]"),
    ("kd.temperature=0", "kd.temperature=0.0: must be > 0"),
    ("optim.epochs=0", "optim.epochs=0: must be >= 1"),
    ("optim.batch_size=0", "optim.batch_size=0: must be >= 1"),
    ("data.loader=dali", "data.loader='dali': must be one of "),
    ("optim.lr=fast", "optim.lr='fast': expected a float"),
    ("optim.nesterov=maybe", "expected a bool"),
    ("kd.alhpa=0.3", "unknown config key 'kd.alhpa' (did you mean kd.alpha?)"),
    ("kd.alpha", "is not of the form section.field=value"),
])
def test_bad_values_are_refused_clearly(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("smoke", [override])
    assert message in str(e.value)


def test_unknown_preset_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'quick'"):
        load_config("quik")


def test_round_trip_through_dict() -> None:
    cfg = load_config("quick", ["kd.alpha=0.2", "tracking.wandb.tags=x"])
    again = from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)
    assert fingerprint(again.to_dict()) == fingerprint(cfg.to_dict())


# -- config files and field comments ----------------------------------------------------


@dataclass
class _Inner:
    # a comment block directly above a field,
    # over two lines
    above: int = 1
    beside: str = "# not a comment"  # the comment after the code
    spread: list[str] = field(  # a field over several lines
        default_factory=list)

    # a heading with a blank line below it: no field's comment

    bare: float = 0.5


@dataclass
class _Outer:
    """The outer section's docstring."""

    inner: _Inner = field(default_factory=_Inner)  # the inner section
    plain: bool = True


def test_comments_come_from_the_source_wherever_they_sit() -> None:
    assert field_comments(_Outer) == {
        "inner": "the inner section",
        "inner.above": "a comment block directly above a field, over two lines",
        "inner.beside": "the comment after the code",
        "inner.spread": "a field over several lines",
    }


def test_every_commented_field_of_config_py_is_printed_with_its_comment() -> None:
    """Cross-check with a plain line scan of config.py: each `name: type = value  # comment`
    line's comment is the (end of the) comment of a field of that name in the YAML."""
    comments = field_comments()
    source = (REPO / "kd_ddp" / "config.py").read_text()
    beside = re.findall(r"^    (\w+): [^=\n]+ = [^#\n]*#\s*(.+)$", source, flags=re.M)
    assert len(beside) > 20
    for name, text in beside:
        assert any(k.rpartition(".")[2] == name and v.endswith(text.strip()) for k, v in comments.items()), name
    yaml_text = config_yaml(load_config("quick"))
    assert "# weight of hard-label CE; (1 - alpha) goes to the KL term\n  alpha: 0.5\n" in yaml_text
    assert "# Where prepared data (.npy arrays, .beton files) is kept;" in yaml_text  # a comment above its field


@pytest.mark.parametrize("preset", ["smoke", "quick", "seed"])
def test_printed_yaml_loads_back_to_the_same_config(tmp_path: Path, preset: str) -> None:
    cfg = load_config(preset, ['run.dir=/a b/"q"\\é#: x\u2028', "optim.warmup_epochs=1e-5", "tracking.wandb.tags=a,b",
                               "kd.temperature=1e22"])
    text = config_yaml(cfg, ["a header"])
    assert yaml.safe_load(text) == json.loads(json.dumps(cfg.to_dict()))  # what any YAML reader sees
    (tmp_path / "c.yaml").write_text(text)
    again = load_config(config_file=tmp_path / "c.yaml")
    assert again == cfg and json.dumps(again.to_dict()) == json.dumps(cfg.to_dict())


@pytest.mark.parametrize("preset", ["smoke", "quick", "seed"])
def test_a_run_dirs_config_json_is_a_config_file(tmp_path: Path, preset: str) -> None:
    """config.<stage>.json as run_stage writes it loads back to the same config, whichever
    preset it names, to the byte (an int in a float field, as a preset may leave, stays one)."""
    cfg = load_config(preset, ["seed=4", "kd.alpha=0.25", "train.threads=1"])
    cfg.optim.warmup_epochs = 1
    atomic_write_json(tmp_path / "config.pipeline.json", cfg.to_dict())
    again = load_config(config_file=tmp_path / "config.pipeline.json")
    assert again == cfg and json.dumps(again.to_dict()) == json.dumps(cfg.to_dict())


def test_yaml_numbers_and_bools_in_text_fields_read_as_on_the_command_line(tmp_path: Path) -> None:
    """YAML types `4` and `true`: a text field takes them as the command line's `4` and `true`."""
    (tmp_path / "c.yaml").write_text("model:\n  cifar_stem: true\nslurm:\n  teacher:\n    gpus_per_node: 4\n")
    cfg = load_config("seed", [], tmp_path / "c.yaml")
    assert cfg == load_config("seed", ["model.cifar_stem=true", "slurm.teacher.gpus_per_node=4"])


def test_preset_then_file_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "part.yaml").write_text("kd:\n  alpha: 0.3\noptim:\n  epochs: 3\n  lr: 1e-3\nrun:\n  dir: 7\n")
    cfg = load_config("quick", ["kd.temperature=2"], tmp_path / "part.yaml")
    assert cfg.model.teacher == "teacher_cnn_lite"  # the preset's, not in the file
    assert (cfg.kd.alpha, cfg.kd.temperature, cfg.optim.lr, cfg.run.dir) == (0.3, 2.0, 1e-3, "7")
    assert cfg.epochs_for("teacher") == cfg.epochs_for("student") == 3  # optim.epochs in a file sets every stage
    assert load_config("quick", ["kd.alpha=0.4"], tmp_path / "part.yaml").kd.alpha == 0.4
    (tmp_path / "smoke.json").write_text(json.dumps({"preset": "smoke", "seed": 5}))
    cfg = load_config(None, ["optim.epochs=1"], tmp_path / "smoke.json")
    assert (cfg.preset, cfg.data.source, cfg.seed, cfg.epochs_for("teacher")) == ("smoke", "synthetic", 5, 1)
    with pytest.raises(ConfigError, match="preset 'quick' was asked for but .* made with preset 'smoke'"):
        load_config("quick", [], tmp_path / "smoke.json")


@pytest.mark.parametrize("name, text, message", [
    ("a.json", '{"kd": {"alhpa": 0.3}, "nope": 1}',
     "unknown config key(s) 'kd.alhpa' (did you mean kd.alpha?), 'nope'"),
    ("a.yaml", "kd: 0.3\n", "kd is a section: expected a mapping of its fields, got 0.3"),
    ("a.yaml", "optim:\n  batch_size: many\n", "optim.batch_size='many': expected an int"),
    ("a.yaml", "data:\n  flip: 3\n", "data.flip: expected a bool, got 3"),
    ("a.yaml", "run:\n  dir: [a, b]\n", "run.dir: expected a str, got ['a', 'b']"),
    ("a.yaml", "kd: [1\n", "is not valid YAML"),
    ("a.json", '{"kd": ', "is not valid JSON: Expecting value (line 1, column 8)"),
    ("a.yaml", "- 1\n- 2\n", "expected a mapping of sections and fields, got list"),
    ("a.yaml", "kd:\n  alpha: 2\n", "kd.alpha=2: must be in [0, 1]"),
])
def test_bad_config_files_are_refused_clearly(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config("smoke", [], tmp_path / name)
    assert message in str(e.value)
    assert (str(tmp_path / name) in str(e.value)) == ("must be in" not in message)  # file errors name the file


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'no.yaml'} does not exist"):
        load_config("smoke", [], tmp_path / "no.yaml")
