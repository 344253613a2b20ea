"""engine.models.gpt (and the precision helpers in engine.common) on tiny CPU configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.common import autocast, autodetect_device, compute_dtype
from engine.models import heads
from engine.models.gpt import (
    GPT,
    LEGACY_FIELDS,
    GPTConfig,
    ReferenceKVCache,
    apply_rotary,
    count_params,
    flops_per_token,
    relu_square,
    rms_norm,
    rotary_tables,
)
from engine.models.heads import sample_next_token

VOCAB = 300  # deliberately not a multiple of 64, so the lm_head is padded to 320
# Short windows of half the context, unrounded (the legacy rule): at the tiny contexts of
# these tests nanochat's rule (a quarter rounded up to 128) never binds.
HALF_WINDOWS = dict(short_window_divisor=2, short_window_multiple=1)


def tiny_config(**overrides):
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    fields.update(overrides)
    return GPTConfig(**fields)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


@torch.no_grad()
def randomize(model, seed=1):
    """Give every weight a non-trivial value: at init the zero projections would hide attention."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 2 and "wte" not in name and "value_embeds" not in name:
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
        elif param.dim() == 1:
            param.add_(0.1 * torch.randn(param.shape, generator=gen))


def tokens(batch, seq, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 96, "n_head": 5}, "divisible by n_head"),
        ({"n_head": 4, "n_kv_head": 3}, "divisible by n_kv_head"),
        ({"window_pattern": "SXL"}, "window_pattern"),
        ({"window_pattern": ""}, "window_pattern"),
        ({"n_embd": 16, "n_head": 1, "n_kv_head": 1, **LEGACY_FIELDS}, "at least 32"),
        ({"n_embd": 16, "n_head": 1, "n_kv_head": 1}, "at least 24, the channels the smear"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": 30.5}, "vocab_size"),
        ({"n_embd": 66, "n_head": 6, "n_kv_head": 6}, "even"),
        ({"rotary_base": 1}, "rotary_base"),
        ({"rotary_base": 1e5}, "rotary_base"),
        ({"qk_scale": 0}, "qk_scale"),
        ({"qk_scale": float("nan")}, "qk_scale"),
        ({"ve_gate_channels": 0}, "ve_gate_channels"),
        ({"ve_gate_channels": 65}, "at least 65"),
        ({"ve_gate_range": -3}, "ve_gate_range"),
        ({"short_window_divisor": 0}, "short_window_divisor"),
        ({"short_window_multiple": True}, "short_window_multiple"),
        ({"smear": 1}, "smear must be true or false"),
        ({"backout": "yes"}, "backout must be true or false"),
        ({"wte_init_std": float("inf")}, "wte_init_std"),
        ({"value_embed_init": "xavier"}, "value_embed_init"),
        ({"gate_init_max": -0.1}, "gate_init_max"),
        ({"x0_lambda_first": "0.2"}, "x0_lambda_first"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_window_pattern_is_case_insensitive():
    assert tiny_config(window_pattern="ssl").window_pattern == "SSL"


def test_from_depth_rounds_width_up_to_whole_heads():
    config = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=64, head_dim=64)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (128, 2, 2, 2)
    # 3 * 64 = 192 is not a multiple of 128, so the width rounds up to 256.
    config = GPTConfig.from_depth(3, vocab_size=VOCAB, head_dim=128)
    assert (config.n_embd, config.n_head) == (256, 2)
    config = GPTConfig.from_depth(4, vocab_size=VOCAB, head_dim=64, n_kv_head=2)
    assert (config.n_head, config.n_kv_head) == (4, 2)
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0, vocab_size=VOCAB)


def test_window_sizes_tile_the_pattern_and_end_with_full_context():
    config = tiny_config(n_layer=6, sequence_len=64, window_pattern="SSSL", **HALF_WINDOWS)
    assert config.window_sizes() == [32, 32, 32, 64, 32, 64]
    config = tiny_config(n_layer=3, sequence_len=64, window_pattern="S", **HALF_WINDOWS)
    assert config.window_sizes() == [32, 32, 64]
    model = GPT(tiny_config(n_layer=3, window_pattern="SL", **HALF_WINDOWS))
    assert model.window_sizes == [16, 32, 32]


