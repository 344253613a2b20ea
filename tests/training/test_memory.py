"""The memory model of a training step against what the probes measure, and `auto` batches.

The activation formula is held to the saved-tensor probe per token (both dtypes, grouped-query
and value-embedding layers, sliding windows), the whole prediction to a measured CPU step, the
optimizer term to the state a real step creates; `auto` is run over every shipped preset on
fake 80 GB and 24 GB GPUs.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from engine.models import registry
from engine.models.gpt import GPT, GPTConfig
from training import base_train, memory
from training.finetune import planning_config
from training.flags import AUTO, CONFIGS_DIR, ConfigError
from training.memory import (
    GIB,
    MemoryEstimate,
    auto_device_batch,
    estimate_step,
    measure_step_peak,
    optimizer_bytes,
    profile_ours,
)
from training.optim import build_optimizer

SMALL = dict(sequence_len=64, vocab_size=1024, n_layer=3)


def small_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**SMALL, "n_head": 4, "n_kv_head": 4, "n_embd": 256, **overrides})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        dict(n_embd=256, n_head=4, n_kv_head=4, window_pattern="L"),
        dict(n_embd=256, n_head=4, n_kv_head=2, window_pattern="SL"),
        dict(n_embd=384, n_head=6, n_kv_head=3, window_pattern="SSL", n_layer=4),
    ],
)
def test_activation_formula_matches_the_probe(shape, dtype):
    config = small_config(**shape)
    measured = profile_ours(config, dtype)
    per_token = memory.activation_bytes_per_token(config, dtype)
    growth = sum(measured.per_layer) + measured.before_layers + measured.after_layers
    assert per_token == pytest.approx(growth, rel=0.01)
    # Every layer but the last spans a block and the next layer's residual mix: the formula's
    # per-layer bytes, value-embedding layers and plain ones alike.
    for i, layer_bytes in enumerate(measured.per_layer[:-1]):
        formula = memory._layer_bytes(config, dtype, config.has_value_embedding(i))
        assert layer_bytes == pytest.approx(formula, rel=0.01), f"layer {i}"
    # What does not grow with the batch: weight copies, masks, rotary tables, the fused
    # loss's fp32 weight gradient.
    fixed = memory._fixed_saves(config, dtype) + config.padded_vocab_size * config.n_embd * 4
    assert measured.fixed_bytes == pytest.approx(fixed, rel=0.05)


def test_per_layer_figure_is_the_mean_over_plain_and_value_embedding_layers():
    config = small_config(n_layer=5)
    plain = memory._layer_bytes(config, torch.bfloat16, False)
    with_ve = memory._layer_bytes(config, torch.bfloat16, True)
    assert with_ve > plain
    # 5 layers: value embeddings on layers 0, 2 and 4.
    expected = (3 * with_ve + 2 * plain) / 5
    assert memory.activation_bytes_per_token_per_layer(config, "bf16") == pytest.approx(expected)


def _measured_peak(config, dtype: torch.dtype, batch: int) -> int:
    torch.manual_seed(0)
    model = registry.build_model(config)
    optimizer = build_optimizer(
        model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
        weight_decay=0.0,
    )  # fmt: skip
    rows = torch.randint(0, config.vocab_size, (batch, config.sequence_len))
    autocast = (
        (lambda: torch.autocast("cpu", dtype=dtype))
        if dtype != torch.float32
        else contextlib.nullcontext
    )

    def step():
        for _ in range(2):  # gradient accumulation: gradients live through the second forward
            with autocast():
                loss = model(rows, rows)
            loss.backward()
            del loss
        optimizer.step()
        model.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    return measure_step_peak(model, optimizer, step)


PEAK_SHAPES = [
    dict(n_embd=256, n_head=4, n_kv_head=4, n_layer=4, sequence_len=128, vocab_size=4096,
         window_pattern="SSL"),
    dict(n_embd=256, n_head=4, n_kv_head=2, n_layer=2, sequence_len=256, vocab_size=8192,
         window_pattern="SL"),
    dict(n_embd=384, n_head=6, n_kv_head=6, n_layer=3, sequence_len=128, vocab_size=2048,
         window_pattern="L"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "batch"),
    [
        (PEAK_SHAPES[0], 4),
        (PEAK_SHAPES[1], 2),
        (PEAK_SHAPES[2], 4),
    ],
)
def test_predicted_peak_is_within_ten_percent_of_a_measured_cpu_step(shape, batch, dtype):
    config = small_config(**shape)
    measured = _measured_peak(config, dtype, batch)
    predicted = estimate_step(config, device_batch_size=batch, dtype=dtype, device_type="cpu")
    assert measured * 0.9 <= predicted.total <= measured * 1.1, (
        f"predicted {predicted.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
        f"({predicted.breakdown()})"
    )


FAMILY_SHAPES = {
    "gpt2": dict(sequence_len=128, vocab_size=4096, n_layer=3, n_head=4, n_embd=256, d_ff=1024),
    "hybrid": dict(sequence_len=128, vocab_size=4096, n_layer=4, n_embd=256, layer_pattern="LLLF",
                   n_head=4, n_kv_head=1, head_dim=64, n_k_heads=2, n_v_heads=4, k_head_dim=64,
                   v_head_dim=64, num_experts=4, experts_per_token=2, expert_dim=256,
                   shared_expert_dim=256, chunk_size=32),
}  # fmt: skip


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", torch.float32), ("hybrid", torch.bfloat16)])
def test_other_families_peak_is_predicted_within_a_quarter(family, dtype):
    # GPT-2 and the hybrid are planned from their own activation formulas with coarser
    # constants for the rest (training/memory.py `_estimate_family_step`): good enough to pick
    # a batch that fits, checked here against a measured step (Muon, two micro-batches).
    config = registry.config_from_dict({"model": family, **FAMILY_SHAPES[family]})
    measured = _measured_peak(config, dtype, 4)
    predicted = estimate_step(config, device_batch_size=4, dtype=dtype, device_type="cpu")
    assert measured * 0.75 <= predicted.total <= measured * 1.25, (
        f"predicted {predicted.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
        f"({predicted.breakdown()})"
    )


def test_live_byte_probe_counts_what_an_op_leaves_alive():
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keep = []

    def step():
        keep.append(torch.zeros(1024, 256))  # 1 MiB that stays alive
        torch.ones(2048, 256).sum()  # 2 MiB that dies at once

    resident = sum(p.numel() * 4 for p in model.parameters())
    peak = measure_step_peak(model, optimizer, step)
    # The sum's 4-byte result is made while the 2 MiB it reads is still alive.
    assert peak == resident + 1024 * 256 * 4 + 2048 * 256 * 4 + 4


def test_optimizer_term_equals_the_state_a_step_creates():
    config = small_config(n_layer=3, n_kv_head=2)
    model = GPT(config)
    optimizer = build_optimizer(
        model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
        weight_decay=0.0,
    )  # fmt: skip
    rows = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    model(rows, rows).backward()
    optimizer.step()
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    assert optimizer_bytes(config, world_size=1) == state
    # Sharded, a rank keeps its ceil(K / world) whole Muon matrices of each shape: with 3
    # layers that is 1 of 3; with 16 layers about 1/8 of the state.
    assert optimizer_bytes(config, world_size=8) < state / 2
    deep = small_config(n_layer=16)
    whole = optimizer_bytes(deep, world_size=1)
    assert whole / 8 <= optimizer_bytes(deep, world_size=8) <= whole / 8 * 1.2


def test_describe_reads_like_the_form():
    estimate = MemoryEstimate(
        params=20 * GIB, grads=20 * GIB, optimizer=10 * GIB, activations=10 * GIB,
        logits=GIB // 2, workspace=GIB // 2,
    )  # fmt: skip
    assert estimate.total == 61 * GIB
    assert estimate.describe(80 * GIB) == "≈ 61 of 80 GiB per GPU"
    assert estimate.describe(memory.gpu("H100-80GB").capacity_bytes) == "≈ 61 of 80 GiB per GPU"
    assert estimate.describe(memory.gpu("H200").capacity_bytes) == "≈ 61 of 140 GiB per GPU"


def test_auto_takes_the_largest_power_of_two_that_fits():
    config = GPTConfig.from_depth(12, vocab_size=65536)
    capacity = estimate_step(config, device_batch_size=8).total / 0.9 + 1
    batch, estimate = auto_device_batch(config, capacity_bytes=int(capacity), max_batch=32)
    assert batch == 8
    assert estimate.total <= capacity * 0.9
    assert not estimate_step(config, device_batch_size=16).fits(int(capacity))


def test_refusal_at_batch_one_names_the_field_and_the_numbers():
    config = GPTConfig.from_depth(20, vocab_size=65536)
    need = estimate_step(config, device_batch_size=1).total
    with pytest.raises(ValueError) as caught:
        auto_device_batch(config, capacity_bytes=16 * GIB)
    message = str(caught.value)
    assert message.startswith("device_batch_size: even 1 sequence(s) per forward pass need ")
    assert f"{need / GIB:.1f} GiB per GPU" in message
    assert "90% of the 16.0 GiB" in message
    # A given batch is refused the same way when not even one sequence fits...
    with pytest.raises(ValueError, match=r"^device_batch_size: even 1 sequence"):
        memory.choose_device_batch(config, 4, capacity_bytes=16 * GIB, where="test")
    # ...and kept (the prediction errs high) when one does.
    choice = memory.choose_device_batch(config, 64, capacity_bytes=80 * GIB, where="test")
    assert choice.device_batch_size == 64 and not choice.auto


def _fake_gpu(monkeypatch, capacity: int) -> torch.device:
    monkeypatch.setattr(memory, "device_capacity", lambda device: capacity)
    monkeypatch.setattr(memory, "device_name", lambda device: "Fake GPU")
    return torch.device("cuda", 0)


GPU_PRESETS = [p.stem for p in sorted((CONFIGS_DIR / "base").glob("*.yaml"))]


@pytest.mark.parametrize("preset", GPU_PRESETS)
@pytest.mark.parametrize("card", ["H100-80GB", "24GB"])
@pytest.mark.parametrize("world", [1, 8])
def test_auto_never_predicts_over_capacity_and_keeps_the_total_batch(
    monkeypatch, preset, card, world
):
    capacity = memory.gpu(card).capacity_bytes
    device = _fake_gpu(monkeypatch, capacity)
    config = base_train.FLAGS.validate(
        {**base_train.FLAGS.load_config_file(preset), "device_batch_size": "auto"}
    )
    assert config["device_batch_size"] == AUTO
    model_config = base_train.model_config_for(config, 65536)
    planned = base_train.planned_batch(config, world)
    try:
        choice = memory.device_batch_for(
            model_config, AUTO, device=device, world_size=world, dtype=torch.bfloat16,
            max_batch=planned,
        )  # fmt: skip
    except ValueError as exc:  # refused: not even one sequence fits
        assert str(exc).startswith("device_batch_size: even 1 sequence")
        assert not estimate_step(model_config, device_batch_size=1, world_size=world).fits(capacity)
        return
    assert choice.estimate.total <= capacity * memory.DEFAULT_HEADROOM
    assert choice.device_batch_size <= planned
    assert "Fake GPU" in choice.describe() and "device batch" in choice.describe()
    reference = base_train.plan(config, 65536, world, check_memory=False)
    chosen = base_train.plan(
        config, 65536, world, device_batch_size=choice.device_batch_size, check_memory=False
    )
    assert chosen.total_batch_size == reference.total_batch_size
    assert chosen.num_iterations == reference.num_iterations
    tokens = choice.device_batch_size * config["max_seq_len"] * world
    assert chosen.grad_accum_steps * tokens == chosen.total_batch_size


@pytest.mark.parametrize(("program", "base"), [("mid_train", "d20"), ("chat_sft", "d20"),
                                               ("mid_train", "d26"), ("chat_sft", "d26")])  # fmt: skip
@pytest.mark.parametrize("preset", ["speedrun", "gpt2"])
@pytest.mark.parametrize("card", ["H100-80GB", "24GB"])
def test_finetune_presets_auto_keeps_the_total_batch(monkeypatch, program, base, preset, card):
    from training import chat_sft, mid_train

    flags = {"mid_train": mid_train.FLAGS, "chat_sft": chat_sft.FLAGS}[program]
    config = flags.validate(flags.load_config_file(preset))
    assert config["device_batch_size"] == AUTO
    world, T = 8, 2048
    base_config = base_train.FLAGS.validate(base_train.FLAGS.load_config_file(base))
    model_config = base_train.model_config_for(base_config, 65536)
    device = _fake_gpu(monkeypatch, memory.gpu(card).capacity_bytes)
    planned = memory.planned_batch(
        config["device_batch_size"], config["total_batch_size"], T, world
    )
    try:
        choice = memory.device_batch_for(
            model_config, AUTO, device=device, world_size=world, dtype=torch.bfloat16,
            max_batch=planned,
        )  # fmt: skip
    except ValueError as exc:
        assert str(exc).startswith("device_batch_size: even 1 sequence")
        return
    assert choice.estimate.fits(memory.gpu(card).capacity_bytes)
    total = planning_config(config, T, world)["total_batch_size"]
    expected = config["total_batch_size"] if config["total_batch_size"] > 0 else 32 * T * world
    assert total == expected
    assert total % (choice.device_batch_size * T * world) == 0


def test_finetune_memory_check_refuses_what_cannot_fit_one_row(monkeypatch):
    from training import chat_sft
    from training.finetune import memory_choice

    _fake_gpu(monkeypatch, memory.gpu("H100-80GB").capacity_bytes)
    config = chat_sft.FLAGS.validate(chat_sft.FLAGS.load_config_file("speedrun"))
    d20 = GPTConfig.from_depth(20, vocab_size=65536).to_dict()
    choice = memory_choice(config, d20, 8)
    assert choice.estimate.fits(memory.gpu("H100-80GB").capacity_bytes)
    assert "Fake GPU" in choice.describe()
    d48 = GPTConfig.from_depth(48, vocab_size=65536).to_dict()
    with pytest.raises(ValueError, match=r"^device_batch_size: even 1 sequence"):
        memory_choice(config, d48, 1)
    assert memory_choice({**config, "device": "cpu"}, d48, 1) is None


def test_device_batch_flag_takes_auto_numbers_and_refuses_zero():
    flags = base_train.FLAGS
    assert flags.parse(["--device-batch-size", "auto"])["device_batch_size"] == AUTO
    assert flags.parse(["--device-batch-size", "-1"])["device_batch_size"] == AUTO
    assert flags.parse(["--device-batch-size", "8"])["device_batch_size"] == 8
    assert flags.validate({"device_batch_size": "AUTO"})["device_batch_size"] == AUTO
    with pytest.raises(ConfigError) as caught:
        flags.validate({"device_batch_size": 0})
    assert "device_batch_size" in caught.value.errors


def test_cpu_auto_is_capped_by_the_machine_and_keeps_thirty_two_when_it_fits(monkeypatch):
    config = small_config(sequence_len=1024)  # activations dominate, so batches differ
    choice = memory.device_batch_for(
        config, AUTO, device=torch.device("cpu"), world_size=1, dtype=torch.float32
    )
    assert choice.device_batch_size == memory.AUTO_MAX_BATCH
    two_rows = estimate_step(config, device_batch_size=2, dtype="fp32", device_type="cpu")
    monkeypatch.setattr(memory, "host_memory", lambda: 2 * int(two_rows.total / 0.9 + 1))
    choice = memory.device_batch_for(
        config, AUTO, device=torch.device("cpu"), world_size=2, dtype=torch.float32
    )
    assert choice.device_batch_size == 2  # half the machine per process: 4 rows do not fit


def test_web_planning_refuses_a_gpu_run_that_cannot_fit_and_skips_cpu_runs(monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device: None)
    huge = base_train.FLAGS.validate({"depth": 40, "device_batch_size": 1})
    with pytest.raises(ValueError, match=r"^device_batch_size: even 1 sequence.*of the 79\.6 GiB"):
        base_train.plan(huge, 65536, 1)
    # The same config meant for a CPU is not checked against a GPU.
    base_train.plan({**huge, "device": "cpu"}, 65536, 1)


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_cli_reads_presets_as_base_train_does(preset):
    config = base_train.FLAGS.validate(base_train.FLAGS.load_config_file(preset))
    model_config, batch = memory.preset_model(preset, 65536)
    assert model_config == base_train.model_config_for(config, 65536)
    assert batch == config["device_batch_size"]
    deeper, _ = memory.preset_model(preset, 512, {"depth": 6, "max_seq_len": 128})
    given = base_train.FLAGS.validate({**config, "depth": 6, "max_seq_len": 128})
    assert deeper == base_train.model_config_for(given, 512)


def test_cli_prints_both_gpus_at_one_and_eight_processes(capsys):
    assert memory.main(["--config", "d20", "--no-probe"]) == 0
    out = capsys.readouterr().out
    for card in ("H100-80GB", "H200"):
        for world in (1, 8):
            assert re.search(rf"^{card} +{world} +[0-9.]+ ", out, re.M), (card, world)
    assert "of 80 GiB per GPU" in out and "of 140 GiB per GPU" in out
    assert "device batch auto" in out and "activations per token per layer" in out
