"""engine.models.hybrid: the Qwen3-Next-style family -- MoE routing and its balancing loss,
cached linear attention, training, closed forms, checkpoints and the engine's continuous
batching over recurrent states."""

import math

import pytest
import torch

from engine.checkpoint import load_model, save_checkpoint
from engine.engine import Batch, Engine, SamplingParams
from engine.models import hybrid as hybrid_module
from engine.models.hybrid import (
    FAMILY,
    Hybrid,
    HybridConfig,
    activation_bytes_per_token,
    config_from_flags,
    count_params,
    flops_per_token,
    scaling_params,
)
from engine.models.hybrid_cache import HybridCache
from engine.models.hybrid_layers import GatedDeltaNet, SparseMoE, load_balancing_loss, swiglu
from engine.models.registry import config_from_dict, family
from training.memory import measure_saved

VOCAB = 300  # not a multiple of 64: the lm_head is padded to 320


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    fields = dict(
        sequence_len=96, vocab_size=VOCAB, n_layer=4, n_embd=64, layer_pattern="LLLF",
        n_head=4, n_kv_head=2, head_dim=16, partial_rotary=0.5,
        n_k_heads=2, n_v_heads=4, k_head_dim=16, v_head_dim=16, chunk_size=16,
        num_experts=4, experts_per_token=2, expert_dim=32, shared_expert_dim=32,
    )  # fmt: skip
    fields.update(overrides)
    return HybridConfig(**fields)