@pytest.mark.parametrize(
    ("sequence_len", "short"), [(2048, 512), (1000, 256), (512, 128), (64, 128), (4096, 1024)]
)
def test_short_window_is_a_quarter_of_the_context_rounded_up_to_128(sequence_len, short):
    # nanochat's rule (FA3 tiles of 128 positions); the legacy rule was half, unrounded.
    config = tiny_config(sequence_len=sequence_len, n_layer=3, window_pattern="SSL")
    assert config.short_window == short
    assert config.window_sizes() == [short, short, sequence_len]
    legacy = tiny_config(sequence_len=sequence_len, **{**LEGACY_FIELDS})
    assert legacy.short_window == sequence_len // 2


@pytest.mark.parametrize(("n_layer", "expected"), [(2, ["1"]), (3, ["0", "2"]), (4, ["1", "3"])])
def test_value_embeddings_on_alternating_layers_ending_with_the_last(n_layer, expected):
    model = GPT(tiny_config(n_layer=n_layer))
    assert sorted(model.value_embeds.keys()) == expected
    gated = [
        str(i) for i, block in enumerate(model.transformer.h) if block.attn.ve_gate is not None
    ]
    assert gated == expected


# --- rotary ----------------------------------------------------------------------------------


def test_rotary_pairs_channel_i_with_i_plus_half_at_base_10000():
    cos, sin = rotary_tables(8, head_dim=8)
    x = torch.zeros(1, 8, 1, 8)
    x[..., 1] = 1.0
    y = apply_rotary(x, cos[None, :, None], sin[None, :, None])
    # Channel 1 of 4 pairs rotates at 10000^(-2/8) radians per position, into channel 5.
    angle = 3 * 10000 ** (-2 / 8)
    torch.testing.assert_close(y[0, 3, 0, 1], torch.tensor(math.cos(angle)))
    torch.testing.assert_close(y[0, 3, 0, 5], torch.tensor(math.sin(angle)))
    assert torch.count_nonzero(y[0, 3, 0]) == 2
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(40, head_dim=16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)

    def score(q_pos, k_pos):
        rq = apply_rotary(q.view(1, 1, 1, 16), cos[q_pos], sin[q_pos])
        rk = apply_rotary(k.view(1, 1, 1, 16), cos[k_pos], sin[k_pos])
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(30, 26))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rotary_base_is_the_configs_and_frequencies_round_as_nanochat_rounds_them():
    model = tiny_model()
    assert model.config.rotary_base == 100_000
    exponents = torch.arange(0, 32, 2, dtype=torch.float32) / 32
    angles = torch.outer(torch.arange(320, dtype=torch.float32), 1.0 / 100_000**exponents)
    assert torch.equal(model.rotary_cos, angles.cos())
    assert torch.equal(model.rotary_sin, angles.sin())
    # Base 10,000 (every checkpoint written before) keeps the old rounding, base ** -e.
    legacy = tiny_model(**LEGACY_FIELDS)
    old_angles = torch.outer(torch.arange(320, dtype=torch.float32), 10_000**-exponents)
    assert torch.equal(legacy.rotary_cos, old_angles.cos())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_identical_to_the_textbook_formula(dtype):
    cos, sin = rotary_tables(12, head_dim=16)
    cos, sin = cos[None, :, None], sin[None, :, None]
    x = torch.randn(2, 12, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x1, x2 = x[..., :8], x[..., 8:]
    c, s = cos.to(dtype), sin.to(dtype)
    expected = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), expected)


# --- fused building blocks: same numbers, fewer ops ---------------------------------------------


