"""engine.models.gpt_inference: the lean cached forward equals GPT.forward in every cache situation."""

import math

import pytest
import torch

from engine.kv_cache import KVCache
from engine.models.gpt import GPT, LEGACY_FIELDS, GPTConfig
from engine.models.gpt_inference import InferenceForward

VOCAB = 300
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread (see test_engine.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0, **overrides):
    """GQA, and sequence_len 16 so the S window (8: half the context, unrounded) binds within
    a few tokens and the L window (16) once a row passes 17; every weight non-trivial (at init
    the zero projections would make every block the identity, and smear would be closed)."""
    fields = dict(sequence_len=16, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2,
                  n_embd=64, window_pattern="SL", short_window_divisor=2,
                  short_window_multiple=1)  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**fields))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def tokens(batch, seq, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields", [{}, LEGACY_FIELDS], ids=["new", "legacy"])
def test_prefill_chunks_and_decode_with_equal_lengths_match_gpt_forward(fields):
    model = make_model(**fields)
    with torch.inference_mode():
        check_equal_lengths(model)


def check_equal_lengths(model):
    lean = InferenceForward(model)
    idx = tokens(2, 24)
    full = model(idx)
    cache = model.new_cache(2, 24)
    rows = cache.rows(0, 2)
    # A fresh prefill (causal for the L layers, masked for the S layers whose window of 8
    # binds within 12 tokens), a chunk after cached tokens (masked), then one token at a time
    # (sliced to the window, no mask) until both windows bind.
    got = [lean(idx[:, :12], rows), lean(idx[:, 12:15], rows)]
    got += [lean(idx[:, t : t + 1], rows) for t in range(15, 24)]
    positions = [11, 14, *range(15, 24)]
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, positions], **TOLERANCE)
    assert cache.host_lengths == [24, 24] and cache.lengths.tolist() == [24, 24]


def test_a_model_built_under_inference_mode_works_too():
    with torch.inference_mode():
        check_equal_lengths(make_model())


@pytest.mark.parametrize("fields", [{}, LEGACY_FIELDS], ids=["new", "legacy"])
def test_rows_of_different_lengths_match_gpt_forward(fields):
    # Each row's first decoded token is smeared with that row's own last prompt token (rows
    # of 5, 12 and 1 cached tokens decode together, so the smear's previous token differs
    # per row and the prefill of the one-token prompt has nothing before it).
    model = make_model(seed=3, **fields)
    lean = InferenceForward(model)
    prompts = [tokens(1, 5, seed=10), tokens(1, 12, seed=11), tokens(1, 1, seed=12)]
    continuation = tokens(3, 10, seed=13)
    cache = model.new_cache(3, 24)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            assert lean(prompt, cache.rows(row, row + 1), logits=False) is None
        decoded = torch.stack(
            [lean(continuation[:, t : t + 1], cache.rows(0, 3)) for t in range(10)], dim=1
        )
        for row, prompt in enumerate(prompts):
            full = model(torch.cat((prompt[0], continuation[row]))[None])
            torch.testing.assert_close(decoded[row], full[0, prompt.size(1) :], **TOLERANCE)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_head": 4, "window_pattern": "L"},
        {"n_layer": 1},
        {"smear": False},
        {"backout": False, "qk_scale": 1.0},
        LEGACY_FIELDS,
    ],
)
def test_greedy_decoding_reproduces_generate_naive(overrides):
    model = make_model(seed=5, **overrides)
    lean = InferenceForward(model)
    prompt = [7, 120, 33, 250]
    expected = list(model.generate_naive(prompt, max_tokens=18))
    cache = model.new_cache(1, 24)
    rows = cache.rows(0, 1)
    generated = []
    with torch.inference_mode():
        logits = lean(torch.tensor([prompt]), rows)
        for _ in range(18):
            next_id = logits.argmax(dim=-1, keepdim=True)
            generated.append(int(next_id))
            logits = lean(next_id, rows)
    assert generated == expected


def test_derived_weights_follow_parameter_updates():
    model = make_model(seed=7)
    keys = set(model.state_dict())
    lean = InferenceForward(model)
    idx = tokens(1, 6)

    def check():
        cache = model.new_cache(1, 8)
        with torch.inference_mode():
            got, want = lean(idx, cache.rows(0, 1)), model(idx)[:, -1]
        torch.testing.assert_close(got, want, **TOLERANCE)

    first = lean.weights()
    assert lean.weights() is first  # nothing changed: nothing rebuilt
    with torch.no_grad():
        model.transformer.h[1].attn.c_k.weight.mul_(1.5)
        model.x0_lambdas.add_(0.2)
    assert lean.weights() is not first
    check()
    # A parameter replaced by a new tensor is noticed too.
    replaced = model.state_dict()
    replaced["lm_head.weight"] = replaced["lm_head.weight"].flip(0).clone()
    model.load_state_dict(replaced, assign=True)
    check()
    assert set(model.state_dict()) == keys  # the derived weights live outside the model


def test_bad_calls_are_rejected():
    model = make_model()
    lean = InferenceForward(model)
    cache = model.new_cache(1, 8)
    with pytest.raises(RuntimeError, match="inference_mode"):
        lean(tokens(1, 2), cache.rows(0, 1))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="integer tensor"):
            lean(torch.zeros(1, 2), cache.rows(0, 1))
        with pytest.raises(ValueError, match="overflow"):
            lean(tokens(1, 9), cache.rows(0, 1))
        too_long = KVCache(3, 1, 161, 2, 16, device="cpu", dtype=torch.float32)
        with pytest.raises(ValueError, match="rotary"):
            lean(tokens(1, 1), too_long.rows(0, 1))
        bf16 = KVCache(3, 1, 8, 2, 16, device="cpu", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="KV cache holds torch.bfloat16"):
            lean(tokens(1, 1), bf16.rows(0, 1))
        model.to(torch.bfloat16)
        with pytest.raises(ValueError, match="must be fp32 or fp64"):
            lean(tokens(1, 1), bf16.rows(0, 1))
