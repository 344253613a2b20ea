"""Derived hyperparameters: one depth dial and a few ratios decide the rest.

Pure arithmetic, unit-tested without a model, and shared by the training programs (to run)
and the web app (to show a submitted run's horizon and refuse impossible batch arithmetic
before a worker sees it). The model sizes it works from are closed-form counts
(`engine.models.gpt.count_params`), and every result is bounded (`MAX_PARAMS`, `MAX_BATCH_TOKENS`,
`MAX_STEPS`), so planning costs the same for any config and never plans unbounded work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from training.flags import MAX_STEPS

# Reference point the learning rates were tuned at: 2^19 tokens per step at depth 12.
B_REF = 2**19
D_REF_DEPTH = 12
# Optimal batch grows with the amount of training data as D^0.383.
BATCH_DATA_EXPONENT = 0.383
# Sanity caps: far above any run this trainer is for (a d32 speedrun is ~2e9 parameters and
# 2^20 tokens per step), low enough that a typo cannot plan a model or a step no machine holds.
MAX_PARAMS = 2 * 10**11
MAX_BATCH_TOKENS = 2**30
# What the horizon rules name when the steps they give are out of bounds.
_SOURCE_FLAGS = {
    "iterations": "num_iterations",
    "flops": "target_flops",
    "ratio": "target_param_data_ratio",
}


@dataclass(frozen=True)
class Horizon:
    num_iterations: int
    total_batch_size: int  # tokens per optimizer step, all ranks
    grad_accum_steps: int
    tokens: int  # total training tokens
    source: str  # which rule decided: "iterations", "flops" or "ratio"
    lr_scale: float  # multiply every LR by this (batch-size scaling)


def auto_batch_size(target_tokens: float, reference_tokens: float) -> int:
    """B_REF x (D / D_ref)^0.383, rounded to the nearest power of two (in log space)."""
    if target_tokens <= 0 or reference_tokens <= 0:
        raise ValueError("token counts must be positive")
    raw = B_REF * (target_tokens / reference_tokens) ** BATCH_DATA_EXPONENT
    return 2 ** round(math.log2(raw))


def plan_horizon(
    *,
    num_iterations: int,
    target_flops: float,
    target_param_data_ratio: float,
    total_batch_size: int,
    device_batch_size: int,
    seq_len: int,
    world_size: int,
    scaling_params: int,
    flops_per_token: float,
    reference_scaling_params: int,
    lr_batch_scaling: bool = True,
) -> Horizon:
    """Steps, batch and gradient accumulation for a run.

    Horizon priority: explicit iterations, else target FLOPs / (flops_per_token x batch),
    else ratio x scaling params tokens. total_batch_size -1 picks it from the data size.
    Raises ValueError (naming the flag) when the batch arithmetic cannot work.
    """
    tokens_per_micro = device_batch_size * seq_len * world_size
    ratio_tokens = target_param_data_ratio * scaling_params
    if total_batch_size == -1:
        reference_tokens = target_param_data_ratio * reference_scaling_params
        target_tokens = ratio_tokens
        if num_iterations <= 0 and target_flops > 0:
            target_tokens = target_flops / flops_per_token
        batch = auto_batch_size(target_tokens, reference_tokens) if target_tokens > 0 else B_REF
        # Round up to whole micro-batches: every rank must run the same number of passes.
        batch = max(tokens_per_micro, math.ceil(batch / tokens_per_micro) * tokens_per_micro)
    elif total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be -1 (auto) or positive, got {total_batch_size}")
    else:
        batch = total_batch_size
        if batch % tokens_per_micro:
            raise ValueError(
                f"total_batch_size ({batch}) must be a multiple of device_batch_size x "
                f"max_seq_len x processes = {device_batch_size} x {seq_len} x {world_size} "
                f"= {tokens_per_micro}"
            )
    if num_iterations > 0:
        steps, source = num_iterations, "iterations"
    elif target_flops > 0:
        steps, source = round(target_flops / (flops_per_token * batch)), "flops"
    elif target_param_data_ratio > 0:
        steps, source = round(ratio_tokens / batch), "ratio"
    else:
        raise ValueError(
            "no horizon: set num_iterations, target_flops or target_param_data_ratio > 0"
        )
    if batch > MAX_BATCH_TOKENS:
        raise ValueError(
            f"total_batch_size: the automatic batch of {batch:.3g} tokens per step is more than "
            f"{MAX_BATCH_TOKENS}; set total_batch_size"
        )
    if steps < 1:
        raise ValueError(
            f"the {source} horizon gives {steps} steps at {batch} tokens per step; "
            "train longer or use a smaller total_batch_size"
        )
    if steps > MAX_STEPS:
        raise ValueError(
            f"{_SOURCE_FLAGS[source]}: the {source} horizon gives {steps:.3g} steps at {batch} "
            f"tokens per step, more than {MAX_STEPS}"
        )
    lr_scale = math.sqrt(batch / B_REF) if lr_batch_scaling else 1.0
    return Horizon(
        num_iterations=steps,
        total_batch_size=batch,
        grad_accum_steps=batch // tokens_per_micro,
        tokens=steps * batch,
        source=source,
        lr_scale=lr_scale,
    )


def lr_multiplier(step: int, total: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:  # fmt: skip
    """Linear warmup, flat, then linear warmdown to final_lr_frac at the last step."""
    warmup = round(warmup_ratio * total)
    warmdown = round(warmdown_ratio * total)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step > total - warmdown:
        progress = (total - step) / warmdown
        return progress + (1 - progress) * final_lr_frac
    return 1.0


SCHEDULES = ("linear", "cosine")


def cosine_lr_multiplier(step: int, total: int, warmup_steps: int, min_lr_frac: float) -> float:
    """The GPT-2 recipe's schedule (SPEC §13): linear warmup over `warmup_steps` ((step + 1) /
    warmup, so the first step already moves), then a cosine from 1 down to `min_lr_frac` at
    `total`, flat at the floor after it."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total:
        return min_lr_frac
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_multiplier(config: Mapping[str, Any], step: int, total: int) -> float:
    """A training program's LR multiplier at `step` from its flags: `lr_schedule` linear
    (warmup_ratio, warmdown_ratio, final_lr_frac) or cosine (warmup_steps, or warmup_ratio of
    the steps when it is -1, down to final_lr_frac)."""
    if config.get("lr_schedule", "linear") == "cosine":
        warmup = config.get("warmup_steps", -1)
        if warmup < 0:
            warmup = round(config["warmup_ratio"] * total)
        return cosine_lr_multiplier(step, total, warmup, config["final_lr_frac"])
    return lr_multiplier(step, total, config["warmup_ratio"], config["warmdown_ratio"],
                         config["final_lr_frac"])  # fmt: skip


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp: int = 300) -> float:
    """Muon momentum ramps linearly from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / ramp, 1.0)
    return (1 - frac) * start + frac * end


def weight_decay_at(step: int, total: int, weight_decay: float) -> float:
    """Weight decay decays linearly to zero over the run."""
    return weight_decay * (1 - step / total) if total > 0 else weight_decay