def test_relu_square_equals_autograd_of_relu_then_square():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=gen, requires_grad=True)
    upstream = torch.randn(6, 40, generator=gen)
    ours = relu_square(x)
    reference = F.relu(x).square()
    assert torch.equal(ours, reference)
    (grad,) = torch.autograd.grad(ours, x, upstream)
    (expected,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_mlp_saving_only_relu_gives_the_same_numbers_as_autograd(bf16):
    # Training runs relu^2 and c_proj as one function that recomputes the square in backward;
    # outputs and gradients must equal plain autograd's bit for bit, with and without autocast.
    model = tiny_model()
    randomize(model)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours = mlp(x)
        reference = mlp.c_proj(F.relu(mlp.c_fc(x)).square())
    assert ours.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(ours, reference)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(ours.dtype)
    params = (x, mlp.c_fc.weight, mlp.c_proj.weight)
    for got, want in zip(
        torch.autograd.grad(ours, params, upstream),
        torch.autograd.grad(reference, params, upstream),
        strict=True,
    ):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def saved_bytes_per_token_by_layer(model, seq, rows=(1, 2)):
    """Bytes autograd saves for backward per token, layer by layer, under CPU bf16 autocast.

    Each distinct storage counts once (parameters and buffers not at all), for the layer that
    was running when it was first saved; a layer runs from its block's start to the next
    block's start, so it includes the residual mix before the next block. The figure is the
    slope between two batch sizes, so weight casts and masks drop out.
    """
    blocks = list(model.transformer.h)
    ignore = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    totals = []
    for batch in rows:
        current, seen, per_layer = [-1], set(), [0] * len(blocks)

        def pack(tensor, current=current, seen=seen, per_layer=per_layer):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in ignore and key not in seen:
                seen.add(key)
                if current[0] >= 0:  # not before the first block (embeddings, x0)
                    per_layer[current[0]] += storage.nbytes()
            return tensor

        hooks = [
            block.register_forward_pre_hook(lambda m, a, i=i, c=current: c.__setitem__(0, i))
            for i, block in enumerate(blocks)
        ]
        idx = tokens(batch, seq)
        try:
            with (
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                torch.autocast("cpu", dtype=torch.bfloat16),
            ):
                loss = model(idx, idx)
        finally:
            for hook in hooks:
                hook.remove()
        del loss
        totals.append(per_layer)
    tokens_added = (rows[1] - rows[0]) * seq
    return [(b - a) / tokens_added for a, b in zip(*totals, strict=True)]


def test_saved_bytes_per_token_per_layer_stay_within_the_formula():
    # What a layer may keep for backward under bf16 autocast, per token (C = width,
    # kv = kv width, H / Hkv = heads, fp32 residual stream, bf16 activations):
    #   residual mix before the next layer: its input, fp32              4 C
    #   attention: norm input fp32 + rstd, the matmul's bf16 input       4 C + 4 + 2 C
    #              q/k norm input (fp32 inside rms_norm) + rstds         4 (C + kv) + 4 (H + Hkv)
    #              normed q, k and a copy of v, bf16                     2 (C + kv) + 2 kv
    #              attention output bf16 + log-sum-exp                   2 C + 4 H
    #   MLP:       norm input fp32 + rstd, the matmul's bf16 input       4 C + 4 + 2 C
    #              relu of the 4C hidden layer, bf16 (relu^2 recomputed) 8 C
    #   value-embedding layers also: the table row fp32, the gate twice, the gate's input
    #                                                                    4 kv + 4 Hkv + 64
    # 40 C at d20's kv = C: 67 KB before the MLP and v stopped saving extra copies. One more
    # fp32 copy of the residual (4 C) or a saved relu^2 (8 C) fails this.
    config = tiny_config(
        n_embd=128, n_head=2, n_kv_head=1, n_layer=4, sequence_len=64, window_pattern="SL"
    )
    torch.manual_seed(0)
    model = GPT(config)
    c, kv, h, hkv = config.n_embd, config.kv_dim, config.n_head, config.n_kv_head
    base = 4 * c + (4 * c + 4 + 2 * c) + 4 * (c + kv) + 4 * (h + hkv)
    base += 2 * (c + kv) + 2 * kv + 2 * c + 4 * h + (4 * c + 4 + 2 * c) + 8 * c
    measured = saved_bytes_per_token_by_layer(model, seq=32)
    # The last layer has no mix after it; every other layer is a block plus the next mix.
    for layer, got in enumerate(measured[:-1]):
        bound = base + (4 * kv + 4 * hkv + 64 if config.has_value_embedding(layer) else 0)
        assert 0.9 * bound <= got <= bound, (layer, got, bound)


def test_qkv_projection_with_and_without_autograd_equals_the_three_projections():
    model = tiny_model(n_head=4, n_kv_head=2)
    randomize(model)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    separate = torch.cat((attn.c_q(x), attn.c_k(x), attn.c_v(x)), dim=-1)
    fused = attn.project_qkv(x)  # autograd on: one matmul on the stacked weights
    assert fused.grad_fn is not None
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(attn.project_qkv(x), separate)
    # The stacked weight is derived on each call: the parameters and checkpoints keep their
    # names and shapes.
    assert set(model.state_dict()) == set(tiny_model(n_head=4, n_kv_head=2).state_dict())


# --- forward and loss -------------------------------------------------------------------------


def test_logits_shape_and_dtype_and_padded_head():
    model = tiny_model()
    assert model.lm_head.weight.shape == (320, 64)
    assert model.config.padded_vocab_size == 320
    logits = model(tokens(2, 12))
    assert logits.shape == (2, 12, VOCAB)
    assert logits.dtype == torch.float32


def test_loss_is_finite_and_near_uniform_at_init():
    model = tiny_model()
    idx = tokens(2, 16)
    loss = model(idx, targets=tokens(2, 16, seed=1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # lm_head starts at std 0.001, so predictions are almost uniform over the vocabulary.
    assert abs(loss.item() - math.log(VOCAB)) < 0.05


def test_loss_reductions_agree_and_ignore_minus_one():
    model = tiny_model()
    randomize(model)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=3)
    targets[0, :4] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 10)
    assert torch.all(per_token[0, :4] == 0)
    valid = targets != -1
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())
    torch.testing.assert_close(model(idx, targets), per_token[valid].mean())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_per_token_loss_without_autograd_is_chunked_with_the_same_numbers(bf16, monkeypatch):
    # Evaluation's per-token losses come a few rows of logits at a time (here 7 rows, so the
    # 2 x 10 tokens take three chunks, the last one short); each token's loss must be what the
    # full logits give (to the last bit or two: a matmul over fewer rows may round otherwise).
    monkeypatch.setattr(heads, "EVAL_LOGITS_CHUNK_BYTES", 7 * 4 * VOCAB)
    model = tiny_model()
    randomize(model)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=3)
    targets[1, 5:] = -1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        chunked = model(idx, targets, loss_reduction="none")
        logits = model(idx)
    expected = F.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1, reduction="none"
    ).view(2, 10)
    assert chunked.shape == (2, 10) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)
    assert torch.all(chunked[1, 5:] == 0)


