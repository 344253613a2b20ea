"""Derived hyperparameters: one depth dial and a few ratios decide the rest.

Pure arithmetic, unit-tested without a model, and shared by the training programs (to run)
and the web app (to show a submitted run's horizon and refuse impossible batch arithmetic
before a worker sees it). `optimizer_hyperparameters` is the one place the LRs and weight
decay follow the batch and data size, for every stage (base, mid, SFT; RL's batch is not
counted in tokens, so it asks for no batch scaling), and the schedules are nanochat's current
ones (linear warmup over `warmup_steps`, warmdown over the last 65% to 5%; Muon momentum up to
0.97 then down to 0.90 in the warmdown; weight decay on a cosine to zero), each with a flag
that brings back the earlier rule. The model sizes it works from are closed-form counts
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
    lr_scale = batch_lr_scale(batch, lr_batch_scaling)
    return Horizon(
        num_iterations=steps,
        total_batch_size=batch,
        grad_accum_steps=batch // tokens_per_micro,
        tokens=steps * batch,
        source=source,
        lr_scale=lr_scale,
    )


def batch_lr_scale(total_batch_size: int, enabled: bool = True) -> float:
    """sqrt(B / B_ref): the LR multiplier for a batch of B tokens (AdamW's sqrt rule, which
    nanochat assumes for Muon too); 1 when scaling is off."""
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be positive, got {total_batch_size}")
    return math.sqrt(total_batch_size / B_REF) if enabled else 1.0


# How weight decay follows the run (`weight_decay_scaling` flag): "batch_data" is nanochat's
# (T_epoch = B / (lr wd D) held at its d12 value, arXiv 2405.13698, with lr ~ sqrt(B)):
# wd x sqrt(B / B_ref) x (D_ref / D); "depth" the earlier wd x (12 / depth)^2; "none" as given.
WEIGHT_DECAY_SCALINGS = ("batch_data", "depth", "none")
# Muon momentum over the run (`muon_momentum_schedule`): "warmdown" nanochat's (0.85 -> 0.97
# over 400 steps, then 0.97 -> 0.90 through the LR warmdown), "ramp" the earlier 0.85 -> 0.95
# over 300 steps.
MOMENTUM_SCHEDULES = ("warmdown", "ramp")
# Muon weight decay over the run (`weight_decay_schedule`): cosine to 0 (nanochat) or linear.
WEIGHT_DECAY_SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class OptimizerHyperparameters:
    """What a stage's optimizer is built with after scaling (recorded in its start event)."""

    lr_scale: float  # every LR (but fixed ones) times this
    weight_decay: float  # Muon's decay at step 0
    weight_decay_rule: str  # how it was derived, in words

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "weight_decay": self.weight_decay,
            "weight_decay_rule": self.weight_decay_rule,
        }


def optimizer_hyperparameters(
    *,
    total_batch_size: int,
    weight_decay: float,
    lr_batch_scaling: bool = True,
    weight_decay_scaling: str = "none",
    data_ratio: float = 1.0,
    depth: int = D_REF_DEPTH,
) -> OptimizerHyperparameters:
    """The LR scale and Muon weight decay of a stage: the one rule every stage uses.

    total_batch_size: tokens per optimizer step (B). lr_batch_scaling: LRs x sqrt(B / B_ref).
    weight_decay_scaling: see WEIGHT_DECAY_SCALINGS; data_ratio is D / D_ref, the model's
    tokens-per-parameter horizon over the depth-12 reference's at the same ratio, i.e. its
    scaling parameters over the reference's (what nanochat divides by); depth is the model's
    (for the "depth" rule). At the issue's demo shape (depth 4, 8192 tokens, B = 4096) this
    gives lr_scale 0.088 and weight decay 0.28 -> 0.43, as nanochat does.
    """
    lr_scale = batch_lr_scale(total_batch_size, lr_batch_scaling)
    if weight_decay_scaling == "batch_data":
        if not (math.isfinite(data_ratio) and data_ratio > 0):
            raise ValueError(f"data_ratio must be a number > 0, got {data_ratio}")
        factor = math.sqrt(total_batch_size / B_REF) / data_ratio
        rule = (
            f"x sqrt({total_batch_size} / {B_REF}) x (D_ref / D = {1 / data_ratio:.4g}) "
            "(nanochat: batch and data size)"
        )
    elif weight_decay_scaling == "depth":
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        factor = (D_REF_DEPTH / depth) ** 2
        rule = f"x (12 / {depth})^2 (depth)"
    elif weight_decay_scaling == "none":
        factor, rule = 1.0, "as given"
    else:
        raise ValueError(
            f"weight_decay_scaling must be one of {WEIGHT_DECAY_SCALINGS}, "
            f"got {weight_decay_scaling!r}"
        )
    return OptimizerHyperparameters(
        lr_scale=lr_scale, weight_decay=weight_decay * factor, weight_decay_rule=rule
    )


