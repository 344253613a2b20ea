"""What a model family offers the rest of the code, and what its models must do.

The trainers, the engine, the memory planner and the web app treat every family alike through
two things:

* `Family` -- closed-form facts about a config (parameter counts, FLOPs per token, activation
  bytes per token) that the web app uses to check and plan a submitted run without building a
  model, plus how to build a config from base_train's flags.
* `LanguageModel` -- the methods every family's `nn.Module` implements: the training forward
  with the fused loss, parameter groups for the optimizers, a decode cache for the engine.

Parameter-group names are shared so one optimizer builder serves every family: `matrices`
(the weights of the blocks' linear maps, 2-D, or 3-D stacks of same-shape experts -- Muon's),
`embeddings` (lookup tables), `lm_head`, and `vectors` (biases, norm gains, gates and other
1-D parameters: never weight-decayed). GPT keeps its own finer names (its optimizer predates
families and tunes each group's LR).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

# The group names of the non-GPT families (see the module docstring).
GENERIC_GROUPS = ("matrices", "embeddings", "lm_head", "vectors")


class LanguageModel(Protocol):
    """The interface of every family's model (an `nn.Module`)."""

    config: Any

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: Any = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """(B, T) token ids -> fp32 logits (B, T, vocab); with targets the loss (mean over
        targets != -1, including any auxiliary loss when training; 'none' gives (B, T) token
        losses without auxiliaries). With kv_cache (from `new_cache(...).rows(a, b)`), idx holds
        each row's next tokens and the cache advances by T."""
        ...

    def init_weights(self) -> None: ...

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device + to_empty)."""
        ...

    def get_device(self) -> torch.device: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def num_scaling_params(self) -> dict[str, int]: ...

    def estimate_flops(self) -> int: ...

    def max_positions(self) -> int:
        """The longest sequence (prompt + generated) the model can place: its rotary table,
        or its learned position table."""
        ...

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """The engine's decode state for batch_size rows (see engine/kv_cache.py for what the
        engine asks of it)."""
        ...

    def training_metrics(self) -> dict[str, float]:
        """Extra values of the last training forward (e.g. MoE load), {} when none."""
        ...

    def generate_naive(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[int]: ...


def checked_groups(
    model: nn.Module, groups: dict[str, list[nn.Parameter]]
) -> dict[str, list[nn.Parameter]]:
    """`groups` after checking they hold every parameter of `model` exactly once: a parameter
    added later but missing from `param_groups` would silently never be trained."""
    grouped = [id(p) for params in groups.values() for p in params]
    if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in model.parameters()}:
        raise RuntimeError("param_groups() does not cover every model parameter exactly once")
    return groups


def group_counts(groups: dict[str, list[nn.Parameter]]) -> dict[str, int]:
    """Parameter counts per group, plus their total (`num_scaling_params`)."""
    counts = {name: sum(p.numel() for p in params) for name, params in groups.items()}
    counts["total"] = sum(counts.values())
    return counts


def no_fast_decoder(model: nn.Module, cache: Any) -> None:
    """The default: the engine decodes with the model's own forward."""
    return None


@dataclass(frozen=True)
class Family:
    """One model family: its config and model classes and the closed-form facts about a config.

    count_params(config) -> {group: count, ..., "total": n}: what the built model holds.
    scaling_params(config) -> the parameters a tokens-per-parameter horizon counts (those
        taking part in matmuls per token; a MoE counts only its active experts).
    flops_per_token(config) -> training FLOPs per token (forward + backward) at full context.
    activation_bytes_per_token(config, dtype) -> bytes autograd saves per token of a training
        step (all layers, the embeddings and the fused loss's gradient of the hidden states, as
        GPT's planner counts them; the loss's own working set is the planner's), for the
        memory planner; None where the planner
        has a detailed model of the family (GPT: training/memory.py).
    config_from_flags(flags, vocab_size) -> config, from base_train's flag values.
    flags: the base_train flags the family reads beyond the shared ones.
    legacy_fields: config fields added after the family's first checkpoints were written,
        with the value that reproduces the model before them: a config dict lacking one (an
        old checkpoint's meta) gets it (registry.config_from_dict), a new config its default.
    """

    name: str
    label: str
    config_cls: type
    model_cls: type
    count_params: Callable[[Any], dict[str, int]]
    scaling_params: Callable[[Any], int]
    flops_per_token: Callable[[Any], int]
    activation_bytes_per_token: Callable[[Any, torch.dtype], float] | None
    config_from_flags: Callable[[Mapping[str, Any], int], Any]
    fast_decoder: Callable[[nn.Module, Any], Any] = no_fast_decoder
    flags: tuple[str, ...] = field(default=())
    legacy_fields: Mapping[str, Any] = field(default_factory=dict)