def test_logits_are_softcapped_at_15():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    logits = model(tokens(1, 8))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0


@pytest.mark.parametrize("legacy", [False, True], ids=["new", "legacy"])
def test_blocks_are_the_identity_at_init(legacy):
    # Zero output projections make each block a no-op and smear starts closed (lambda 0),
    # leaving a positive multiple of x0 (less 0.2 x the middle layer's multiple of it, with
    # backout), whose RMS norm is x0 itself.
    model = tiny_model(**(LEGACY_FIELDS if legacy else {}))
    idx = tokens(1, 6)
    x0 = rms_norm(model.transformer.wte(idx))
    expected = 15 * torch.tanh(model.lm_head(rms_norm(x0))[..., :VOCAB] / 15)
    torch.testing.assert_close(model(idx), expected)


def test_bad_forward_arguments_are_rejected():
    model = tiny_model()
    idx = tokens(1, 4)
    with pytest.raises(ValueError, match="integer"):
        model(idx.float())
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, idx, loss_reduction="avg")
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, idx[:, :3])
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(1, 321))


@torch.no_grad()
def test_smear_adds_the_gated_previous_embedding_and_backout_subtracts_the_middle_layer():
    # With zero output projections every block is the identity, so the final hidden state is
    # known in closed form: x_L = a x0 and x_mid = b x0 (a, b from the layer scalars), where
    # x0 is the smeared embedding; the logits are the head of norm(x_L - lambda x_mid).
    model = tiny_model(n_layer=3)
    model.smear_lambda.fill_(0.7)
    model.smear_gate.weight.normal_(0, 0.3)
    model.backout_lambda.fill_(0.4)
    idx = tokens(2, 9)
    e = rms_norm(model.transformer.wte(idx))
    gate = 0.7 * torch.sigmoid(e[..., :24] @ model.smear_gate.weight.t())
    x0 = e.clone()
    x0[:, 1:] = e[:, 1:] + gate[:, 1:] * e[:, :-1]
    x = x0
    for i in range(3):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        if i == model.config.backout_layer:
            middle = x
    hidden = rms_norm(x - 0.4 * middle)
    expected = 15 * torch.tanh(model.lm_head(hidden)[..., :VOCAB] / 15)
    torch.testing.assert_close(model(idx), expected)
    # The first token has no previous one; each later one depends on its predecessor.
    other = idx.clone()
    other[:, 3] = (other[:, 3] + 1) % VOCAB
    changed = (model(other) != model(idx)).any(dim=-1)
    assert changed[:, :3].sum() == 0 and changed[:, 3:5].all() and changed[:, 5:].sum() == 0


