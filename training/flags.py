"""Program flags declared once, read by argparse, YAML presets and the web app alike.

Each training program lists its flags as `Flag`s in a `FlagSet`. From that one list come the
command-line parser (`--depth 4`), YAML presets (`--config training/configs/base/d12.yaml`,
keys are flag names), and `validate()`, which the web app calls on a submitted config so that
a bad value is refused with the field's name before any worker sees it.

Precedence: flag defaults < preset file < flags given on the command line.

Every value is bounded before anything uses it: numeric flags declare `min`/`max` (forms and
the API show them; a sentinel such as -1 for "auto" is inside the declared range and named in the
help), integers never leave the signed 64-bit range a database column holds, and strings have a
`max_length` and no control characters (PostgreSQL refuses NUL in text and JSON). So checking a
config costs the same for any input, and what passes can be stored and compared safely.

Flags that several programs declare alike are declared once, beside what reads them:
`output_flags` here (the web app's event log, the report, optional W&B logging),
`training.runtime.runtime_flags` (device, precision, seed) and `training.optim.lr_flags` (the
optimizer's learning rates).
"""

from __future__ import annotations

import argparse
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).with_name("configs")
# The widest integer any flag may hold: what a signed 64-bit database column stores.
INT64_MAX = 2**63 - 1
# Longest string a flag takes unless it declares its own `max_length`.
MAX_STRING_LENGTH = 1000
# Error messages quote at most this much of a bad value.
_SHOWN_CHARS = 60

# Bounds many flags share: generous for real GPU runs (a d32 speedrun on 8 nodes), finite so a
# submitted config cannot ask for unbounded work.
MAX_STEPS = 10**9  # optimizer steps, and intervals counted in steps
MAX_SEQ_LEN = 65536  # tokens in one sequence
MAX_VOCAB = 2**21  # tokenizer vocabulary
MAX_ROWS = 4096  # sequences in one forward pass
MAX_TOKENS = 10**13  # token or character counts (a budget, a corpus)
MAX_SEED = 2**32 - 1  # what every seeded generator (torch, random, numpy) accepts
MAX_EPOCHS = 10**6  # passes over a dataset
MAX_SHARDS = 10_000  # parquet shards one command makes or fetches (FineWeb-edu has 1,823)
# What "auto" becomes in the config of an int flag that takes it (`Flag.auto`).
AUTO = -1


@dataclass(frozen=True)
class Flag:
    name: str
    type: type  # int, float, str or bool
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    # "path" flags name files or directories (inputs and outputs); the web app fills them in.
    path: bool = False
    max_length: int = MAX_STRING_LENGTH  # str flags only
    # "component" str flags become one folder name in a path the program builds (model_tag):
    # a non-empty value must be a single safe name (check_component), never `..` or `a/b`.
    component: bool = False
    # A value the word "auto" stands for (int flags): the program decides, e.g. the largest
    # device batch that fits the GPU. It may lie outside min..max (0 stays an error when
    # min is 1), so the range keeps meaning "the numbers a user may give".
    auto: Any = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


