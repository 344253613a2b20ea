"""Program flags declared once, read by argparse, YAML presets and the web app alike.

Each training program lists its flags as `Flag`s in a `FlagSet`. From that one list come the
command-line parser (`--depth 4`), YAML presets (`--config training/configs/base/d12.yaml`,
keys are flag names), and `validate()`, which the web app calls on a submitted config so that
a bad value is refused with the field's name before any worker sees it.

Precedence: flag defaults < preset file < flags given on the command line.

Flags that several programs declare alike are declared once, beside what reads them:
`output_flags` here (the web app's event log and the report), `training.runtime.runtime_flags`
(device, precision, seed) and `training.optim.lr_flags` (the optimizer's learning rates).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).with_name("configs")


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

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


class ConfigError(ValueError):
    """One or more invalid config values; `errors` maps each field name to what is wrong."""

    def __init__(self, errors: Mapping[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


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
        raise ValueError(f"must be true or false, got {value!r}")
    if flag.type is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)  # YAML/JSON write 2e9 as a float
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                number = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"must be an integer, got {value!r}")
            return int(number)
        raise ValueError(f"must be an integer, got {value!r}")
    if flag.type is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be finite, got {value!r}")
        return number
    if flag.type is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"flag {flag.name}: unsupported type {flag.type}")


def _check(flag: Flag, value: Any) -> None:
    if value is None:
        return
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"must be one of {', '.join(map(str, flag.choices))}, got {value!r}")
    if flag.min is not None and value < flag.min:
        raise ValueError(f"must be >= {flag.min}, got {value!r}")
    if flag.max is not None and value > flag.max:
        raise ValueError(f"must be <= {flag.max}, got {value!r}")


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
            kwargs: dict[str, Any] = {"help": f"{flag.help} (default: {flag.default!r})"}
            if flag.type is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = str  # converted by validate() with the same rules as YAML
                kwargs["metavar"] = flag.type.__name__.upper()
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


def output_flags() -> list[Flag]:
    """`run_dir` and `report_dir`: where a program's events and its report section go."""
    return [
        Flag("run_dir", str, "", "write events.jsonl here for the web app", path=True),
        REPORT_DIR,
    ]