def test_qk_scale_and_value_gate_follow_the_config():
    model = tiny_model(n_layer=1)
    randomize(model)
    attn = model.transformer.h[0].attn
    assert attn.ve_gate.weight.shape == (2, 12) and attn.qk_scale == 1.2
    legacy = tiny_model(n_layer=1, **LEGACY_FIELDS)
    assert legacy.transformer.h[0].attn.ve_gate.weight.shape == (2, 32)
    # The scale sharpens attention: the same weights at scale 1 give other logits.
    idx = tokens(1, 8)
    with torch.no_grad():
        before = model(idx)
        attn.qk_scale = 1.0
        assert not torch.allclose(model(idx), before)


def test_gqa_model_trains():
    model = tiny_model(n_head=4, n_kv_head=1, window_pattern="SL")
    randomize(model)
    assert model.transformer.h[0].attn.c_k.weight.shape == (16, 64)
    loss = model(tokens(2, 20), tokens(2, 20, seed=5))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


# --- init -------------------------------------------------------------------------------------


def test_init_statistics():
    # nanochat's init: wte N(0, 0.8), c_fc at 0.4x the bound, value embeddings uniform like
    # c_v, gates uniform on [0, 0.02], layer scalars on linear schedules, smear closed.
    model = GPT(tiny_config(n_embd=128, n_layer=3, vocab_size=4096))
    bound = math.sqrt(3) / math.sqrt(128)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for table in model.value_embeds.values():
        assert table.weight.abs().max() <= bound
        assert abs(table.weight.std().item() - 1 / math.sqrt(128)) < 0.005
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        for linear in (attn.c_q, attn.c_k, attn.c_v):
            assert linear.weight.abs().max() <= bound
            assert abs(linear.weight.std().item() - 1 / math.sqrt(128)) < 0.01
            assert linear.bias is None
        assert mlp.c_fc.weight.abs().max() <= 0.4 * bound
        assert abs(mlp.c_fc.weight.std().item() - 0.4 / math.sqrt(128)) < 0.004
        assert torch.all(attn.c_proj.weight == 0)
        assert torch.all(mlp.c_proj.weight == 0)
        if attn.ve_gate is not None:
            gate = attn.ve_gate.weight
            assert gate.min() >= 0 and 0 < gate.max() <= 0.02
    gate = model.smear_gate.weight
    assert gate.shape == (1, 24) and gate.min() >= 0 and 0 < gate.max() <= 0.02
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))