class ConfigError(ValueError):
    """One or more invalid config values; `errors` maps each field name to what is wrong."""

    def __init__(self, errors: Mapping[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


def _shown(value: Any) -> str:
    """A bad value as error messages quote it: its repr, cut short (the value may be huge)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _int64(value: int) -> int:
    if not -INT64_MAX <= value <= INT64_MAX:
        raise ValueError(f"must be between {-INT64_MAX} and {INT64_MAX}, got {_shown(value)}")
    return value


def _text(flag: Flag, value: str) -> str:
    """A string flag's value: bounded in length, free of control characters."""
    if len(value) > flag.max_length:
        raise ValueError(f"must be at most {flag.max_length} characters, got {len(value)}")
    for char in value:
        # Cc: NUL and the other control characters; Cs: lone surrogates, which no database or
        # file system encoding accepts.
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"must not contain control characters (found {char!r})")
    return value


def _coerce(flag: Flag, value: Any) -> Any:
    """Convert a YAML/JSON/CLI value to the flag's type, refusing lossy or odd conversions."""
    if value is None:
        if flag.default is None:
            return None
        raise ValueError("must not be empty")
    if flag.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"must be true or false, got {_shown(value)}")
    if flag.auto is not None and (
        value == flag.auto or (isinstance(value, str) and value.strip().lower() == "auto")
    ):
        return flag.auto
    if flag.type is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {_shown(value)}")
        if isinstance(value, float) and value.is_integer():
            return _int64(int(value))  # YAML/JSON write 2e9 as a float
        if isinstance(value, int):
            return _int64(value)
        if isinstance(value, str):
            try:
                number = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ValueError(f"must be an integer, got {_shown(value)}") from None
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"must be an integer, got {_shown(value)}")
            return _int64(int(number))
        raise ValueError(f"must be an integer, got {_shown(value)}")
    if flag.type is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {_shown(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be a number, got {_shown(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be finite, got {_shown(value)}")
        return number
    if flag.type is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"must be a string, got {_shown(value)}")
        if isinstance(value, str):
            return _text(flag, value)
        try:
            text = str(value)
        except ValueError:  # an int with more digits than Python converts
            raise ValueError(f"must be a string, got {_shown(value)}") from None
        return _text(flag, text)
    raise TypeError(f"flag {flag.name}: unsupported type {flag.type}")


def _check(flag: Flag, value: Any) -> None:
    if value is None or (flag.auto is not None and value == flag.auto):
        return
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"must be one of {', '.join(map(str, flag.choices))}, got {_shown(value)}")
    if flag.min is not None and value < flag.min:
        raise ValueError(f"must be >= {flag.min}, got {_shown(value)}")
    if flag.max is not None and value > flag.max:
        raise ValueError(f"must be <= {flag.max}, got {_shown(value)}")
    if flag.component and value:
        check_component(value)


_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_component(value: str) -> str:
    """`value` if it is one safe path component: a letter or digit, then up to 63 letters,
    digits, '_', '.' or '-' (so never '', '.', '..', absolute, or with a separator)."""
    if not _COMPONENT.fullmatch(value):
        raise ValueError(
            "must be one folder name: a letter or digit, then up to 63 letters, digits, "
            f"'_', '.' or '-', got {_shown(value)}"
        )
    return value


def join_inside(parent: str | Path, component: str) -> Path:
    """`parent / component` for a checked component, asserting the result stays in `parent`."""
    target = (Path(parent) / check_component(component)).resolve()
    if target.parent != Path(parent).resolve():
        raise ValueError(f"{component!r} leaves {parent}")
    return Path(parent) / component


def _range(flag: Flag) -> str:
    """`; range 1..512` for the --help of a flag with bounds."""
    if flag.min is None and flag.max is None:
        return ""
    low, high = ("" if v is None else v if isinstance(v, int) else f"{v:g}"
                 for v in (flag.min, flag.max))  # fmt: skip
    return f"; range {low}..{high}"


@dataclass
class FlagSet:
    program: str  # the module name under training/, e.g. "base_train"
    flags: Sequence[Flag]
    description: str = ""
    configs: str | None = None  # preset folder under training/configs/ (default: program)
    _by_name: dict[str, Flag] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {f.name: f for f in self.flags}
        if len(self._by_name) != len(self.flags):
            raise ValueError(f"{self.program}: duplicate flag names")

    def __getitem__(self, name: str) -> Flag:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.flags}

    def validate(self, values: Mapping[str, Any], partial: bool = False) -> dict[str, Any]:
        """Check and convert a config; returns the full config (defaults filled in).

        Raises ConfigError naming every bad field. Keys may use dashes or underscores.
        With `partial=True` only the given keys are returned (for overrides).
        """
        errors: dict[str, str] = {}
        result = {} if partial else self.defaults()
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            flag = self._by_name.get(key)
            if flag is None:
                errors[key] = (
                    f"unknown setting for {self.program} (known: {', '.join(self._by_name)})"
                )
                continue
            try:
                converted = _coerce(flag, value)
                _check(flag, converted)
            except ValueError as exc:
                errors[key] = str(exc)
                continue
            result[key] = converted
        if errors:
            raise ConfigError(errors)
        return result

    # --- presets ----------------------------------------------------------------------------
    def preset_dir(self) -> Path:
        return CONFIGS_DIR / (self.configs or self.program)

    def presets(self) -> list[str]:
        return sorted(p.stem for p in self.preset_dir().glob("*.yaml"))

    def load_config_file(self, path_or_name: str | Path) -> dict[str, Any]:
        """A YAML preset, by path or by name in training/configs/<program>/."""
        path = Path(path_or_name)
        if not path.exists() and path.suffix == "" and "/" not in str(path_or_name):
            path = self.preset_dir() / f"{path_or_name}.yaml"
        if not path.exists():
            known = ", ".join(self.presets()) or "none"
            raise ConfigError({"config": f"no such file or preset {str(path_or_name)!r} "
                                         f"(presets for {self.program}: {known})"})  # fmt: skip
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError({"config": f"{path}: invalid YAML: {exc}"}) from None
        if not isinstance(data, dict):
            raise ConfigError({"config": f"{path}: expected a mapping of flag names to values"})
        try:
            return self.validate(data, partial=True)
        except ConfigError as exc:
            raise ConfigError({f"{path.name}:{k}": v for k, v in exc.errors.items()}) from None

    # --- command line -----------------------------------------------------------------------
    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=f"python -m training.{self.program}",
            description=self.description,
            argument_default=argparse.SUPPRESS,  # so we know which flags were given
        )
        parser.add_argument(
            "--config", help=f"YAML preset: a path or a name in {self.preset_dir()}"
        )
        for flag in self.flags:
            kwargs: dict[str, Any] = {
                "help": f"{flag.help} (default: {flag.default!r}{_range(flag)})"
            }
            if flag.type is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = str  # converted by validate() with the same rules as YAML
                kwargs["metavar"] = flag.type.__name__.upper() + (
                    "|auto" if flag.auto is not None else ""
                )
                if flag.choices:
                    kwargs["choices"] = [str(c) for c in flag.choices]
            parser.add_argument(flag.option, dest=flag.name, **kwargs)
        return parser

    def parse(self, argv: Iterable[str] | None = None) -> dict[str, Any]:
        """defaults < --config preset < explicit flags; exits with a usage error on bad input."""
        parser = self.parser()
        given = vars(parser.parse_args(None if argv is None else list(argv)))
        preset = given.pop("config", None)
        try:
            merged = self.load_config_file(preset) if preset else {}
            merged.update(self.validate(given, partial=True))
            return self.validate(merged)
        except ConfigError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


