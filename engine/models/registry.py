"""Find a model family by name, or by the `model` field of a config dict or checkpoint meta.

Families are imported on first use, so loading a GPT checkpoint does not import the hybrid's
kernels. A config dict without `model` is a GPT's: checkpoints written before families existed
hold exactly GPTConfig's fields of then (see `config_from_dict` for the fields added since).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from engine.models.base import Family

DEFAULT = "gpt"
_MODULES = {
    "gpt": "engine.models.gpt_family",
    "gpt2": "engine.models.gpt2",
    "hybrid": "engine.models.hybrid",
}
NAMES = tuple(_MODULES)


def family(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"model must be one of {', '.join(NAMES)}, got {name!r}")
    return importlib.import_module(_MODULES[name]).FAMILY


def family_of(config: Any) -> Family:
    """The family of a config object or a config dict (no `model` key: GPT)."""
    if isinstance(config, Mapping):
        return family(config.get("model", DEFAULT))
    return family(getattr(config, "model", DEFAULT))


def config_from_dict(values: Mapping[str, Any]) -> Any:
    """The config object a dict describes (a checkpoint's `model_config`).

    Fields the dict lacks that the family added later (`Family.legacy_fields`) take the value
    that reproduces the model the dict was written for, not today's default: a checkpoint
    saved before a field existed loads as the model it was. Raises ValueError for an unknown
    family and TypeError/ValueError for fields the family's config does not take or refuses."""
    if not isinstance(values, Mapping):
        raise TypeError(f"a model config must be a mapping, got {type(values).__name__}")
    fam = family(values.get("model", DEFAULT))
    return fam.config_cls(**{**fam.legacy_fields, **values, "model": fam.name})


def build_model(config: Any, device: torch.device | str = "cpu") -> nn.Module:
    """An initialised model of `config` on `device`, built on the meta device first so the
    weights are allocated once, where they live."""
    with torch.device("meta"):
        model = family_of(config).model_cls(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def build_empty(config: Any, device: torch.device | str = "cpu") -> nn.Module:
    """A model of `config` on `device` whose weights are about to be loaded (not initialised;
    derived buffers recomputed)."""
    with torch.device("meta"):
        model = family_of(config).model_cls(config)
    model.to_empty(device=device)
    model.reset_buffers()
    return model