def test_legacy_init_statistics():
    model = GPT(tiny_config(n_embd=128, n_layer=3, vocab_size=4096, **LEGACY_FIELDS))
    bound = math.sqrt(3) / math.sqrt(128)
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    for table in model.value_embeds.values():
        assert abs(table.weight.std().item() - 1.0) < 0.02
    for block in model.transformer.h:
        assert block.attn.ve_gate is None or torch.all(block.attn.ve_gate.weight == 0)
        assert abs(block.mlp.c_fc.weight.std().item() - 1 / math.sqrt(128)) < 0.01
        assert block.mlp.c_fc.weight.abs().max() <= bound
    assert not hasattr(model, "smear_gate") and not hasattr(model, "backout_lambda")
    assert torch.all(model.resid_lambdas == 1.0)
    assert torch.equal(model.x0_lambdas, torch.full((3,), 0.1))


def test_meta_build_then_init_weights_gives_a_working_model():
    with torch.device("meta"):
        model = GPT(tiny_config())
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    reference = GPT(tiny_config())
    torch.testing.assert_close(model.rotary_cos, reference.rotary_cos)
    assert torch.all(model.transformer.h[0].attn.c_proj.weight == 0)
    assert torch.isfinite(model(tokens(1, 5))).all()


# --- parameter accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["new", "legacy"])
def test_num_scaling_params_and_flops_by_hand(legacy):
    # n_layer 2, n_head 2, n_kv_head 1, n_embd 64 -> head_dim 32, kv_dim 32; value embedding
    # and gate (12 or, legacy, 32 channels) only on layer 1; windows [S, L]: S = 128 (a
    # quarter rounded up to 128, so all 32 keys) or, legacy, 16; smear gate and lambdas.
    model = GPT(tiny_config(n_kv_head=1, **(LEGACY_FIELDS if legacy else {})))
    wte = 300 * 64
    value_embeds = 300 * 32
    lm_head = 320 * 64
    block = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 256 + 256 * 64
    matrices = 2 * block + (32 if legacy else 12) * 1
    scalars = 2 * 2
    smear = 0 if legacy else 24 + 1 + 1
    counts = model.num_scaling_params()
    assert counts == {
        "wte": wte,
        "value_embeds": value_embeds,
        "lm_head": lm_head,
        "transformer_matrices": matrices,
        "scalars": scalars,
        "smear": smear,
        "total": wte + value_embeds + lm_head + matrices + scalars + smear,
    }
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert count_params(model.config) == counts
    short = 16 if legacy else 32
    attention_flops = 12 * 2 * 32 * short + 12 * 2 * 32 * 32
    smear_gate = 0 if legacy else 24
    assert model.estimate_flops() == 6 * (lm_head + matrices + smear_gate) + attention_flops
    assert flops_per_token(model.config) == model.estimate_flops()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_layer=7, window_pattern="SSL", sequence_len=1024),
        dict(n_layer=5, window_pattern="LS", sequence_len=300, smear=False),
        dict(n_layer=4, window_pattern="S", sequence_len=64, backout=False, **HALF_WINDOWS),
    ],
)
def test_closed_forms_equal_the_built_model(overrides):
    model = GPT(tiny_config(**overrides))
    assert count_params(model.config) == model.num_scaling_params()
    assert flops_per_token(model.config) == model.estimate_flops()


def test_param_groups_cover_every_parameter_once():
    model = GPT(tiny_config(n_layer=3))
    groups = model.param_groups()
    assert set(groups) == {
        "wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "smear"
    }  # fmt: skip
    assert groups["smear"] == [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]
    assert GPT(tiny_config(**LEGACY_FIELDS)).param_groups()["smear"] == []
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in groups["transformer_matrices"])
    assert all(p.dim() == 1 for p in groups["scalars"])
    assert len(groups["value_embeds"]) == 2


# --- KV cache ---------------------------------------------------------------------------------


def kv_model(legacy=False):
    # sequence_len 16 makes the S window (8) bind within a few tokens and the L window (16)
    # bind once a row passes 17 tokens, so the cache path is checked against real windows.
    # Random weights everywhere: the smear gate is open and backout non-trivial.
    fields = LEGACY_FIELDS if legacy else HALF_WINDOWS
    model = tiny_model(
        sequence_len=16, n_layer=3, n_head=4, n_kv_head=2, window_pattern="SL", **fields
    )
    randomize(model)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("legacy", [False, True], ids=["new", "legacy"])
