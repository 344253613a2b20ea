"""Causal attention behind one function, so the model never knows which kernel runs it.

Three backends, tried in this order for each call (SPEC §4); all take (B, T, H, D) tensors,
the layout the projections produce, so no caller transposes:

1. FlashAttention-3 on Hopper GPUs with half-precision inputs, when its `flash_attn_interface`
   module is installed or `load_hub_fa3` fetched it through the optional `kernels` package.
2. PyTorch's FlexAttention for CUDA sliding-window layers in training and evaluation
   (Tq == Tk, no cache lengths): its block mask lets the kernel skip the tiles a window or the causal
   rule hides, which dense masked SDPA computes and throws away. The mask depends only on
   the shape and window, so it is built once and cached (inside a compiled graph it is
   rebuilt by a few tiny kernels instead, since a traced graph cannot read a Python cache).
3. PyTorch's `scaled_dot_product_attention` (SDPA) everywhere else: with `is_causal=True` and
   no mask tensor whenever nothing else constrains the pattern (no cache lengths, no explicit
   positions, Tq == Tk and a window that cannot bind), otherwise with an explicit boolean mask.
   CPUs always take this path: SDPA's fused CPU kernel is faster there than FlexAttention,
   which needs torch.compile on a CPU to be more than a reference loop.

`NANOCHAT_ATTENTION=fa3|flex|sdpa` (or `set_backend`) forces one backend for every call it
can serve, for benchmarks and tests; calls it cannot serve (e.g. flex with a KV cache) still
fall back to SDPA, and `backend_for` tells which backend a call gets.

Positions are what make the backends agree. Keys sit at positions 0..Tk-1 of their row. By
default the queries are the *last* Tq positions of the row's valid keys -- exactly
FlashAttention's "bottom-right aligned" causal mask -- which covers training (Tq == Tk),
chunked prefill and decoding against a KV cache. Rows of a batch may hold different numbers of
valid keys (`k_len`), because the engine batches independent conversations; only SDPA can
take arbitrary per-query positions (`q_pos`), so passing those selects it.

Nothing here reads a tensor's value on the host, so a step never waits for the GPU and a
compiled step has no graph break: windows and lengths that choose a path are Python ints.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

try:
    # FlashAttention-3's Python interface (Dao-AILab's `hopper/` build), present only where
    # someone installed it for a Hopper GPU.
    import flash_attn_interface as _fa3
except ImportError:
    _fa3 = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fa3", "flex", "sdpa")
_BACKEND_ENV = "NANOCHAT_ATTENTION"
# Set to 0 to never fetch FlashAttention-3 from the Hugging Face hub through `kernels`.
_HUB_ENV = "NANOCHAT_FA3_HUB"
# The hub builds nanochat uses: a Hopper-tuned one for SM90, the community build elsewhere.
_HUB_KERNELS = {9: "varunneal/flash-attention-3"}
_HUB_KERNEL_DEFAULT = "kernels-community/flash-attn3"

# FlashAttention-3 runs on Hopper (SM90) only, and only on half-precision inputs.
_FA3_MAJOR = 9
_FA3_DTYPES = (torch.bfloat16, torch.float16)
# Masks kept per (shape, window, device): a training run needs two (window and full), an
# evaluation of varying lengths would otherwise grow the cache without bound.
_MASK_CACHE_SIZE = 16
_block_masks: OrderedDict = OrderedDict()
_dense_masks: OrderedDict = OrderedDict()
_compiled_flex = None


def _backend_from_env() -> str:
    choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{_BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


_forced = _backend_from_env()


def set_backend(choice: str) -> None:
    """Force a backend ('fa3', 'flex', 'sdpa') for every call it can serve, or 'auto'."""
    global _forced
    if choice not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    _forced = choice


def get_backend() -> str:
    """The forced backend, or 'auto'."""
    return _forced


def load_hub_fa3(device: torch.device | str) -> bool:
    """Fetch FlashAttention-3 through the optional `kernels` package; True if FA3 is usable.

    Called once at program start (training.runtime.init_runtime) rather than at import, so
    importing the engine never touches the network, and never from a compiled step. Only
    tried on a CUDA device when `kernels` is installed, no local `flash_attn_interface` was
    found and NANOCHAT_FA3_HUB is not 0; any failure leaves the other backends in charge.
    """
    global _fa3
    device = torch.device(device)
    if _fa3 is not None or device.type != "cuda" or os.environ.get(_HUB_ENV, "1") == "0":
        return _fa3 is not None
    try:
        from kernels import get_kernel
    except ImportError:
        return False
    major = torch.cuda.get_device_properties(device).major
    name = _HUB_KERNELS.get(major, _HUB_KERNEL_DEFAULT)
    try:
        _fa3 = get_kernel(name).flash_attn_interface
    except Exception as exc:  # the hub, the build or the GPU can each refuse
        log.warning(
            "FlashAttention-3 from %s unavailable (%s); using FlexAttention/SDPA", name, exc
        )
        return False
    log.info("FlashAttention-3 loaded from %s", name)
    return True


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
    backend = backend_for(q, k, window=window, k_len=k_len, q_pos=q_pos)
    if backend == "fa3":
        return _fa3_attention(q, k, v, window, k_len)
    if backend == "flex":
        return _flex_attention(q, k, v, window, k_len)
    return _sdpa_attention(q, k, v, window, k_len, q_pos)


def backend_for(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None = None,
    k_len: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
) -> str:
    """Which backend `attention` runs for these arguments: 'fa3', 'flex' or 'sdpa'."""
    if q_pos is not None or _forced == "sdpa":
        return "sdpa"
    if _forced in ("auto", "fa3") and _fa3_usable(q):
        return "fa3"
    if _forced == "flex" and _flex_usable(q, k):
        return "flex"
    # Unforced, FlexAttention is worth it only where its block mask skips work that SDPA's
    # fused kernels do not: window layers on a GPU, in training and evaluation (the cached
    # block mask depends on the shape alone only without cache lengths).
    tq, tk = q.size(1), k.size(1)
    plain = k_len is None and tq == tk and _window_binds(window, tk)
    if _forced == "auto" and q.is_cuda and plain and _flex_usable(q, k):
        return "flex"
    return "sdpa"


def _window_binds(window: int | None, tk: int) -> bool:
    # The farthest a visible key can be from its query is tk - 1 positions.
    return window is not None and window < tk - 1


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


# --- SDPA ------------------------------------------------------------------------------------


def _sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_len: torch.Tensor | None,
    q_pos: torch.Tensor | None,
) -> torch.Tensor:
    tq, tk = q.size(1), k.size(1)
    if k_len is None and q_pos is None:
        if tq == tk and not _window_binds(window, tk):
            mask, causal = None, True
        else:
            mask, causal = _static_mask(tq, tk, window, q.device), False
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
    `attention`, for callers that plan masks themselves (engine/models/gpt_inference.py).

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

    The arguments mean what they mean for `attention`. Built from Python ints and the given
    tensors only, so it never waits on the device.
    """
    if q_pos is None:
        ends = k_len.to(device)[:, None] if k_len is not None else tk
        q_pos = ends + (torch.arange(tq, device=device) - tq)[None]
    key_pos = torch.arange(tk, device=device)
    distance = q_pos.to(device)[:, :, None] - key_pos
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance <= window)
    if k_len is not None:
        visible = visible & (key_pos < k_len.to(device)[:, None, None])
    return visible[:, None]


