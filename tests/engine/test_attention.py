"""engine.attention on its SDPA and FlexAttention paths, against explicit softmax with
hand-built masks.

FlexAttention runs here as PyTorch's eager reference implementation (on a CPU nothing else
is cheap to build); that checks the block masks, which are what this module adds. The CUDA
kernels are checked by tests/gpu.
"""

import math

import pytest
import torch

from engine import attention as attention_module
from engine.attention import _fa3_usable, attention, backend_for, set_backend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(params=["sdpa", "flex"])
def backend(request):
    """Run a test once per backend, forced, and check the forced one really serves the call."""
    set_backend(request.param)
    yield request.param
    set_backend("auto")


def forced(backend, q, k, v, **kwargs):
    """`attention` under the forced backend, after checking that backend is the one chosen."""
    expected = "sdpa" if kwargs.get("q_pos") is not None else backend
    assert backend_for(q, k, **{n: a for n, a in kwargs.items() if n != "v"}) == expected
    return attention(q, k, v, **kwargs)


def make_qkv(batch, tq, tk, hq, hkv, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tq, hq, dim, generator=gen)
    k = torch.randn(batch, tk, hkv, dim, generator=gen)
    v = torch.randn(batch, tk, hkv, dim, generator=gen)
    return q, k, v


def hand_mask(q_positions, num_keys, valid_keys, window):
    """(B, Tq, Tk) bool built one entry at a time from the definition."""
    batch, tq = len(q_positions), len(q_positions[0])
    mask = torch.zeros(batch, tq, num_keys, dtype=torch.bool)
    for b in range(batch):
        for i, p in enumerate(q_positions[b]):
            for j in range(num_keys):
                in_window = window is None or p - j <= window
                mask[b, i, j] = j <= p and j < valid_keys[b] and in_window
    return mask


def naive_attention(q, k, v, mask):
    group = q.size(2) // k.size(2)
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def test_plain_causal_matches_reference(backend):
    q, k, v = make_qkv(2, 9, 9, 4, 4)
    mask = hand_mask([list(range(9))] * 2, 9, [9, 9], window=None)
    torch.testing.assert_close(forced(backend, q, k, v), naive_attention(q, k, v, mask))


@pytest.mark.parametrize("window", [0, 1, 3, 7])
def test_sliding_window_matches_reference(window, backend):
    q, k, v = make_qkv(2, 10, 10, 2, 2)
    mask = hand_mask([list(range(10))] * 2, 10, [10, 10], window=window)
    out = forced(backend, q, k, v, window=window)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_window_that_cannot_bind_equals_plain_causal():
    q, k, v = make_qkv(1, 8, 8, 2, 2)
    torch.testing.assert_close(attention(q, k, v, window=7), attention(q, k, v))
    assert not torch.allclose(attention(q, k, v, window=6), attention(q, k, v))


@pytest.mark.parametrize("window", [None, 2])
def test_grouped_query_attention_matches_reference(window, backend):
    q, k, v = make_qkv(2, 7, 7, 6, 2)
    mask = hand_mask([list(range(7))] * 2, 7, [7, 7], window=window)
    out = forced(backend, q, k, v, window=window)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def poison_tail(k, v, k_len):
    """Fill cache slots past each row's length with huge values that must not leak in."""
    for b, length in enumerate(k_len.tolist()):
        k[b, length:] = 1e4
        v[b, length:] = 1e4


@pytest.mark.parametrize("window", [None, 2])
def test_chunked_prefill_against_cache(window, backend):
    # Cache of 12 slots, 9 valid; the 3 queries are positions 6, 7, 8.
    q, k, v = make_qkv(2, 3, 12, 4, 2)
    k_len = torch.tensor([9, 9])
    poison_tail(k, v, k_len)
    mask = hand_mask([[6, 7, 8]] * 2, 12, [9, 9], window=window)
    out = forced(backend, q, k, v, window=window, k_len=k_len)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


@pytest.mark.parametrize("window", [None, 1])
def test_queries_default_to_the_last_positions_without_cache_lengths(window, backend):
    q, k, v = make_qkv(1, 3, 8, 2, 2)
    mask = hand_mask([[5, 6, 7]], 8, [8], window=window)
    torch.testing.assert_close(
        forced(backend, q, k, v, window=window), naive_attention(q, k, v, mask)
    )


@pytest.mark.parametrize("tq", [1, 2])
@pytest.mark.parametrize("window", [None, 3])
def test_rows_with_different_cache_lengths(tq, window, backend):
    q, k, v = make_qkv(3, tq, 14, 4, 2)
    lengths = [5, 11, 14]
    k_len = torch.tensor(lengths)
    poison_tail(k, v, k_len)
    positions = [[n - tq + i for i in range(tq)] for n in lengths]
    mask = hand_mask(positions, 14, lengths, window=window)
    out = forced(backend, q, k, v, window=window, k_len=k_len)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_each_row_matches_its_own_single_row_computation():
    q, k, v = make_qkv(2, 1, 10, 2, 2)
    k_len = torch.tensor([4, 10])
    batched = attention(q, k, v, k_len=k_len)
    for b, length in enumerate(k_len.tolist()):
        alone = attention(q[b : b + 1], k[b : b + 1, :length], v[b : b + 1, :length])
        torch.testing.assert_close(batched[b : b + 1], alone)


