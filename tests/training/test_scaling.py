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
    momentum_at,
    muon_momentum,
    optimizer_hyperparameters,
    plan_horizon,
    schedule_multiplier,
    warmdown_momentum,
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


def test_nanochat_schedules_warmup_steps_warmdown_momentum_and_cosine_decay():
    # nanochat's base_train defaults: 40 warmup steps, warmdown over the last 65% to 5%.
    config = {"warmup_steps": 40, "warmup_ratio": 0.0, "warmdown_ratio": 0.65,
              "final_lr_frac": 0.05}  # fmt: skip
    mults = [schedule_multiplier(config, s, 1000) for s in range(1000)]
    assert mults[0] == pytest.approx(1 / 40) and mults[39] == pytest.approx(1.0)
    assert all(m == 1.0 for m in mults[40:351])
    assert mults[350] == 1.0 and mults[351] < 1.0
    assert mults[999] == pytest.approx(1 / 650 + (649 / 650) * 0.05)
    # The warmup wins where it overlaps the warmdown (a 30-step run never reaches its peak).
    assert schedule_multiplier(config, 29, 30) == pytest.approx(30 / 40)
    # -1: warmup_ratio of the steps, as before.
    assert schedule_multiplier({**config, "warmup_steps": -1, "warmup_ratio": 0.1}, 9, 1000) == (
        pytest.approx(10 / 100))  # fmt: skip
    # Momentum: 0.85 -> 0.97 over 400 steps, flat, then 0.97 -> 0.90 through the warmdown.
    assert warmdown_momentum(0, 2000, 0.65) == pytest.approx(0.85)
    assert warmdown_momentum(200, 2000, 0.65) == pytest.approx(0.91)
    assert warmdown_momentum(400, 2000, 0.65) == warmdown_momentum(699, 2000, 0.65) == 0.97
    assert warmdown_momentum(700, 2000, 0.65) == pytest.approx(0.97)
    assert warmdown_momentum(1350, 2000, 0.65) == pytest.approx(0.935)
    assert warmdown_momentum(1999, 2000, 0.65) == pytest.approx(0.90, abs=1e-4)
    # In a short run the ramp is never done and the warmdown never lowers it (nanochat's order).
    assert warmdown_momentum(299, 300, 0.65) == pytest.approx(0.85 + 0.12 * 299 / 400)
    assert momentum_at({"muon_momentum_schedule": "ramp", "warmdown_ratio": 0.65}, 150, 300) == (
        pytest.approx(0.90))  # fmt: skip
    assert weight_decay_at(0, 100, 0.4, "cosine") == pytest.approx(0.4)
    assert weight_decay_at(50, 100, 0.4, "cosine") == pytest.approx(0.2)
    assert weight_decay_at(25, 100, 0.4, "cosine") == pytest.approx(0.2 * (1 + math.sqrt(0.5)))
    assert weight_decay_at(100, 100, 0.4, "cosine") == pytest.approx(0.0)


def test_optimizer_hyperparameters_scale_lr_with_batch_and_decay_with_batch_and_data():
    # The side-by-side shape: depth 4, 8192-token vocabulary, 4096 tokens per step.
    config = {**base_train.FLAGS.defaults(), "depth": 4, "head_dim": 64, "max_seq_len": 256,
              "window_pattern": "L", "total_batch_size": 4096, "num_iterations": 300}  # fmt: skip
    horizon = base_train.plan(config, 8192, 1, check_memory=False)
    hp = base_train.hyperparameters(config, 8192, horizon)
    assert hp.lr_scale == pytest.approx(0.0884, abs=1e-4)
    assert hp.weight_decay == pytest.approx(0.43, abs=0.005)
    # The rule by itself: wd x sqrt(B / B_ref) / (D / D_ref); lr x sqrt(B / B_ref).
    hp = optimizer_hyperparameters(total_batch_size=B_REF // 4, weight_decay=0.28,
                                   weight_decay_scaling="batch_data", data_ratio=2.0)  # fmt: skip
    assert (hp.lr_scale, hp.weight_decay) == (pytest.approx(0.5), pytest.approx(0.07))
    assert "nanochat" in hp.weight_decay_rule
    old = optimizer_hyperparameters(total_batch_size=4096, weight_decay=0.2,
                                    lr_batch_scaling=False, weight_decay_scaling="depth",
                                    depth=4)  # fmt: skip
    assert (old.lr_scale, old.weight_decay) == (1.0, pytest.approx(1.8))
    same = optimizer_hyperparameters(total_batch_size=B_REF, weight_decay=0.1)
    assert (same.lr_scale, same.weight_decay) == (1.0, 0.1)
    with pytest.raises(ValueError, match="weight_decay_scaling"):
        optimizer_hyperparameters(total_batch_size=4096, weight_decay=0.1,
                                  weight_decay_scaling="width")  # fmt: skip
    with pytest.raises(ValueError, match="total_batch_size"):
        optimizer_hyperparameters(total_batch_size=0, weight_decay=0.1)


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
    started = time.process_time()  # CPU time, so a loaded machine cannot fail it
    with pytest.raises(ValueError, match=r"^depth: .* parameters, more than the 2e\+11"):
        base_train.plan(config, vocab_size=2**21, world_size=1)
    assert time.process_time() - started < 0.5
    # The largest in-range depth at the default width is still just arithmetic to plan...
    deep = base_train.FLAGS.validate({"depth": 64})
    horizon = base_train.plan(deep, 65536, 8, check_memory=False)
    assert horizon.num_iterations > 0
    # ...and a GPU run of it is refused: ~22B parameters do not fit 8 x 80 GB at batch 1.
    with pytest.raises(ValueError, match=r"^device_batch_size: even 1 sequence"):
        base_train.plan(deep, 65536, 8)
    assert time.process_time() - started < 0.5


def test_horizons_beyond_any_run_are_refused_naming_the_rule():
    with pytest.raises(ValueError, match=r"^target_flops: the flops horizon gives .* steps"):
        plan(target_flops=1e30, total_batch_size=256)
    with pytest.raises(ValueError, match=r"^target_param_data_ratio: the ratio horizon"):
        plan(target_param_data_ratio=1e6, scaling_params=10**11, total_batch_size=256)
    with pytest.raises(ValueError, match=r"^total_batch_size: the automatic batch"):
        plan(target_flops=1e30)  # auto batch from 1.7e23 tokens: 2^40 tokens per step
    assert plan(num_iterations=MAX_STEPS, total_batch_size=256).num_iterations == MAX_STEPS
