"""engine.attention on its SDPA path, against explicit softmax with hand-built masks."""

import math

import pytest
import torch

from engine.attention import _fa3_usable, attention


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


def test_plain_causal_matches_reference():
    q, k, v = make_qkv(2, 9, 9, 4, 4)
    mask = hand_mask([list(range(9))] * 2, 9, [9, 9], window=None)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, mask))


@pytest.mark.parametrize("window", [0, 1, 3, 7])
def test_sliding_window_matches_reference(window):
    q, k, v = make_qkv(2, 10, 10, 2, 2)
    mask = hand_mask([list(range(10))] * 2, 10, [10, 10], window=window)
    torch.testing.assert_close(attention(q, k, v, window=window), naive_attention(q, k, v, mask))


def test_window_that_cannot_bind_equals_plain_causal():
    q, k, v = make_qkv(1, 8, 8, 2, 2)
    torch.testing.assert_close(attention(q, k, v, window=7), attention(q, k, v))
    assert not torch.allclose(attention(q, k, v, window=6), attention(q, k, v))


@pytest.mark.parametrize("window", [None, 2])
def test_grouped_query_attention_matches_reference(window):
    q, k, v = make_qkv(2, 7, 7, 6, 2)
    mask = hand_mask([list(range(7))] * 2, 7, [7, 7], window=window)
    torch.testing.assert_close(attention(q, k, v, window=window), naive_attention(q, k, v, mask))


def poison_tail(k, v, k_len):
    """Fill cache slots past each row's length with huge values that must not leak in."""
    for b, length in enumerate(k_len.tolist()):
        k[b, length:] = 1e4
        v[b, length:] = 1e4


@pytest.mark.parametrize("window", [None, 2])
def test_chunked_prefill_against_cache(window):
    # Cache of 12 slots, 9 valid; the 3 queries are positions 6, 7, 8.
    q, k, v = make_qkv(2, 3, 12, 4, 2)
    k_len = torch.tensor([9, 9])
    poison_tail(k, v, k_len)
    mask = hand_mask([[6, 7, 8]] * 2, 12, [9, 9], window=window)
    out = attention(q, k, v, window=window, k_len=k_len)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_queries_default_to_the_last_positions_without_cache_lengths():
    q, k, v = make_qkv(1, 3, 8, 2, 2)
    mask = hand_mask([[5, 6, 7]], 8, [8], window=None)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, mask))


@pytest.mark.parametrize("tq", [1, 2])
@pytest.mark.parametrize("window", [None, 3])
def test_rows_with_different_cache_lengths(tq, window):
    q, k, v = make_qkv(3, tq, 14, 4, 2)
    lengths = [5, 11, 14]
    k_len = torch.tensor(lengths)
    poison_tail(k, v, k_len)
    positions = [[n - tq + i for i in range(tq)] for n in lengths]
    mask = hand_mask(positions, 14, lengths, window=window)
    out = attention(q, k, v, window=window, k_len=k_len)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_each_row_matches_its_own_single_row_computation():
    q, k, v = make_qkv(2, 1, 10, 2, 2)
    k_len = torch.tensor([4, 10])
    batched = attention(q, k, v, k_len=k_len)
    for b, length in enumerate(k_len.tolist()):
        alone = attention(q[b : b + 1], k[b : b + 1, :length], v[b : b + 1, :length])
        torch.testing.assert_close(batched[b : b + 1], alone)


def test_explicit_query_positions():
    q, k, v = make_qkv(2, 3, 10, 2, 1)
    q_pos = torch.tensor([[0, 4, 9], [2, 3, 3]])
    k_len = torch.tensor([10, 6])
    poison_tail(k, v, k_len)
    mask = hand_mask(q_pos.tolist(), 10, [10, 6], window=2)
    out = attention(q, k, v, window=2, k_len=k_len, q_pos=q_pos)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask))


def test_gradients_flow_through_the_masked_path():
    q, k, v = make_qkv(1, 6, 6, 2, 2)
    for t in (q, k, v):
        t.requires_grad_(True)
    attention(q, k, v, window=2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


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
