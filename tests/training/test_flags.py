"""Flags declared once: argparse, YAML presets and the web app's validation agree."""

import pytest

from training.flags import INT64_MAX, MAX_STRING_LENGTH, ConfigError, Flag, FlagSet

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


# ---- every program's flags are bounded ------------------------------------------------------


def all_flagsets() -> list[FlagSet]:
    """Every FlagSet a user or the web app can reach: each run kind's program, the dataset
    and report commands, and tok_eval (run by the tokenizer kind after tok_train)."""
    from runs.programs import PROGRAMS
    from training import dataset, report, tok_eval

    sets = {id(p.flags): p.flags for p in PROGRAMS.values()}
    for flagset in [*dataset.COMMANDS.values(), *report.COMMANDS.values(), tok_eval.FLAGS]:
        sets[id(flagset)] = flagset
    return list(sets.values())


FLAGSETS = all_flagsets()


@pytest.mark.parametrize("flagset", FLAGSETS, ids=[f.program for f in FLAGSETS])
def test_every_numeric_flag_declares_a_range_holding_its_default(flagset):
    help_text = " ".join(flagset.parser().format_help().split())  # unwrapped
    for flag in flagset.flags:
        if flag.type in (int, float):
            assert flag.min is not None and flag.max is not None, f"{flag.name} has no range"
            # ...or "auto", which may lie outside it (Flag.auto).
            assert flag.min <= flag.default <= flag.max or flag.default == flag.auto, flag.name
            # The range reaches the user: --help states it.
            assert f"range {flag.min:g}.." in help_text, flag.name
        if flag.type is int:
            assert flag.min >= -INT64_MAX and flag.max <= INT64_MAX, flag.name
        if flag.type is str and not flag.path:
            assert 0 < flag.max_length <= MAX_STRING_LENGTH, flag.name


@pytest.mark.parametrize("flagset", FLAGSETS, ids=[f.program for f in FLAGSETS])
def test_every_preset_still_validates(flagset):
    for name in flagset.presets():
        flagset.validate(flagset.load_config_file(name))


def test_the_ranges_cover_real_gpu_runs():
    from training import base_train, pipeline, tok_train

    big = base_train.FLAGS.validate(
        {"depth": 32, "max_seq_len": 65536, "num_iterations": 10**9, "total_batch_size": 2**20,
         "target_flops": 1e24, "eval_tokens": 10**10}
    )  # fmt: skip
    assert big["depth"] == 32 and big["max_seq_len"] == 65536
    assert tok_train.FLAGS.validate({"vocab_size": 2**21})["vocab_size"] == 2**21
    assert pipeline.FLAGS.validate({"nproc_per_node": 8, "dataset_download_shards": 1823})


# ---- values that cannot be stored or would make work unbounded -----------------------------

UNBOUNDED = FlagSet(
    "unbounded",
    [
        Flag("count", int, 0, "an int without a declared range"),
        Flag("ratio", float, 0.0, "a float without a declared range"),
        Flag("text", str, "", "free text"),
        Flag("short", str, "", "a short string", max_length=8),
    ],
)


@pytest.mark.parametrize("value", [2**63, -(2**63), 10**30, "9" * 40, 1e300, "1e40"])
def test_integers_never_leave_the_int64_range(value):
    with pytest.raises(ConfigError) as info:
        UNBOUNDED.validate({"count": value})
    assert info.value.errors["count"].startswith("must be between")
    assert UNBOUNDED.validate({"count": INT64_MAX})["count"] == INT64_MAX
    assert UNBOUNDED.validate({"count": -INT64_MAX})["count"] == -INT64_MAX


def test_numbers_too_big_for_a_float_are_field_errors():
    with pytest.raises(ConfigError) as info:
        UNBOUNDED.validate({"ratio": 10**400})
    assert info.value.errors["ratio"].startswith("must be a number")


def test_an_int_with_more_digits_than_python_converts_is_a_field_error():
    with pytest.raises(ConfigError) as info:
        UNBOUNDED.validate({"count": "9" * 5000, "text": 10**5000})
    assert set(info.value.errors) == {"count", "text"}
    assert all(len(m) < 200 for m in info.value.errors.values())


@pytest.mark.parametrize("text", ["a\x00b", "a\tb", "line\nbreak", "\x1b[31m", "\x7f", "\x85",
                                  "x\ud800"])  # fmt: skip
def test_strings_with_control_characters_are_refused(text):
    with pytest.raises(ConfigError) as info:
        UNBOUNDED.validate({"text": text})
    assert "control characters" in info.value.errors["text"]


def test_strings_are_bounded_in_length_and_the_value_is_not_echoed():
    assert UNBOUNDED.validate({"text": "é" * MAX_STRING_LENGTH})["text"] == "é" * 1000
    assert UNBOUNDED.validate({"short": "12345678"})["short"] == "12345678"
    with pytest.raises(ConfigError) as info:
        UNBOUNDED.validate({"text": "x" * 10_000_000, "short": "123456789"})
    assert info.value.errors == {
        "text": f"must be at most {MAX_STRING_LENGTH} characters, got 10000000",
        "short": "must be at most 8 characters, got 9",
    }


def test_error_messages_quote_bad_values_briefly():
    with pytest.raises(ConfigError) as info:
        FLAGS.validate({"depth": "x" * 100_000, "device": "y" * 500})
    assert all(len(message) < 200 for message in info.value.errors.values())


def test_the_range_is_enforced_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        FLAGS.parse(["--depth", "65"])
    assert "depth: must be <= 64, got 65" in capsys.readouterr().err
    assert "range 1..64" in FLAGS.parser().format_help()