def _static_mask(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """`visible_keys` without cache lengths or positions: the same for every call of a shape,
    so eager calls share one copy (every window layer of a step, every step of a run)."""
    if torch.compiler.is_compiling():
        return visible_keys(tq, tk, window, None, None, device)
    return _cached(_dense_masks, (tq, tk, window, device),
                   lambda: visible_keys(tq, tk, window, None, None, device))  # fmt: skip


def _cached(cache: OrderedDict, key, build):
    """A small least-recently-used cache of masks."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _MASK_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


# --- FlexAttention ---------------------------------------------------------------------------


def _flex_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    # Its kernels want a head dim that is a power of two, and have no backward on a CPU.
    dim = q.size(-1)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return (
        flex_attention is not None
        and dim >= 16
        and dim & (dim - 1) == 0
        and not (q.device.type == "cpu" and needs_grad)
    )


def sliding_window_block_mask(tq: int, tk: int, window: int | None, device: torch.device | str):
    """FlexAttention's BlockMask for `tq` queries at the last positions of `tk` keys, causal
    and limited to `window` earlier positions (None: unlimited). Cached per (shape, window,
    device) outside compiled code."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _build_block_mask(tq, tk, window, device, None)
    return _cached(_block_masks, (tq, tk, window, device),
                   lambda: _build_block_mask(tq, tk, window, device, None))  # fmt: skip


def _build_block_mask(tq, tk, window, device, k_len):
    """The mask of `visible_keys` as a BlockMask. Without `k_len` it depends on the shape
    only; with it, on each row's length (a new mask per call: the engine never asks for it
    unforced)."""
    if k_len is None:
        offset = tk - tq

        def visible(b, h, q_idx, kv_idx):
            distance = q_idx + offset - kv_idx
            ok = distance >= 0
            return ok if window is None else ok & (distance <= window)

        return create_block_mask(visible, None, None, tq, tk, device=device)

    ends = k_len.to(device=device, dtype=torch.int64)

    def visible_in_row(b, h, q_idx, kv_idx):
        distance = q_idx + ends[b] - tq - kv_idx
        ok = (distance >= 0) & (kv_idx < ends[b])
        return ok if window is None else ok & (distance <= window)

    return create_block_mask(visible_in_row, k_len.size(0), None, tq, tk, device=device)


def _flex_kernel():
    """flex_attention as it should be called here: inside a compiled graph as is (the outer
    compile builds its kernel); in eager code on a GPU through its own compiled wrapper, since
    eager flex_attention is a slow reference implementation; eager on a CPU as the reference
    (tests), since compiling it there takes longer than any test."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_len: torch.Tensor | None,
) -> torch.Tensor:
    tq, tk = q.size(1), k.size(1)
    if k_len is None:
        mask = sliding_window_block_mask(tq, tk, window, q.device)
    else:
        mask = _build_block_mask(tq, tk, window, q.device, k_len)
    kernel = _flex_kernel() if q.is_cuda else flex_attention
    y = kernel(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=mask,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


# --- FlashAttention-3 ------------------------------------------------------------------------


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
