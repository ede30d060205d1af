"""The training config schema, the YAML configs in configs/, and `adcert train`'s argument errors."""
from __future__ import annotations

import pathlib

import pytest
import yaml

from adcert.train.config import Config, ConfigError, from_dict, load_config

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.train.grad_clip == 10.0 and cfg.train.lr == 5e-4


@pytest.mark.parametrize("values, key", [
    ({"trian": {}}, "trian"),                                  # unknown section
    ({"train": {"epochz": 3}}, "train.epochz"),                # unknown key in a section
    ({"train": {"epochs": "three"}}, "train.epochs"),          # wrong type
    ({"train": {"epochs": 2.5}}, "train.epochs"),              # float for an int
    ({"data": {"augment": "yes"}}, "data.augment"),            # string for a bool
    ({"train": {"lr_milestones": 5}}, "train.lr_milestones"),  # scalar for a list
    ({"train": {"eps": "big"}}, "train.eps"),
    ({"train": {"epochs": 0}}, "train.epochs"),                # bad values
    ({"train": {"eps": -0.1}}, "train.eps"),
    ({"train": {"bn_mode": "sync"}}, "train.bn_mode"),
    ({"train": {"lr_milestones": [60, 50]}}, "train.lr_milestones"),
    ({"data": {"batch_size": 10}, "train": {"grad_accum": 4}}, "data.batch_size"),
    ({"method": {"teacher": "/nonexistent/teacher.pt"}}, "method.teacher"),
    ({"model": "cnn7"}, "model"),                              # a scalar for a section
])
def test_bad_config_names_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        from_dict(values)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_fraction_strings_and_ints_for_floats():
    cfg = from_dict({"train": {"eps": "8/255", "lr": 1}, "eval": {"eps": "2 / 255"}})
    assert cfg.train.eps == pytest.approx(8 / 255) and cfg.eval_eps == pytest.approx(2 / 255)
    assert isinstance(cfg.train.lr, float)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}, "method": {"name": "ibp"}}))
    cfg = load_config(str(path), ["train.epochs=5", "method.hparams.w_rob=0.7",
                                  "train.lr_milestones=[2, 4]", "eval.eps=2/255", "seed=3"])
    assert cfg.train.epochs == 5 and cfg.seed == 3
    assert cfg.method.hparams == {"w_rob": 0.7}
    assert cfg.train.lr_milestones == [2, 4]
    assert cfg.eval_eps == pytest.approx(2 / 255)
    with pytest.raises(ConfigError, match=r"^train\.epochz:"):
        load_config(str(path), ["train.epochz=5"])
    with pytest.raises(ConfigError, match=r"^train\.epochs:"):
        load_config(str(path), ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(str(path), ["train.epochs"])
    with pytest.raises(ConfigError, match=r"^train\.epochs: is not a section"):
        load_config(str(path), ["train.epochs.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_unknown_method_hparam_and_model_kwarg_are_named(tmp_path):
    from adcert.train import Trainer

    base = {"data": {"dataset": "digits", "batch_size": 32}, "model": {"name": "cnn3"},
            "output_dir": str(tmp_path), "log": {"progress": False}}
    with pytest.raises(ConfigError, match=r"^method\.hparams:.*bogus"):
        Trainer(from_dict({**base, "method": {"name": "ibp", "hparams": {"bogus": 1}}}))
    with pytest.raises(ConfigError, match=r"^method\.name:.*nosuch"):
        Trainer(from_dict({**base, "method": {"name": "nosuch"}}))
    with pytest.raises(ConfigError, match=r"^model:.*depth"):
        Trainer(from_dict({**base, "model": {"name": "cnn3", "kwargs": {"depth": 3}}}))
    with pytest.raises(ConfigError, match=r"^method\.teacher:.*needs a teacher"):
        Trainer(from_dict({**base, "method": {"name": "adcert"}}))


def test_cli_reports_config_errors(tmp_path, capsys):
    from adcert.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    assert main(["train", "--config", str(path), "--set", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err
    missing = {"method": {"name": "adcert", "teacher": str(tmp_path / "no_teacher.pt")}}
    path.write_text(yaml.safe_dump(missing))
    assert main(["train", "--config", str(path)]) == 2
    assert "method.teacher:" in capsys.readouterr().err


def test_one_fraction_parser_for_configs_and_command_lines():
    import argparse

    from adcert.train.config import number_arg, parse_number

    assert parse_number("2/255") == 2 / 255 == load_config(None, ["train.eps=2/255"]).train.eps
    assert parse_number(" 1e-1 ") == 0.1 and number_arg("8/255") == 8 / 255
    for bad in ("1/0", "a/b", "", "2/255/1"):
        with pytest.raises(ValueError, match="expected a number or a fraction like 2/255"):
            parse_number(bad)
        with pytest.raises(argparse.ArgumentTypeError, match="fraction like 2/255"):
            number_arg(bad)


def test_cli_missing_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch):
    """A missing optional package used to end ``adcert train`` in an ImportError traceback."""
    import sys

    from adcert.cli import main

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None makes the import fail
    monkeypatch.setitem(sys.modules, "sklearn", None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "train": {"epochs": 1},
                                    "output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "adcert train: dataset 'digits' needs scikit-learn, which is not installed: "
        "pip install scikit-learn"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path, monkeypatch):
    """Every config in configs/ is valid against the schema (the teacher file, produced by
    another run, is not required to exist here) and names a registered method whose
    hyper-parameters it accepts."""
    from adcert.methods import METHODS

    raw = yaml.safe_load(path.read_text())
    raw.get("method", {}).pop("teacher", None)
    cfg = from_dict(raw)
    assert cfg.method.name in METHODS, cfg.method.name
    known = METHODS[cfg.method.name].hyperparameters()
    assert set(cfg.method.hparams) <= set(known), set(cfg.method.hparams) - set(known)
    assert cfg.train.eps > 0
