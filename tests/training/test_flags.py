"""Flags declared once: argparse, YAML presets and the web app's validation agree."""

import pytest

from training.flags import ConfigError, Flag, FlagSet

FLAGS = FlagSet(
    "demo",
    [
        Flag("depth", int, 20, "model depth", min=1, max=64),
        Flag("matrix_lr", float, 0.02, "Muon learning rate", min=0),
        Flag("window_pattern", str, "SSSL", "attention windows"),
        Flag("device", str, "auto", "device", choices=("auto", "cpu", "cuda")),
        Flag("compile", bool, False, "torch.compile the model"),
        Flag("data_dir", str, None, "shards", path=True),
    ],
)


def test_defaults_and_cli_overrides():
    config = FLAGS.parse(["--depth", "4", "--matrix-lr", "0.05", "--compile"])
    assert config == {
        "depth": 4, "matrix_lr": 0.05, "window_pattern": "SSSL", "device": "auto",
        "compile": True, "data_dir": None,
    }  # fmt: skip
    assert FLAGS.parse(["--no-compile"])["compile"] is False


def test_preset_then_cli_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("depth: 8\nmatrix-lr: 1e-2\ndevice: cpu\n")
    config = FLAGS.parse(["--config", str(preset), "--depth", "6"])
    assert (config["depth"], config["matrix_lr"], config["device"]) == (6, 0.01, "cpu")


def test_validate_names_every_bad_field():
    with pytest.raises(ConfigError) as info:
        FLAGS.validate({"depth": "four", "matrix_lr": -1, "device": "tpu", "colour": "red",
                        "compile": "maybe"})  # fmt: skip
    errors = info.value.errors
    assert errors["depth"] == "must be an integer, got 'four'"
    assert errors["matrix_lr"] == "must be >= 0, got -1.0"
    assert errors["device"].startswith("must be one of auto, cpu, cuda")
    assert errors["colour"].startswith("unknown setting for demo")
    assert errors["compile"] == "must be true or false, got 'maybe'"


def test_numbers_from_json_and_yaml_are_converted_exactly():
    assert FLAGS.validate({"depth": 2e1})["depth"] == 20
    assert FLAGS.validate({"depth": "3"})["depth"] == 3
    with pytest.raises(ConfigError, match="must be an integer"):
        FLAGS.validate({"depth": 2.5})
    with pytest.raises(ConfigError, match="must be an integer"):
        FLAGS.validate({"depth": True})
    with pytest.raises(ConfigError, match="must be finite"):
        FLAGS.validate({"matrix_lr": "nan"})


def test_cli_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        FLAGS.parse(["--depth", "0"])
    assert info.value.code == 2
    assert "depth: must be >= 1, got 0" in capsys.readouterr().err


def test_bad_preset_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        FLAGS.load_config_file(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("depth: -3\n")
    with pytest.raises(ConfigError) as info:
        FLAGS.load_config_file(wrong)
    assert info.value.errors == {"wrong.yaml:depth": "must be >= 1, got -3"}
    with pytest.raises(ConfigError, match="no such file or preset 'nope'"):
        FLAGS.load_config_file("nope")