def test_cached_prefill_chunk_and_decode_equal_full_forward(legacy):
    model = kv_model(legacy)
    idx = tokens(2, 22)
    full = model(idx)
    cache = ReferenceKVCache.for_model(model, batch_size=2, max_len=24)
    steps = [model(idx[:, :6], kv_cache=cache), model(idx[:, 6:11], kv_cache=cache)]
    steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(11, 22)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [22, 22]


@torch.no_grad()
def test_cached_decode_with_rows_of_different_lengths():
    # Rows of different lengths continue each from its own last token (the smear gate).
    model = kv_model()
    rows = [tokens(1, 5, seed=10)[0], tokens(1, 9, seed=11)[0]]
    continuation = tokens(2, 12, seed=12)
    caches = []
    for row in rows:
        cache = ReferenceKVCache.for_model(model, batch_size=1, max_len=24)
        model(row[None], kv_cache=cache)
        caches.append(cache)
    batch_cache = ReferenceKVCache.concat(caches)
    assert batch_cache.lengths.tolist() == [5, 9]
    decoded = torch.cat(
        [model(continuation[:, t : t + 1], kv_cache=batch_cache) for t in range(12)], dim=1
    )
    for b, row in enumerate(rows):
        full = model(torch.cat((row, continuation[b]))[None])
        torch.testing.assert_close(decoded[b], full[0, len(row) :], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_greedy_cached_generation_matches_generate_naive():
    model = kv_model()
    prompt = tokens(1, 4, seed=20)[0].tolist()
    expected = list(model.generate_naive(prompt, max_tokens=14))
    cache = ReferenceKVCache.for_model(model, batch_size=1, max_len=20)
    logits = model(torch.tensor([prompt]), kv_cache=cache)
    generated = []
    for _ in range(14):
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(int(next_id))
        logits = model(next_id, kv_cache=cache)
    assert generated == expected


@torch.no_grad()
def test_a_smear_model_refuses_a_cache_without_last_tokens():
    model = kv_model()
    cache = ReferenceKVCache.for_model(model, batch_size=1, max_len=8)
    del cache.last_tokens
    with pytest.raises(ValueError, match="last_tokens"):
        model(tokens(1, 3), kv_cache=cache)
    # The legacy model never reads it.
    legacy = kv_model(legacy=True)
    legacy_cache = ReferenceKVCache.for_model(legacy, batch_size=1, max_len=8)
    del legacy_cache.last_tokens
    assert legacy(tokens(1, 3), kv_cache=legacy_cache).shape == (1, 3, VOCAB)


@torch.no_grad()
def test_cache_limits_are_enforced():
    model = kv_model()
    cache = ReferenceKVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(tokens(1, 5), kv_cache=cache)
    too_long = ReferenceKVCache.for_model(model, batch_size=1, max_len=161)
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(1, 1), kv_cache=too_long)


# --- sampling and precision helpers -----------------------------------------------------------


def test_sample_next_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0).tolist() == [[1], [0]]
    assert sample_next_token(logits, rng, temperature=1.0, top_k=1).tolist() == [[1], [0]]
    draws = [sample_next_token(logits, torch.Generator().manual_seed(7), 1.0) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, temperature=-1)


def test_generate_naive_samples_reproducibly_with_a_seed():
    model = tiny_model()
    randomize(model)
    first = list(model.generate_naive([1, 2, 3], max_tokens=6, temperature=1.0, seed=3))
    again = list(model.generate_naive([1, 2, 3], max_tokens=6, temperature=1.0, seed=3))
    assert first == again and len(first) == 6
    with pytest.raises(ValueError, match="prompt"):
        list(model.generate_naive([], max_tokens=1))


def test_cpu_computes_in_fp32():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu) == torch.float32
    with autocast(cpu):
        out = torch.randn(4, 4) @ torch.randn(4, 4)
    assert out.dtype == torch.float32
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert autodetect_device() == cpu
