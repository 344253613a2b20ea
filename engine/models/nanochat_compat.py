"""Weights between this project's GPT and karpathy's nanochat GPT (commit 92d63d4, 2026).

The two models compute the same function once three differences are mapped:

* names: the same (`transformer.h.3.attn.c_q.weight`, `smear_gate.weight`, ...); a compiled
  nanochat model's keys carry `_orig_mod.`, dropped on the way in;
* vocabulary padding: nanochat pads wte and every value-embedding table to a multiple of 64
  rows like the lm_head; ours pads only the lm_head. The extra rows are never looked up (no
  token id reaches them), so they are dropped coming in and zero going out;
* rotary direction: nanochat rotates each (x1, x2) half pair by -angle, ours by +angle. A
  rotation by -a of (x1, x2) is the rotation by +a of (x1, -x2) with its second half negated,
  and negated second halves of both q and k cancel in every q.k product (the RMSNorm and the
  1.2 scale act elementwise on magnitudes). So negating the second half of every head's rows
  of c_q and c_k turns one model into the other exactly -- a reparametrisation, which is why
  the direction is not a config field: it changes nothing a model can learn.

Only a config with nanochat's behaviour maps (`check_nanochat_config`); the init fields may
differ, since they do not change what a trained model computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.models.gpt import GPTConfig

# The fields of GPTConfig that change the function, at nanochat's values.
NANOCHAT_BEHAVIOUR: dict[str, Any] = {
    "rotary_base": 100_000,
    "qk_scale": 1.2,
    "ve_gate_channels": 12,
    "ve_gate_range": 3.0,
    "short_window_divisor": 4,
    "short_window_multiple": 128,
    "smear": True,
    "backout": True,
}
# nanochat's GPTConfig fields (all shared with ours).
NANOCHAT_CONFIG_FIELDS = (
    "sequence_len",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "window_pattern",
)
_COMPILE_PREFIX = "_orig_mod."


def check_nanochat_config(config: GPTConfig) -> None:
    """ValueError naming every field where `config` does not compute what nanochat does."""
    wrong = [
        f"{name}={getattr(config, name)!r} (nanochat: {value!r})"
        for name, value in NANOCHAT_BEHAVIOUR.items()
        if getattr(config, name) != value
    ]
    if wrong:
        raise ValueError(f"not nanochat's model: {', '.join(wrong)}")


def nanochat_config_kwargs(config: GPTConfig) -> dict[str, Any]:
    """The keyword arguments of nanochat's `GPTConfig` for the same model."""
    check_nanochat_config(config)
    return {name: getattr(config, name) for name in NANOCHAT_CONFIG_FIELDS}


def config_from_nanochat(values: Mapping[str, Any], **fields: Any) -> GPTConfig:
    """Our config for a nanochat `model_config` dict (its checkpoint meta); `fields` may set
    init fields. Unknown keys are refused rather than silently dropped."""
    unknown = set(values) - set(NANOCHAT_CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown nanochat model_config keys: {', '.join(sorted(unknown))}")
    config = GPTConfig(**{**values, **NANOCHAT_BEHAVIOUR, **fields})
    check_nanochat_config(config)
    return config


def _flip_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """c_q / c_k rows with the second half of every head negated (see the module docstring)."""
    rows, cols = weight.shape
    halves = weight.reshape(heads, 2, rows // heads // 2, cols).clone()
    halves[:, 1].neg_()
    return halves.reshape(rows, cols)


def _is_rotated(key: str) -> bool:
    return key.endswith((".attn.c_q.weight", ".attn.c_k.weight"))


def _is_vocab_table(key: str) -> bool:
    return key == "transformer.wte.weight" or (
        key.startswith("value_embeds.") and key.endswith(".weight")
    )


def _map(key: str, tensor: torch.Tensor, config: GPTConfig, rows: int) -> torch.Tensor:
    if _is_rotated(key):
        heads = config.n_head if key.endswith("c_q.weight") else config.n_kv_head
        return _flip_rotary_halves(tensor, heads)
    if _is_vocab_table(key):
        if tensor.size(0) >= rows:
            return tensor[:rows].clone()
        padded = tensor.new_zeros(rows, tensor.size(1))
        padded[: tensor.size(0)] = tensor
        return padded
    return tensor


def to_nanochat_state_dict(
    state: Mapping[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """Our GPT's state dict -> one nanochat's `GPT.load_state_dict` takes (strict)."""
    check_nanochat_config(config)
    rows = config.padded_vocab_size
    return {key: _map(key, tensor, config, rows) for key, tensor in state.items()}


def from_nanochat_state_dict(
    state: Mapping[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """A nanochat GPT's state dict (compiled or not) -> ours, for `GPT.load_state_dict`."""
    check_nanochat_config(config)
    rows = config.vocab_size
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix(_COMPILE_PREFIX)
        if _is_vocab_table(key) and tensor.size(0) < rows:
            raise ValueError(f"{key} has {tensor.size(0)} rows, fewer than the vocabulary {rows}")
        out[key] = _map(key, tensor, config, rows)
    return out
