"""Derived hyperparameters: horizon priority, batch arithmetic, schedules, and the model sizes
they start from (closed-form counts equal to the built model's, bounded for any config)."""

import math
import time

import pytest
import torch

from engine.models.gpt import GPT, GPTConfig, count_params, flops_per_token
from training import base_train
from training.flags import MAX_STEPS
from training.scaling import (
    B_REF,
    auto_batch_size,
    lr_multiplier,
    muon_momentum,
    plan_horizon,
    weight_decay_at,
)

BASE = dict(
    num_iterations=-1, target_flops=-1.0, target_param_data_ratio=10.0, total_batch_size=-1,
    device_batch_size=4, seq_len=64, world_size=1, scaling_params=1_000_000,
    flops_per_token=6e6, reference_scaling_params=1_000_000,
)  # fmt: skip


def plan(**changes):
    return plan_horizon(**{**BASE, **changes})


def test_auto_batch_is_b_ref_at_the_reference_and_grows_as_d_to_0_383():
    assert auto_batch_size(1e9, 1e9) == B_REF
    # 8x the data -> 8^0.383 = 2.2x the batch -> rounds to 2x (nearest power of two in log2).
    assert auto_batch_size(8e9, 1e9) == 2 * B_REF
    assert auto_batch_size(1e9 / 64, 1e9) == B_REF // 4  # 64^-0.383 = 0.203 -> 2^-2.3 -> 1/4


def test_horizon_priority_iterations_then_flops_then_ratio():
    assert plan(num_iterations=7, target_flops=1e15, total_batch_size=256).source == "iterations"
    by_flops = plan(target_flops=6e6 * 256 * 50, total_batch_size=256)
    assert (by_flops.source, by_flops.num_iterations) == ("flops", 50)
    by_ratio = plan(total_batch_size=256 * 100)
    assert (by_ratio.source, by_ratio.num_iterations) == ("ratio", round(1e7 / 25600))
    assert by_ratio.tokens == by_ratio.num_iterations * 25600


def test_gradient_accumulation_and_lr_scale():
    horizon = plan(total_batch_size=4 * 64 * 2 * 8, world_size=2, num_iterations=10)
    assert horizon.grad_accum_steps == 8
    assert horizon.lr_scale == pytest.approx(math.sqrt(4096 / B_REF))
    assert plan(total_batch_size=4096, num_iterations=1, lr_batch_scaling=False).lr_scale == 1.0


def test_auto_batch_rounds_up_to_whole_micro_batches():
    horizon = plan(device_batch_size=3, seq_len=1000, world_size=7)
    assert horizon.total_batch_size % (3 * 1000 * 7) == 0


def test_impossible_batch_arithmetic_names_the_flags():
    with pytest.raises(ValueError, match=r"total_batch_size \(1000\) must be a multiple of "
                                         r"device_batch_size x max_seq_len x processes"):  # fmt: skip
        plan(total_batch_size=1000)
    with pytest.raises(ValueError, match="gives 0 steps"):
        plan(total_batch_size=2**24, target_param_data_ratio=1.0)
    with pytest.raises(ValueError, match="no horizon"):
        plan(target_param_data_ratio=0.0, total_batch_size=256)


def test_lr_schedule_warmup_flat_warmdown():
    mults = [lr_multiplier(s, 100, 0.1, 0.5, 0.0) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)
    assert all(m == 1.0 for m in mults[10:51])
    assert mults[75] == pytest.approx(0.5)
    assert mults[99] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(mults[50:], mults[51:], strict=False))
    assert lr_multiplier(99, 100, 0.0, 0.5, 0.1) == pytest.approx(0.02 + 0.98 * 0.1)


def test_momentum_ramp_and_weight_decay_decay():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(10_000) == pytest.approx(0.95)
    assert weight_decay_at(0, 100, 0.2) == 0.2
    assert weight_decay_at(50, 100, 0.2) == pytest.approx(0.1)
    assert weight_decay_at(100, 100, 0.2) == 0.0


# ---- model sizes from formulas ------------------------------------------------------------

SIZES = [
    GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64),
    GPTConfig(sequence_len=33, vocab_size=777, n_layer=5, n_head=6, n_kv_head=3, n_embd=96,
              window_pattern="LS"),
    GPTConfig(sequence_len=17, vocab_size=65, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
              window_pattern="S"),
    GPTConfig(sequence_len=101, vocab_size=1001, n_layer=7, n_head=4, n_kv_head=4, n_embd=64,
              window_pattern="SSL"),
    GPTConfig(sequence_len=1, vocab_size=270, n_layer=2, n_head=1, n_kv_head=1, n_embd=32),
    GPTConfig.from_depth(20, vocab_size=65536),  # the speedrun model
    GPTConfig.from_depth(12, vocab_size=32768, aspect_ratio=50, head_dim=64, n_kv_head=5,
                         window_pattern="SSSSSL", sequence_len=4096),
]  # fmt: skip


@pytest.mark.parametrize(
    "config", SIZES, ids=lambda c: f"L{c.n_layer}-C{c.n_embd}-{c.window_pattern}"
)
def test_closed_form_counts_equal_the_built_model(config):
    with torch.device("meta"):
        model = GPT(config)
    assert count_params(config) == model.num_scaling_params()
    assert flops_per_token(config) == model.estimate_flops()


def test_planning_a_huge_model_builds_nothing_and_names_depth():
    config = base_train.FLAGS.validate({"depth": 256, "aspect_ratio": 1024})
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^depth: .* parameters, more than the 2e\+11"):
        base_train.plan(config, vocab_size=2**21, world_size=1)
    assert time.monotonic() - started < 0.5
    # The largest in-range depth at the default width is still just arithmetic to plan...
    deep = base_train.FLAGS.validate({"depth": 64})
    horizon = base_train.plan(deep, 65536, 8, check_memory=False)
    assert horizon.num_iterations > 0
    # ...and a GPU run of it is refused: ~22B parameters do not fit 8 x 80 GB at batch 1.
    with pytest.raises(ValueError, match=r"^device_batch_size: even 1 sequence"):
        base_train.plan(deep, 65536, 8)
    assert time.monotonic() - started < 0.5


def test_horizons_beyond_any_run_are_refused_naming_the_rule():
    with pytest.raises(ValueError, match=r"^target_flops: the flops horizon gives .* steps"):
        plan(target_flops=1e30, total_batch_size=256)
    with pytest.raises(ValueError, match=r"^target_param_data_ratio: the ratio horizon"):
        plan(target_param_data_ratio=1e6, scaling_params=10**11, total_batch_size=256)
    with pytest.raises(ValueError, match=r"^total_batch_size: the automatic batch"):
        plan(target_flops=1e30)  # auto batch from 1.7e23 tokens: 2^40 tokens per step
    assert plan(num_iterations=MAX_STEPS, total_batch_size=256).num_iterations == MAX_STEPS
