"""engine.models.gpt2: GPT-2's shape and counts, init, training, checkpoints, cached decoding
and the activation-memory formula."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_model, meta_path, save_checkpoint
from engine.engine import Batch, Engine, SamplingParams
from engine.kv_cache import KVCache
from engine.models import registry
from engine.models.base import GENERIC_GROUPS
from engine.models.gpt2 import (
    FAMILY,
    GPT2,
    GPT2Config,
    activation_bytes_per_token,
    config_from_flags,
    count_params,
    flops_per_token,
    scaling_params,
)
from training.memory import profile_layers

TINY = dict(sequence_len=96, vocab_size=97, n_layer=3, n_head=4, n_embd=64, d_ff=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> GPT2Config:
    return GPT2Config(**{**TINY, **overrides})


def make_model(seed=0, **overrides) -> GPT2:
    """A tiny GPT-2 whose weights are all far from init (GPT-2's 0.02 init gives nearly flat
    logits, whose argmax ties would hide cache bugs), in eval mode."""
    torch.manual_seed(seed)
    model = GPT2(tiny_config(**overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


# ---- config and counts ----------------------------------------------------------------------


def test_gpt2_small_has_124m_parameters_in_closed_form_and_built():
    config = GPT2Config()
    assert (config.n_layer, config.n_head, config.n_embd, config.d_ff) == (12, 12, 768, 3072)
    assert (config.sequence_len, config.vocab_size) == (1024, 50257)
    counts = count_params(config)
    assert counts["total"] == 124_439_808
    with torch.device("meta"):
        built = GPT2(config)
    assert built.num_scaling_params() == counts
    assert counts["lm_head"] == 0  # tied: the head is wte
    # 6 x (85M block matrices + the 38.6M tied head) + attention at the 1024 context.
    assert flops_per_token(config) == 6 * (84_934_656 + 50257 * 768) + 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(n_layer=2, n_head=2, n_embd=48, d_ff=100),
        dict(bias=False),
        dict(n_layer=1, n_head=1, n_embd=8, d_ff=0, sequence_len=7, vocab_size=5, dropout=0.2),
    ],
)
def test_closed_forms_equal_the_built_model(overrides):
    config = tiny_config(**overrides)
    model = GPT2(config)
    assert count_params(config) == model.num_scaling_params()
    assert count_params(config)["total"] == sum(p.numel() for p in model.parameters())
    assert flops_per_token(config) == model.estimate_flops()
    matmul = sum(p.numel() for p in model.param_groups()["matrices"])
    assert scaling_params(config) == matmul + config.vocab_size * config.n_embd


def test_config_resolves_d_ff_and_round_trips_through_the_registry():
    config = GPT2Config(n_embd=64, n_head=4, d_ff=-1)
    assert config.d_ff == 256 and config.head_dim == 16
    assert config.padded_vocab_size == config.vocab_size
    values = config.to_dict()
    assert values["model"] == "gpt2" and values["d_ff"] == 256
    assert registry.config_from_dict(values) == config
    assert registry.family_of(values) is FAMILY
    assert isinstance(registry.build_model(config), GPT2)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(sequence_len=0), "sequence_len"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(n_layer=True), "n_layer"),
        (dict(n_head=2.0), "n_head"),
        (dict(n_embd="64"), "n_embd"),
        (dict(d_ff=1.5), "d_ff"),
        (dict(n_embd=66), "n_embd"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=True), "dropout"),
        (dict(bias="yes"), "bias"),
        (dict(model="gpt"), "model"),
    ],
)
def test_bad_config_fields_are_refused_by_name(overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny_config(**overrides)


def test_config_from_flags_uses_gpts_depth_dial():
    flags = dict(depth=4, aspect_ratio=40, head_dim=64, max_seq_len=128, dropout=0.1, bias=False)
    config = config_from_flags(flags, 300)
    # 4 x 40 = 160, rounded up to whole 64-wide heads.
    assert (config.n_layer, config.n_embd, config.n_head) == (4, 192, 3)
    assert (config.d_ff, config.sequence_len, config.vocab_size) == (768, 128, 300)
    assert (config.dropout, config.bias, config.model) == (0.1, False, "gpt2")
    defaults = config_from_flags(dict(depth=2, max_seq_len=64), 50)
    assert (defaults.n_embd, defaults.n_head, defaults.dropout, defaults.bias) == (128, 1, 0, True)
    assert set(FAMILY.flags) == {"aspect_ratio", "head_dim", "dropout", "bias"}
    with pytest.raises(ValueError, match="aspect_ratio"):
        config_from_flags(dict(depth=2, max_seq_len=64, aspect_ratio=0), 50)


# ---- parameters and init --------------------------------------------------------------------


def test_param_groups_hold_every_parameter_once_and_the_head_is_tied():
    model = GPT2(tiny_config())
    groups = model.param_groups()
    assert tuple(groups) == GENERIC_GROUPS
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    block_matrices = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    assert {id(p) for p in groups["matrices"]} == block_matrices
    assert len(groups["matrices"]) == 4 * model.config.n_layer
    assert groups["lm_head"] == []
    assert [id(p) for p in groups["embeddings"]] == [
        id(model.transformer.wte.weight),
        id(model.transformer.wpe.weight),
    ]
    assert all(p.dim() == 1 for p in groups["vectors"])
    # Per block 4 biases and 2 LayerNorms of 2 parameters, plus ln_f.
    assert len(groups["vectors"]) == 8 * model.config.n_layer + 2
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(key.startswith("lm_head") for key in model.state_dict())


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(sequence_len=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256))
    residual = torch.cat(
        [
            torch.cat((b.attn.c_proj.weight.flatten(), b.mlp.c_proj.weight.flatten()))
            for b in model.transformer.h
        ]
    )
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.02)
    others = torch.cat(
        [model.transformer.wte.weight.flatten(), model.transformer.wpe.weight.flatten()]
        + [
            torch.cat((b.attn.c_attn.weight.flatten(), b.mlp.c_fc.weight.flatten()))
            for b in model.transformer.h
        ]
    )
    assert others.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(others.mean().item()) < 1e-3
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "ln_" in name:
            assert torch.all(param == 1), name
    # Built on the meta device and initialised where it lives: the same numbers as
    # init_weights gives a model built in place (the constructors' own draws aside).
    torch.manual_seed(0)
    model.init_weights()
    torch.manual_seed(0)
    built = registry.build_model(model.config)
    for (name, a), b in zip(model.state_dict().items(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---- training -------------------------------------------------------------------------------


def test_a_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    config = GPT2Config(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=0)
    model = GPT2(config).train()
    data = torch.randint(0, config.vocab_size, (4, config.sequence_len + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(config.vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]
    # Training kept the head tied.
    assert model.lm_head.weight is model.transformer.wte.weight


def test_dropout_acts_in_training_only():
    model = make_model(dropout=0.3).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    expected = list(model.generate_naive([5, 6, 7], 10))
    with torch.no_grad():
        eval_logits = model(ids)
    # Naive generation and cached forwards never drop, whatever the mode.
    model.train()
    assert list(model.generate_naive([5, 6, 7], 10)) == expected
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        cached = model(ids, kv_cache=cache.rows(0, 2))
    assert torch.allclose(cached, eval_logits, atol=1e-4)
    # Without dropout configured, train mode changes nothing.
    plain = make_model().train()
    assert torch.equal(plain(ids), plain(ids))


# ---- losses and limits ----------------------------------------------------------------------


def test_fused_training_loss_equals_the_plain_logits_loss(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    targets = torch.randint(0, model.config.vocab_size, (3, 40))
    targets[0, :7] = -1
    for reduction in ("mean", "sum"):
        model.zero_grad(set_to_none=True)
        fused = model(ids, targets, loss_reduction=reduction)
        fused.backward()
        fused_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        plain = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction
        )
        plain.backward()
        assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
        for fused_grad, param in zip(fused_grads, model.parameters(), strict=True):
            scale = param.grad.abs().max().item()
            assert torch.allclose(fused_grad, param.grad, rtol=1e-4, atol=1e-5 * scale)
    model.zero_grad(set_to_none=True)


def test_token_losses_equal_per_token_cross_entropy(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    targets = torch.randint(0, model.config.vocab_size, (2, 30))
    targets[1, -5:] = -1
    with torch.no_grad():
        logits = model(ids)
        losses = model(ids, targets, loss_reduction="none")
        mean = model(ids, targets)
    assert logits.dtype == torch.float32 and logits.shape == (2, 30, model.config.vocab_size)
    expected = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none"
    ).view(2, 30)
    assert losses.shape == (2, 30)
    assert torch.allclose(losses, expected, atol=1e-5)
    assert torch.all(losses[1, -5:] == 0)
    assert mean.item() == pytest.approx(expected[targets != -1].mean().item(), rel=1e-5)


def test_positions_past_the_context_are_refused(model):
    seq = model.config.sequence_len
    with torch.no_grad():
        assert model(torch.zeros(1, seq, dtype=torch.long)).shape[1] == seq
        with pytest.raises(ValueError, match="context"):
            model(torch.zeros(1, seq + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        model.new_cache(1, seq + 1)
    config = model.config
    too_long = KVCache(
        config.n_layer, 1, seq + 1, config.n_head, config.head_dim, device="cpu",
        dtype=torch.float32,
    )  # fmt: skip
    with torch.no_grad(), pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=too_long.rows(0, 1))
    with pytest.raises(ValueError, match="context"):
        Batch(model, None, max_rows=1, max_len=seq + 1)


# ---- checkpoints and decoding ---------------------------------------------------------------


def test_save_then_load_gives_identical_logits(tmp_path):
    model = make_model(seed=3, dropout=0.1, bias=False)
    save_checkpoint(tmp_path, 5, model_state=model.state_dict(), model_config=model.config)
    meta = json.loads(meta_path(tmp_path, 5).read_text())
    assert meta["model_config"]["model"] == "gpt2"
    assert meta["model_config"] == model.config.to_dict()
    loaded, loaded_meta = load_model(tmp_path, 5)
    assert isinstance(loaded, GPT2) and not loaded.training
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    loaded.param_groups()  # still every parameter exactly once
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
def test_cached_batch_decoding_equals_naive_generation_as_rows_join_and_leave(model, static):
    prompts = [[5, 17, 90, 3, 25, 41], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [42], [60, 61, 62]]
    max_tokens = [70, 40, 64, 20]
    batch = Batch(model, None, max_rows=4, max_len=model.config.sequence_len, static_shapes=static)
    rows = [batch.add(prompts[0], SamplingParams(temperature=0.0, max_tokens=max_tokens[0]))]
    joins = {3: 1, 4: 2, 9: 3}  # step -> the prompt that joins before it
    steps = 0
    while batch.rows:
        if steps in joins:
            i = joins[steps]
            rows.append(
                batch.add(prompts[i], SamplingParams(temperature=0, max_tokens=max_tokens[i]))
            )
        batch.step()
        steps += 1
    assert steps >= 64
    for row, prompt, count in zip(rows, prompts, max_tokens, strict=True):
        assert row.output_tokens == list(model.generate_naive(prompt, count)), prompt
    # The outputs are not trivially constant (the weights are far from init).
    assert len(set(rows[0].output_tokens)) > 5


def test_engine_generates_what_naive_generation_does(model):
    prompt = [5, 17, 90, 3, 25, 41]
    expected = list(model.generate_naive(prompt, 30))
    sequences, masks = Engine(model, None).generate_batch(
        prompt, num_samples=2, max_tokens=30, temperature=0.0
    )
    for sequence, mask in zip(sequences, masks, strict=True):
        assert sequence == prompt + expected
        assert mask == [0] * len(prompt) + [1] * 30
    # Unbounded max_tokens fills the context: every token but the last one sampled is fed.
    sequences, _ = Engine(model, None).generate_batch([1, 2], max_tokens=None, temperature=0.0)
    assert len(sequences[0]) == model.config.sequence_len + 1
    assert sequences[0][2:] == list(model.generate_naive([1, 2], model.config.sequence_len - 1))


def test_naive_generation_past_the_context_conditions_on_the_last_window():
    model = make_model(sequence_len=8)
    tokens = list(model.generate_naive([1, 2, 3], 12))
    assert len(tokens) == 12


# ---- activation memory ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_formula_matches_the_saved_tensor_probe(dtype, dropout):
    config = GPT2Config(
        sequence_len=64, vocab_size=256, n_layer=3, n_head=4, n_embd=128, d_ff=384, dropout=dropout
    )
    torch.manual_seed(0)
    model = GPT2(config).train()
    data = torch.randint(0, config.vocab_size, (4, config.sequence_len))

    def forward(b):
        # Fresh ids per call, as a training step gets: the embedding keeps them for backward.
        ids = data[:b].clone()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return model(ids, ids)

    measured = profile_layers(
        model, list(model.transformer.h), forward, tokens_per_row=config.sequence_len
    )
    per_token = measured.before_layers + sum(measured.per_layer) + measured.after_layers
    assert activation_bytes_per_token(config, dtype) == pytest.approx(per_token, rel=0.02)
    assert FAMILY.activation_bytes_per_token(config, dtype) == pytest.approx(per_token, rel=0.02)
