"""Every attention backend on CUDA against a float64 reference: windows, KV-cache rows, GQA.

Each backend is forced in turn (engine.attention.set_backend). A forced backend that cannot
serve a call (FA3 without a Hopper build, FlexAttention with cache lengths) is skipped with
the reason, except SDPA, which must serve every call.
"""

import math

import pytest
import torch

import engine.attention as attn
from tests.gpu.marks import CUDA_MARKS

pytestmark = CUDA_MARKS

FORCEABLE = hasattr(attn, "set_backend") and hasattr(attn, "backend_for")
BACKENDS = ["sdpa", "flex", "fa3"]
# bf16 inputs: outputs are averages of O(1) values rounded to 8 bits of mantissa.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 2e-3}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one backend for the test, restoring the previous choice after it."""
    if not FORCEABLE:
        if request.param != "sdpa":
            pytest.skip("this engine.attention cannot force a backend")
        yield request.param
        return
    previous = attn.get_backend()
    attn.set_backend(request.param)
    try:
        yield request.param
    finally:
        attn.set_backend(previous)


def require_served(backend, q, k, **kwargs):
    """Skip unless `backend` really runs this call; SDPA must run every call."""
    if not FORCEABLE:
        return
    runs = attn.backend_for(q, k, **kwargs)
    if backend == "sdpa":
        assert runs == "sdpa"
    elif runs != backend:
        pytest.skip(f"{backend} cannot serve this call here (it falls back to {runs})")


def reference(q, k, v, window=None, k_len=None):
    """Plain float64 causal attention, one row at a time, written from the definition."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, tq, hq, dim = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    lengths = k_len.tolist() if k_len is not None else [tk] * batch
    out = torch.empty_like(q)
    key_pos = torch.arange(tk, device=q.device)
    for b, valid in enumerate(lengths):
        query_pos = torch.arange(valid - tq, valid, device=q.device)[:, None]
        visible = (key_pos <= query_pos) & (key_pos < valid)
        if window is not None:
            visible &= key_pos >= query_pos - window
        scores = torch.einsum("qhd,khd->hqk", q[b], k[b]) / math.sqrt(dim)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[b])
    return out


def random_qkv(batch, tq, tk, hq, hkv, dim, dtype, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(t, h):
        x = torch.randn(batch, t, h, dim, device="cuda", generator=gen).to(dtype)
        return x.requires_grad_(requires_grad)

    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def assert_near(got, want, dtype):
    err = (got.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.2e} > {TOLERANCE[dtype]:.0e}"


# (T, Hq, Hkv, D, window): full context, windows that bind, GQA, a length off the 128 tiles.
TRAINING_SHAPES = [
    (512, 8, 8, 128, None),
    (512, 8, 8, 128, 128),
    (512, 8, 2, 64, 255),
    (320, 4, 1, 128, 64),
    (256, 4, 4, 64, 0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("seq", "hq", "hkv", "dim", "window"), TRAINING_SHAPES)
def test_training_attention_matches_the_reference(backend, dtype, seq, hq, hkv, dim, window):
    q, k, v = random_qkv(2, seq, seq, hq, hkv, dim, dtype)
    require_served(backend, q, k, window=window)
    got = attn.attention(q, k, v, window=window)
    assert got.shape == q.shape and got.dtype == dtype
    assert_near(got, reference(q, k, v, window), dtype)


@pytest.mark.parametrize(("seq", "hq", "hkv", "dim", "window"), TRAINING_SHAPES[1:3])
def test_training_gradients_match_the_reference(backend, seq, hq, hkv, dim, window):
    q, k, v = random_qkv(2, seq, seq, hq, hkv, dim, torch.bfloat16, requires_grad=True)
    require_served(backend, q, k, window=window)
    upstream = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (attn.attention(q, k, v, window=window).float() * upstream).sum().backward()
    got = [t.grad.double() for t in (q, k, v)]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (reference(*leaves, window) * upstream.double()).sum().backward()
    for name, g, leaf in zip("qkv", got, leaves, strict=True):
        scale = leaf.grad.abs().max().item()
        err = (g - leaf.grad).abs().max().item()
        assert err <= 3e-2 * scale, f"d{name}: max abs error {err:.2e} vs scale {scale:.2e}"


# (Tq, window): one decode step and a chunk of prefill, with and without a window.
CACHE_CASES = [(1, None), (1, 64), (16, None), (16, 64)]


@pytest.mark.parametrize(("tq", "window"), CACHE_CASES)
def test_kv_cache_rows_of_different_lengths_match_the_reference(backend, tq, window):
    """Rows hold 384, 100 and exactly tq valid keys; the cache tail holds loud garbage."""
    q, k, v = random_qkv(3, tq, 384, 8, 2, 128, torch.bfloat16)
    k_len = torch.tensor([384, 100, tq], device="cuda")
    for row, valid in enumerate(k_len.tolist()):
        k[row, valid:] = 50.0  # would dominate every softmax if it were visible
        v[row, valid:] = 1e3
    require_served(backend, q, k, window=window, k_len=k_len)
    got = attn.attention(q, k, v, window=window, k_len=k_len)
    assert torch.isfinite(got).all()
    assert_near(got, reference(q, k, v, window, k_len), torch.bfloat16)