def randomise(module, seed):
    """Non-trivial weights everywhere (at init the zero output projections make every block
    the identity, which would hide cache bugs behind flat logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "wte" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(-1)))
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return module


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomise(Hybrid(tiny_config(**overrides)), seed + 1).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


# ---- MoE --------------------------------------------------------------------------------------


def dense_moe_reference(moe, x):
    """Every token through its k experts one at a time, plus the shared expert."""
    probs, experts, weights = moe.route(x)
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        for j in range(moe.top_k):
            e = int(experts[n, j])
            out[n] += weights[n, j] * swiglu(x[n : n + 1], moe.w_in[e], moe.w_out[e])[0]
    if moe.shared_in is not None:
        shared = swiglu(x, moe.shared_in.weight, moe.shared_out.weight)
        out += torch.sigmoid(moe.shared_gate(x)) * shared
    return out


@pytest.mark.parametrize("shared", [32, 0])
def test_every_token_gets_exactly_its_k_experts_and_none_is_dropped(shared):
    torch.manual_seed(0)
    moe = randomise(
        SparseMoE(tiny_config(shared_expert_dim=shared, num_experts=6, experts_per_token=3)), 1
    )
    x = torch.randn(37, 64)
    probs, experts, weights = moe.route(x)
    assert experts.shape == (37, 3)
    assert all(len(set(row)) == 3 for row in experts.tolist())  # k distinct experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(37))
    torch.testing.assert_close(probs.sum(-1), torch.ones(37))
    # The chosen experts are the k most probable ones.
    assert torch.equal(probs.topk(3, dim=-1).indices.sort().values, experts.sort().values)
    out, aux = moe(x)
    torch.testing.assert_close(out, dense_moe_reference(moe, x), atol=1e-5, rtol=1e-5)
    # No capacity limit: the recorded load is over all N * k assignments.
    counts = torch.bincount(experts.reshape(-1), minlength=6).float()
    torch.testing.assert_close(moe.last_load, counts / (37 * 3))


def test_the_shared_expert_is_scaled_by_its_sigmoid_gate():
    torch.manual_seed(0)
    moe = randomise(SparseMoE(tiny_config()), 2)
    x = torch.randn(5, 64)
    with torch.no_grad():
        full = moe(x)[0]
        shared = swiglu(x, moe.shared_in.weight, moe.shared_out.weight)
        gate = torch.sigmoid(moe.shared_gate(x))
        moe.shared_out.weight.zero_()
        routed_only = moe(x)[0]
    assert gate.shape == (5, 1) and not torch.allclose(gate, gate.mean())
    torch.testing.assert_close(full - routed_only, gate * shared, atol=1e-5, rtol=1e-5)


def test_aux_loss_is_one_for_exactly_balanced_routing_by_hand():
    # Uniform probabilities and loads: E * sum_i (1/E)(1/E) = 1, whatever E and k.
    for e in (2, 4, 8):
        probs = torch.full((10, e), 1 / e)
        load = torch.full((e,), 1 / e)
        assert load_balancing_loss(probs, load).item() == pytest.approx(1.0, abs=1e-7)
    # By hand, E = 4, k = 2: token 0 prefers experts {0, 1}, token 1 experts {2, 3}, with
    # mirrored probabilities: P = (0.25,)*4 and f = (0.25,)*4 -> 4 * 4 * 1/16 = 1.
    moe = SparseMoE(tiny_config(n_embd=64, num_experts=4, experts_per_token=2))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = moe.router.weight[1, 0] = 2.0
        moe.router.weight[2, 1] = moe.router.weight[3, 1] = 2.0
        for p in (moe.w_in, moe.w_out):
            p.normal_()
    x = torch.zeros(2, 64)
    x[0, 0] = x[1, 1] = 1.0
    with torch.enable_grad():
        _, aux = moe(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(moe.last_load, torch.full((4,), 0.25))


def test_aux_loss_grows_when_the_router_collapses():
    moe = SparseMoE(tiny_config(num_experts=4, experts_per_token=2))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = 10.0  # every token prefers experts 0 and 1
        for p in (moe.w_in, moe.w_out):
            p.normal_()
    x = torch.randn(50, 64)
    x[:, 0] = 3.0
    with torch.enable_grad():
        _, aux = moe(x)
    torch.testing.assert_close(moe.last_load, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert aux.item() > 1.9  # E/k = 2 for a complete collapse


def test_training_metrics_report_the_load_of_the_last_training_forward(model):
    ids = torch.randint(0, VOCAB, (2, 32))
    model.train()
    try:
        loss = model(ids, ids)
    finally:
        model.eval()
    metrics = model.training_metrics()
    assert loss.requires_grad
    expected = {"moe/aux_loss", "moe/load_max"} | {f"moe/load_max/l{i}" for i in range(4)}
    assert set(metrics) == expected
    assert 1.0 <= metrics["moe/load_max"] <= model.config.num_experts
    assert metrics["moe/load_max"] == max(metrics[f"moe/load_max/l{i}"] for i in range(4))
    assert metrics["moe/aux_loss"] >= 0.99


# ---- linear attention with a cache -----------------------------------------------------------


def linear_layer_cache(config, batch, max_len=64):
    return HybridCache(
        n_full=0, n_linear=1, batch_size=batch, max_len=max_len, n_kv_head=config.n_kv_head,
        head_dim=config.head_dim, conv_dim=config.conv_dim, conv_kernel=config.conv_kernel,
        n_v_heads=config.n_v_heads, k_head_dim=config.k_head_dim, v_head_dim=config.v_head_dim,
        device="cpu", dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("splits", [(7, 1), (5, 9, 1), (1, 1, 30)])
def test_gated_deltanet_prefill_then_steps_equals_one_pass(splits):
    config = tiny_config(n_k_heads=1, n_v_heads=4, v_head_dim=24)  # q/k repeated to 4 heads
    torch.manual_seed(0)
    layer = GatedDeltaNet(config, 0)
    layer.init_gates()  # the only parameters `randomise` does not overwrite
    layer = randomise(layer, 3)
    x = torch.randn(2, 40, config.n_embd)
    with torch.no_grad():
        full = layer(x)
        cache = linear_layer_cache(config, 2)
        rows = cache.rows(0, 2)
        outs, t = [], 0
        # The first split is a prefill; the middle ones more prefills from a saved state;
        # the last size repeats (one token per step: decode) until the end.
        sizes = list(splits[:-1])
        while sum(sizes) < x.size(1):
            sizes.append(min(splits[-1], x.size(1) - sum(sizes)))
        for size in sizes:
            outs.append(layer(x[:, t : t + size], rows))
            rows.advance(size)
            t += size
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=2e-5)
    assert cache.recurrent.abs().sum() > 0 and cache.conv.abs().sum() > 0


@pytest.mark.parametrize("pattern", ["LLLF", "L", "F", "FL"])
def test_cached_prefill_and_decode_give_the_full_forward_logits(pattern):
    model = make_model(layer_pattern=pattern)
    ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        rows = model.new_cache(3, 40).rows(0, 3)
        outs = [model(ids[:, :11], kv_cache=rows)]
        outs += [model(ids[:, t : t + 1], kv_cache=rows) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)
    assert rows.host_lengths() == [30, 30, 30]
    with pytest.raises(ValueError, match="overflow"), torch.no_grad():
        model(ids[:, :11], kv_cache=rows)


def test_reset_replicate_and_move_carry_every_state(model):
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache.rows(0, 1))
    cache.replicate(0, 1, 3)
    for store in (cache.conv, cache.recurrent, cache.kv.k):
        assert torch.equal(store[:, 1], store[:, 0]) and torch.equal(store[:, 2], store[:, 0])
    assert cache.host_lengths == [4, 4, 4] and cache.lengths.tolist() == [4, 4, 4]
    cache.reset(1)
    assert cache.conv[:, 1].abs().sum() == 0 and cache.recurrent[:, 1].abs().sum() == 0
    assert cache.host_lengths == [4, 0, 4]
    cache.move(2, 1)
    assert torch.equal(cache.recurrent[:, 1], cache.recurrent[:, 0]) and cache.host_lengths[1] == 4


# ---- training ---------------------------------------------------------------------------------


def test_a_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = Hybrid(tiny_config(sequence_len=32))
    ids = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -1  # ignored targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(math.isfinite(v) for v in losses)
    metrics = model.training_metrics()
    assert {"moe/aux_loss", "moe/load_max", "moe/load_max/l3"} <= set(metrics)


def test_training_loss_adds_the_aux_loss_and_reductions_agree(model):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    targets = ids.roll(-1, dims=1)
    targets[1, -3:] = -1
    with torch.no_grad():
        token_losses = model(ids, targets, loss_reduction="none")
        eval_mean = model(ids, targets)
    assert token_losses.shape == (2, 24) and torch.all(token_losses[1, -3:] == 0)
    torch.testing.assert_close(token_losses.sum() / (targets != -1).sum(), eval_mean)
    train_loss = model(ids, targets)
    aux = torch.stack([moe.last_aux for moe in model.moe_layers()]).mean()
    expected = eval_mean + model.config.aux_loss_coef * aux
    torch.testing.assert_close(train_loss.detach(), expected, atol=1e-5, rtol=1e-5)
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 24, VOCAB)


# ---- closed forms -----------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(layer_pattern="LF", n_layer=5, shared_expert_dim=0, num_experts=6, experts_per_token=3),
    dict(layer_pattern="F", n_layer=2, n_kv_head=4, head_dim=32, partial_rotary=0.25),
    dict(layer_pattern="L", n_layer=3, n_k_heads=1, n_v_heads=2, k_head_dim=24, v_head_dim=40,
         conv_kernel=3, vocab_size=1000, expert_dim=48),
]  # fmt: skip


@pytest.mark.parametrize("overrides", CONFIGS)
def test_closed_forms_match_the_built_model(overrides):
    config = tiny_config(**overrides)
    model = Hybrid(config)
    assert model.num_scaling_params() == count_params(config)
    assert count_params(config)["total"] == sum(p.numel() for p in model.parameters())
    assert model.estimate_flops() == flops_per_token(config)
    assert FAMILY.flops_per_token(config) == flops_per_token(config)
    assert scaling_params(config) < count_params(config)["total"]
    groups = model.param_groups()
    assert list(groups) == ["matrices", "embeddings", "lm_head", "vectors"]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() in (2, 3) for p in groups["matrices"])
    assert any(p.dim() == 3 for p in groups["matrices"])  # expert stacks
    conv = {id(m.mixer.conv_weight) for m in model.blocks if m.kind == "linear"}
    assert conv <= {id(p) for p in groups["vectors"]}
    assert groups["embeddings"] == [model.wte.weight]


def test_param_groups_refuse_a_parameter_they_do_not_know(model):
    extra = Hybrid(tiny_config(n_layer=1))
    extra.stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="exactly once"):
        extra.param_groups()


def test_scaling_params_count_only_the_active_experts():
    dense = tiny_config(num_experts=2, experts_per_token=2)
    sparse = tiny_config(num_experts=8, experts_per_token=2)
    router_growth = sparse.n_layer * (8 - 2) * sparse.n_embd
    assert scaling_params(sparse) - scaling_params(dense) == router_growth
    assert count_params(sparse)["total"] > count_params(dense)["total"] + router_growth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_per_token_follow_the_saved_tensor_probe(dtype):
    config = tiny_config(sequence_len=64, chunk_size=32, shared_expert_dim=48, vocab_size=512)
    torch.manual_seed(0)
    model = Hybrid(config)
    ignore = list(model.parameters()) + list(model.buffers())

    def saved(batch):
        ids = torch.randint(0, config.vocab_size, (batch, config.sequence_len))

        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                return model(ids, ids)

        return measure_saved(run, layers=list(model.blocks), ignore=ignore).total

    # The difference of two batch sizes leaves out what a step saves once (weight casts).
    measured = (saved(3) - saved(1)) / (2 * config.sequence_len)
    predicted = activation_bytes_per_token(config, dtype)
    assert predicted == pytest.approx(measured, rel=0.25)
    assert FAMILY.activation_bytes_per_token(config, dtype) == predicted
    assert activation_bytes_per_token(config, "bf16") == activation_bytes_per_token(
        config, torch.bfloat16
    )


# ---- config -----------------------------------------------------------------------------------


def test_config_round_trips_through_the_registry():
    config = tiny_config()
    assert config.to_dict()["model"] == "hybrid"
    assert config_from_dict(config.to_dict()) == config
    assert family("hybrid") is FAMILY and FAMILY.config_cls is HybridConfig
    assert config.layer_kinds() == ["linear", "linear", "linear", "full"]
    assert tiny_config(n_layer=6).layer_kinds()[4:] == ["linear", "linear"]  # not forced
    assert config.padded_vocab_size == 320 and config.rotary_dim == 8


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(model="gpt"), "model"),
        (dict(layer_pattern="LLXF"), "layer_pattern"),
        (dict(layer_pattern=""), "layer_pattern"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_k_heads=3, n_v_heads=4), "n_k_heads"),
        (dict(partial_rotary=0.3), "partial_rotary"),
        (dict(partial_rotary=0.0), "partial_rotary"),
        (dict(experts_per_token=5), "experts_per_token"),
        (dict(shared_expert_dim=-1), "shared_expert_dim"),
        (dict(expert_dim=0), "expert_dim"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_from_flags():
    flags = {"depth": 4, "max_seq_len": 256, "aspect_ratio": 40, "head_dim": 64, "n_kv_head": -1}
    config = FAMILY.config_from_flags(flags, 1000)
    assert config == config_from_flags(flags, 1000)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (4, 192, 3, 1)
    assert (config.n_k_heads, config.n_v_heads, config.k_head_dim) == (1, 3, 64)
    assert config.expert_dim == config.shared_expert_dim == 192
    assert (config.num_experts, config.experts_per_token, config.chunk_size) == (8, 2, 64)
    assert config.layer_pattern == "LLLF" and config.sequence_len == 256
    big = config_from_flags(
        {"depth": 8, "max_seq_len": 64, "head_dim": 64, "num_experts": 16, "expert_dim": 96,
         "layer_pattern": "LF", "delta_chunk_size": 32, "aux_loss_coef": 0.01}, 500,
    )  # fmt: skip
    assert (big.n_head, big.n_kv_head, big.n_k_heads, big.expert_dim) == (8, 2, 4, 96)
    assert (big.layer_pattern, big.chunk_size, big.aux_loss_coef) == ("LF", 32, 0.01)
    assert set(FAMILY.flags) >= {"layer_pattern", "num_experts", "delta_chunk_size"}


def test_init_is_finite_and_gates_start_in_their_ranges():
    model = Hybrid(tiny_config())
    for block in model.blocks:
        if block.kind == "linear":
            a = block.mixer.A_log.exp()
            assert torch.all((a >= 1) & (a <= 16))
            dt = torch.nn.functional.softplus(block.mixer.dt_bias)
            assert torch.all((dt > 0.9e-3) & (dt < 0.11))
            assert torch.all(block.mixer.out_proj.weight == 0)
        assert torch.all(block.moe.w_out == 0)
    ids = torch.randint(0, VOCAB, (2, 20))
    assert torch.isfinite(model(ids)).all()


# ---- checkpoints ------------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(tmp_path, model):
    save_checkpoint(tmp_path, 7, model_state=model.state_dict(), model_config=model.config)
    loaded, meta = load_model(tmp_path, 7)
    assert isinstance(loaded, Hybrid) and meta["model_config"]["model"] == "hybrid"
    assert loaded.config == model.config
    ids = torch.randint(0, VOCAB, (2, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    torch.testing.assert_close(loaded.rotary_cos, model.rotary_cos)


# ---- the engine -------------------------------------------------------------------------------

PROMPT = [5, 17, 99, 3, 250, 41]


def run_alone(model, prompt, params):
    batch = Batch(model, None, max_rows=1)
    row = batch.add(prompt, params)
    while batch.rows:
        batch.step()
    return row.output_tokens


def test_greedy_cached_decoding_equals_full_reforward(model):
    expected = list(model.generate_naive(PROMPT, 70, temperature=0.0))
    assert len(set(expected)) > 5  # not a degenerate repetition
    columns = list(Engine(model, None).generate(PROMPT, max_tokens=70, temperature=0.0))
    assert [column[0] for column, _ in columns] == expected
    sequences, masks = Engine(model, None).generate_batch(
        PROMPT, num_samples=2, max_tokens=20, temperature=0.0
    )
    assert sequences == [PROMPT + expected[:20]] * 2
    assert masks == [[0] * len(PROMPT) + [1] * 20] * 2
    one_token = Engine(model, None).generate_batch([7], max_tokens=10, temperature=0.0)[0]
    assert one_token[0] == [7, *model.generate_naive([7], 10)]


def test_rows_joining_and_leaving_a_running_batch_decode_like_the_full_reforward(model):
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [42], [60, 61, 62]]
    max_tokens = [12, 64, 30, 20]
    expected = [
        list(model.generate_naive(p, n, temperature=0.0))
        for p, n in zip(prompts, max_tokens, strict=True)
    ]
    batch = Batch(model, None, max_rows=4)
    rows = [batch.add(prompts[0], SamplingParams(max_tokens=max_tokens[0], temperature=0.0))]
    for _ in range(3):
        batch.step()
    for i in (1, 2):
        rows.append(
            batch.add(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0.0))
        )
    batch.step()
    rows.append(batch.add(prompts[3], SamplingParams(max_tokens=max_tokens[3], temperature=0.0)))
    while batch.rows:
        batch.step()
    for row, tokens in zip(rows, expected, strict=True):
        assert row.output_tokens == tokens


def test_a_reused_slot_does_not_leak_the_previous_rows_state(model):
    greedy = SamplingParams(max_tokens=25, temperature=0.0)
    batch = Batch(model, None, max_rows=2)
    short = batch.add([3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_tokens=6, temperature=0.0))
    long = batch.add([2, 7, 1, 8, 2, 8], SamplingParams(max_tokens=40, temperature=0.0))
    while not short.done:
        batch.step()
    # `short` left slot 0; `long` moved into it; slot 1 still holds long's old state.
    assert long.slot == 0 and batch.free_rows == 1
    reused = batch.add([11, 12, 13, 14], greedy)  # prefilled into slot 1 after a reset
    assert reused.slot == 1
    while not reused.done:
        batch.step()
    assert reused.output_tokens == run_alone(model, [11, 12, 13, 14], greedy)
    one_token = batch.add([77], greedy)  # no prefill: the reset state alone must be clean
    while batch.rows:
        batch.step()
    assert one_token.output_tokens == run_alone(model, [77], greedy)
    assert long.output_tokens == run_alone(
        model, [2, 7, 1, 8, 2, 8], SamplingParams(max_tokens=40, temperature=0.0)
    )


def test_static_shapes_are_refused_for_recurrent_state(model):
    with pytest.raises(ValueError, match="recurrent"):
        Batch(model, None, max_rows=2, static_shapes=True)


def test_module_docstrings_say_why():
    assert "three linear layers per full one" in hybrid_module.__doc__
