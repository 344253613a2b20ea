"""Causal attention behind one function, so the model never knows which kernel runs it.

Two backends (SPEC §4): FlashAttention-3 on Hopper GPUs when its `flash_attn_interface` module
is installed, and PyTorch's `scaled_dot_product_attention` (SDPA) everywhere else. Both take
(B, T, H, D) tensors, the layout the projections produce, so no caller transposes.

Positions are what make the two agree. Keys sit at positions 0..Tk-1 of their row. By default
the queries are the *last* Tq positions of the row's valid keys -- exactly FlashAttention's
"bottom-right aligned" causal mask -- which covers training (Tq == Tk), chunked prefill and
decoding against a KV cache. Rows of a batch may hold different numbers of valid keys
(`k_len`), because the engine batches independent conversations; only SDPA can take arbitrary
per-query positions (`q_pos`), so passing those selects it.

The SDPA path keeps its fast form (`is_causal=True`, no mask tensor) whenever nothing else
constrains the pattern: no cache lengths, no explicit positions, Tq == Tk and a window that
cannot bind. Otherwise it builds an explicit boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    # FlashAttention-3's Python interface (Dao-AILab's `hopper/` build), present only where
    # someone installed it for a Hopper GPU.
    import flash_attn_interface as _fa3
except ImportError:
    _fa3 = None

# FlashAttention-3 runs on Hopper (SM90) only, and only on half-precision inputs.
_FA3_MAJOR = 9
_FA3_DTYPES = (torch.bfloat16, torch.float16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    k_len: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention; returns (B, Tq, Hq, D).

    q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) with Hq a multiple of Hkv (grouped-query attention).
    window: how many earlier positions a query may see besides its own (FlashAttention's left
        window): key j is visible from a query at position p iff p - window <= j <= p.
        None means unlimited.
    k_len: (B,) integer tensor, the number of valid keys of each row (keys at j >= k_len[b] are
        ignored, e.g. the unused tail of a KV cache). None means all Tk keys are valid.
    q_pos: (B, Tq) integer tensor, the position of each query. None means the last Tq positions
        of the row's valid keys: k_len[b] - Tq + i (or Tk - Tq + i without k_len).
    Every query must see at least one key (its own position), or its output is undefined.
    """
    _check_inputs(q, k, v, window, k_len, q_pos)
    if q_pos is None and _fa3_usable(q):
        return _fa3_attention(q, k, v, window, k_len)
    return _sdpa_attention(q, k, v, window, k_len, q_pos)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_len: torch.Tensor | None,
    q_pos: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, T, H, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    batch, tq, hq, dim = q.shape
    _, tk, hkv, _ = k.shape
    if k.size(0) != batch or k.size(3) != dim:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim"
        )
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if window is not None and window < 0:
        raise ValueError(f"window must be None or >= 0, got {window}")
    if k_len is not None and (k_len.shape != (batch,) or k_len.is_floating_point()):
        raise ValueError(f"k_len must be an integer tensor of shape ({batch},), got {k_len}")
    if q_pos is not None and (q_pos.shape != (batch, tq) or q_pos.is_floating_point()):
        raise ValueError(
            f"q_pos must be an integer tensor of shape ({batch}, {tq}), got {tuple(q_pos.shape)}"
        )
    if q_pos is None and k_len is None and tq > tk:
        raise ValueError(f"without q_pos there cannot be more queries ({tq}) than keys ({tk})")


def _sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_len: torch.Tensor | None,
    q_pos: torch.Tensor | None,
) -> torch.Tensor:
    tq, tk = q.size(1), k.size(1)
    # The farthest a visible key can be from its query is tk - 1 positions.
    window_binds = window is not None and window < tk - 1
    if k_len is None and q_pos is None and tq == tk and not window_binds:
        mask, causal = None, True
    else:
        mask, causal = visible_keys(tq, tk, window, k_len, q_pos, q.device), False
    # SDPA wants (B, H, T, D).
    y = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask, causal=causal)
    return y.transpose(1, 2)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """PyTorch's SDPA on heads-first (B, H, T, D) tensors, unchecked: the kernel under
    `attention`, for callers that plan masks themselves (engine/inference.py).

    mask: boolean, broadcastable to (B, 1, Tq, Tk), True where a query may see a key (see
    `visible_keys`); None with causal=False means every query sees every key.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.size(1) != k.size(1)
    )


def visible_keys(
    tq: int,
    tk: int,
    window: int | None,
    k_len: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk) mask, True where a query may attend to a key.

    The arguments mean what they mean for `attention`.
    """
    if q_pos is None:
        ends = k_len if k_len is not None else torch.tensor([tk], device=device)
        q_pos = ends.to(device)[:, None] - tq + torch.arange(tq, device=device)
    key_pos = torch.arange(tk, device=device)
    distance = q_pos.to(device)[:, :, None] - key_pos
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance <= window)
    if k_len is not None:
        visible = visible & (key_pos < k_len.to(device)[:, None, None])
    return visible[:, None]


def _fa3_usable(q: torch.Tensor) -> bool:
    # get_device_properties (unlike get_device_capability) is constant-folded by torch.compile.
    return (
        _fa3 is not None
        and q.is_cuda
        and q.dtype in _FA3_DTYPES
        and torch.cuda.get_device_properties(q.device).major == _FA3_MAJOR
    )


def _fa3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_len: torch.Tensor | None,
) -> torch.Tensor:
    # FlashAttention spells "no window" as -1; the right window is 0 because attention is causal.
    window_size = (-1 if window is None else window, 0)
    if k_len is None:
        out = _fa3.flash_attn_func(q, k, v, causal=True, window_size=window_size)
    else:
        # With no new k/v passed in, the kernel attends to k[:, :cache_seqlens] and aligns the
        # queries to the end of each row: the same positions as the SDPA default above.
        out = _fa3.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=k_len.to(torch.int32), causal=True, window_size=window_size
        )
    # Some FA3 builds return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out
