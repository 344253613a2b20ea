"""Cached decoding on CUDA gives what re-running the whole sequence gives.

In bf16 two correct computations differ by rounding, so tokens are compared up to the first
place where the re-forward itself has a near-tie between its two best tokens; logits are
compared with a tolerance scaled to their size.
"""

import math

import pytest
import torch

from engine.common import autocast
from engine.engine import Engine
from engine.models.gpt import GPT, GPTConfig, ReferenceKVCache
from tests.gpu.marks import CUDA_MARKS

pytestmark = CUDA_MARKS

PROMPT_LEN = 100
NEW_TOKENS = 80  # 180 positions: past the 128-token window of the S layers
# Two logits closer than this may swap under bf16 rounding (logits are capped at +-15).
NEAR_TIE = 0.25


@pytest.fixture(scope="module")
def model():
    """Non-trivial weights (the zero init makes every block the identity and hides cache bugs),
    GQA, windows that bind, head_dim 64 so every backend can serve it."""
    config = GPTConfig(
        sequence_len=256,
        vocab_size=512,
        n_layer=3,
        n_head=4,
        n_kv_head=2,
        n_embd=256,
        window_pattern="SSL",
    )
    torch.manual_seed(0)
    model = GPT(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.cuda().eval()


@pytest.fixture(scope="module")
def prompt(model):
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()


@torch.no_grad()
def test_cached_forward_logits_equal_the_full_forward(model, prompt):
    """Teacher-forced: prefill, then one token at a time through a KV cache, vs one forward."""
    gen = torch.Generator().manual_seed(3)
    tokens = prompt + torch.randint(0, 512, (NEW_TOKENS,), generator=gen).tolist()
    ids = torch.tensor([tokens], device="cuda")
    with autocast("cuda"):
        full = model(ids)[0]
        cache = ReferenceKVCache.for_model(model, 1, len(tokens))
        stepwise = [model(ids[:, :PROMPT_LEN], kv_cache=cache)[0]]
        for pos in range(PROMPT_LEN, len(tokens)):
            stepwise.append(model(ids[:, pos : pos + 1], kv_cache=cache)[0])
    cached = torch.cat(stepwise)
    scale = full.abs().max().item()
    err = (cached - full).abs().max().item()
    assert err <= 0.03 * scale, f"max logit error {err:.3f} at logit scale {scale:.1f}"
    agree = (cached.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agree >= 0.97


def test_engine_greedy_decode_equals_the_reforward_up_to_a_near_tie(model, prompt):
    with autocast("cuda"):
        expected = list(model.generate_naive(prompt, NEW_TOKENS, temperature=0.0))
    columns = list(Engine(model, None).generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0))
    got = [column[0] for column, _ in columns]
    assert len(got) == NEW_TOKENS
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None
    )
    if first_diff is None:
        return
    with torch.no_grad(), autocast("cuda"):
        ids = torch.tensor([prompt + expected[:first_diff]], device="cuda")
        top2 = model(ids)[0, -1].topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap < NEAR_TIE, (
        f"cached decode left the re-forward at token {first_diff} with a clear winner "
        f"(top-2 gap {gap:.3f})"
    )