def format_config(config: Mapping[str, Any]) -> str:
    """The effective config, one `name = value` per line, for logs."""
    width = max((len(k) for k in config), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}" for k, v in config.items())


REPORT_DIR = Flag(
    "report_dir", str, "", "append this stage's section to a report in this directory", path=True
)


# Optional Weights & Biases logging (training/wandb_sink.py reads them). A W&B project or group
# name is checked as one folder name is (letters, digits, '_', '.', '-'; at most 64): W&B
# refuses '/', '#', '?', '%' and ':' in them, and the name ends up in its URLs and paths.
WANDB_FLAGS = (
    Flag(
        "wandb_project",
        str,
        "",
        "also log config and metrics to this Weights & Biases project "
        "('' = $WANDB_PROJECT if set, else no W&B; needs requirements-wandb.txt)",
        component=True,
    ),
    Flag(
        "wandb_group",
        str,
        "",
        "W&B group of the run (a pipeline sets it for its stages; '' = $WANDB_RUN_GROUP or none)",
        component=True,
    ),
)


def output_flags() -> list[Flag]:
    """`run_dir` and `report_dir`: where a program's events and its report section go; and the
    W&B project and group its events are mirrored to, if any."""
    return [
        Flag("run_dir", str, "", "write events.jsonl here for the web app", path=True),
        REPORT_DIR,
        *WANDB_FLAGS,
    ]