def warmup_steps_for(config: Mapping[str, Any], total: int) -> int:
    """The run's LR warmup in steps: `warmup_steps` when >= 0 (nanochat's base default 40),
    else `warmup_ratio` of the steps."""
    steps = config.get("warmup_steps", -1)
    return steps if steps >= 0 else round(config.get("warmup_ratio", 0.0) * total)


def lr_multiplier(step: int, total: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float, *, warmup_steps: int | None = None) -> float:  # fmt: skip
    """Linear warmup, flat, then linear warmdown to final_lr_frac at the last step.

    warmup_steps (when given) overrides warmup_ratio. As in nanochat, the warmup wins where
    it overlaps the warmdown (a run shorter than its warmup never reaches the peak LR)."""
    warmup = round(warmup_ratio * total) if warmup_steps is None else warmup_steps
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
    (warmup_steps or warmup_ratio, warmdown_ratio, final_lr_frac) or cosine (the same warmup,
    down to final_lr_frac)."""
    warmup = warmup_steps_for(config, total)
    if config.get("lr_schedule", "linear") == "cosine":
        return cosine_lr_multiplier(step, total, warmup, config["final_lr_frac"])
    return lr_multiplier(step, total, 0.0, config["warmdown_ratio"], config["final_lr_frac"],
                         warmup_steps=warmup)  # fmt: skip


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp: int = 300) -> float:
    """Muon momentum ramps linearly from 0.85 to 0.95 over the first 300 steps (SFT and mid
    in nanochat; base training's before issue 19)."""
    frac = min(step / ramp, 1.0)
    return (1 - frac) * start + frac * end


def warmdown_momentum(step: int, total: int, warmdown_ratio: float) -> float:
    """nanochat's base-training Muon momentum: 0.85 -> 0.97 over the first 400 steps, then
    0.97 -> 0.90 linearly through the LR warmdown (the ramp wins where they overlap)."""
    if step < 400:
        return muon_momentum(step, 0.85, 0.97, 400)
    warmdown = round(warmdown_ratio * total)
    start = total - warmdown
    if warmdown > 0 and step >= start:
        progress = (step - start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def momentum_at(config: Mapping[str, Any], step: int, total: int) -> float:
    """Base training's Muon momentum at `step` by its `muon_momentum_schedule` flag."""
    if config.get("muon_momentum_schedule", "warmdown") == "ramp":
        return muon_momentum(step)
    return warmdown_momentum(step, total, config["warmdown_ratio"])


def weight_decay_at(step: int, total: int, weight_decay: float, schedule: str = "linear") -> float:
    """Muon's weight decay at `step`: down to zero at the end of the run, on a cosine
    (nanochat) or linearly."""
    if total <= 0:
        return weight_decay
    if schedule == "cosine":
        return weight_decay * 0.5 * (1 + math.cos(math.pi * step / total))
    return weight_decay * (1 - step / total)