def test_explicit_query_positions(backend):
    q, k, v = make_qkv(2, 3, 10, 2, 1)
    q_pos = torch.tensor([[0, 4, 9], [2, 3, 3]])
    k_len = torch.tensor([10, 6])
    poison_tail(k, v, k_len)
    mask = hand_mask(q_pos.tolist(), 10, [10, 6], window=2)
    out = forced(backend, q, k, v, window=2, k_len=k_len, q_pos=q_pos)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_gradients_flow_through_the_masked_path():
    q, k, v = make_qkv(1, 6, 6, 2, 2)
    for t in (q, k, v):
        t.requires_grad_(True)
    attention(q, k, v, window=2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gradients_flow_through_forced_flex_on_cpu_via_sdpa():
    # FlexAttention has no CPU backward: a forced flex falls back for training there.
    q, k, v = make_qkv(1, 6, 6, 2, 2)
    for t in (q, k, v):
        t.requires_grad_(True)
    set_backend("flex")
    try:
        assert backend_for(q, k, window=2) == "sdpa"
        attention(q, k, v, window=2).sum().backward()
        with torch.no_grad():
            assert backend_for(q, k, window=2) == "flex"
    finally:
        set_backend("auto")
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_cpu_uses_sdpa_unless_forced():
    q, k, _ = make_qkv(1, 8, 8, 2, 2)
    assert backend_for(q, k, window=3) == "sdpa"
    assert backend_for(q.bfloat16(), k.bfloat16(), window=3) == "sdpa"


def test_flex_needs_a_power_of_two_head_dim():
    q, k, _ = make_qkv(1, 8, 8, 2, 2, dim=24)
    set_backend("flex")
    try:
        assert backend_for(q, k, window=3) == "sdpa"
    finally:
        set_backend("auto")


def test_backend_choice_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_backend("xformers")
    monkeypatch.setenv("NANOCHAT_ATTENTION", "FLEX")
    assert attention_module._backend_from_env() == "flex"
    monkeypatch.setenv("NANOCHAT_ATTENTION", "triton")
    with pytest.raises(ValueError, match="NANOCHAT_ATTENTION must be one of"):
        attention_module._backend_from_env()


def test_masks_are_built_once_per_shape_and_window():
    first = attention_module.sliding_window_block_mask(8, 8, 3, "cpu")
    assert attention_module.sliding_window_block_mask(8, 8, 3, "cpu") is first
    assert attention_module.sliding_window_block_mask(8, 8, 2, "cpu") is not first
    dense = attention_module._static_mask(8, 8, 3, torch.device("cpu"))
    assert attention_module._static_mask(8, 8, 3, torch.device("cpu")) is dense
    for n in range(40):  # an evaluation of many lengths keeps only the recent masks
        attention_module._static_mask(n + 1, n + 1, 0, torch.device("cpu"))
    assert len(attention_module._dense_masks) <= attention_module._MASK_CACHE_SIZE


def test_masks_never_read_device_values():
    # A host read of a meta tensor raises, so building every mask on "meta" proves there is
    # none (the old `torch.tensor([tk], device=...)` made each window layer wait on a GPU).
    q = torch.empty(2, 4, 2, 16, device="meta")
    k = torch.empty(2, 8, 2, 16, device="meta")
    assert attention(q, k, k, window=2).shape == q.shape
    assert (
        attention(q, k, k, window=2, k_len=torch.tensor([5, 8], device="meta")).device.type
        == "meta"
    )
    mask = attention_module.visible_keys(4, 8, 2, None, None, torch.device("meta"))
    assert mask.shape == (1, 1, 4, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_window_layers_never_synchronise():
    q, k, v = (t.cuda() for t in make_qkv(2, 64, 64, 4, 2))
    attention(q, k, v, window=7)  # warm the caches and any lazy kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, window=7)
        attention(q[:, :1], k, v, window=7, k_len=torch.tensor([10, 64], device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cpu_never_selects_flash_attention():
    q, _, _ = make_qkv(1, 4, 4, 2, 2)
    assert not _fa3_usable(q.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        (((1, 4, 3, 8), (1, 4, 2, 8)), {}, "multiple of key/value heads"),
        (((1, 4, 2, 8), (1, 4, 2, 4)), {}, "head dim"),
        (((1, 4, 2, 8), (1, 4, 2, 8)), {"window": -1}, "window"),
        (((2, 1, 2, 8), (2, 4, 2, 8)), {"k_len": torch.tensor([4])}, "k_len"),
        (((2, 1, 2, 8), (2, 4, 2, 8)), {"k_len": torch.tensor([4.0, 4.0])}, "k_len"),
        (((1, 2, 2, 8), (1, 4, 2, 8)), {"q_pos": torch.tensor([[0, 1, 2]])}, "q_pos"),
        (((1, 5, 2, 8), (1, 4, 2, 8)), {}, "more queries"),
    ],
)
def test_bad_inputs_are_rejected(shapes, kwargs, message):
    q_shape, kv_shape = shapes
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    with pytest.raises(ValueError, match=message):
        attention(q, k, k.clone(), **kwargs)
