"""The GPT family's entry in the registry (engine/models/registry.py).

Kept apart from engine/models/gpt.py because the family names GPT's lean decoder
(engine/models/gpt_inference.py), which itself builds on gpt.py: declaring the family in
gpt.py would make the two modules import each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from engine.models.base import Family
from engine.models.gpt import GPT, LEGACY_FIELDS, GPTConfig, count_params, flops_per_token
from engine.models.gpt_inference import lean_decoder


def config_from_flags(flags: Mapping[str, Any], vocab_size: int) -> GPTConfig:
    """base_train's model flags -> a config: one depth dial, width depth x aspect_ratio."""
    n_kv_head = flags.get("n_kv_head", -1)
    return GPTConfig.from_depth(
        flags["depth"],
        vocab_size=vocab_size,
        sequence_len=flags["max_seq_len"],
        aspect_ratio=flags.get("aspect_ratio", 64),
        head_dim=flags.get("head_dim", 128),
        n_kv_head=None if n_kv_head <= 0 else n_kv_head,
        window_pattern=flags.get("window_pattern", "SSSL"),
        smear=flags.get("smear", True),
        backout=flags.get("backout", True),
    )


def scaling_params(config: GPTConfig) -> int:
    """Block matrices and the lm_head: what nanochat's tokens-per-parameter ratio counts."""
    counts = count_params(config)
    return counts["transformer_matrices"] + counts["lm_head"]


FAMILY = Family(
    name="gpt",
    label="nanochat GPT",
    config_cls=GPTConfig,
    model_cls=GPT,
    count_params=count_params,
    scaling_params=scaling_params,
    flops_per_token=flops_per_token,
    activation_bytes_per_token=None,
    config_from_flags=config_from_flags,
    fast_decoder=lean_decoder,
    flags=("aspect_ratio", "head_dim", "n_kv_head", "window_pattern", "smear", "backout"),
    legacy_fields=MappingProxyType(LEGACY_FIELDS),
)
