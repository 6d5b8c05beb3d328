from __future__ import annotations

import pytest

from kd_ddp.config import Config, ConfigError, fingerprint, from_dict, load_config


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
    ("data.loader=dali", "data.loader='dali': must be one of auto, ffcv, torch, device"),
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
