"""The hybrid family's decode state: a KV cache for the full-attention layers and, for every
linear-attention layer, a conv window and a recurrent state per row.

Why two kinds of state: a full-attention layer must see every earlier key, so its cache grows
with the conversation (the engine's own `engine.kv_cache.KVCache`, reused as is, indexed by
full-layer number 0..n_full-1). A gated-DeltaNet layer folds the whole past into a fixed-size
state -- the last `conv_kernel - 1` inputs of its short convolution and one (Dk, Dv) matrix per
value head -- so its memory per row does not depend on the length at all. That is what makes
three linear layers per full one cheap at long contexts.

The engine's `Batch` moves rows around (prefill into one row, replicate to the samples' rows,
refill a leaving row's slot with the last row): `reset`, `replicate` and `move` carry the conv
and recurrent states along with the keys, and `reset` zeroes them, because unlike stale keys
(never attended past a row's length) a stale recurrent state would be read as the start of the
next conversation. Lengths (per row, on the device and mirrored on the host) live in the KV
part and are shared by every layer: the linear layers need none, the full layers' rotary
positions come from them.

Recurrent states are kept in fp32 whatever the compute dtype: they are running sums over the
whole conversation (see engine/ops/delta_rule.py). Conv windows hold raw projection outputs and
are kept in the compute dtype, like keys.
"""

from __future__ import annotations

import torch

from engine.kv_cache import CacheRows, KVCache


class HybridCache:
    """Decode state for up to `batch_size` rows of up to `max_len` positions, allocated once."""

    def __init__(
        self,
        *,
        n_full: int,
        n_linear: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        conv_dim: int,
        conv_kernel: int,
        n_v_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.kv = KVCache(
            n_full, batch_size, max_len, n_kv_head, head_dim, device=device, dtype=dtype
        )
        self.conv = torch.zeros(
            n_linear, batch_size, conv_dim, conv_kernel - 1, device=device, dtype=dtype
        )
        self.recurrent = torch.zeros(
            n_linear, batch_size, n_v_heads, k_head_dim, v_head_dim,
            device=device, dtype=torch.float32,
        )  # fmt: skip
        self.max_len = max_len
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def lengths(self) -> torch.Tensor:
        return self.kv.lengths

    @property
    def host_lengths(self) -> list[int]:
        return self.kv.host_lengths

    def rows(self, start: int, stop: int) -> HybridCacheRows:
        """Rows [start, stop) as the cache a model forward writes through (views, no copy)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {self.batch_size}")
        return HybridCacheRows(self, start, stop)

    def reset(self, slot: int) -> None:
        """Empty one row: length 0 and zero conv / recurrent states (no leak into the next
        conversation that uses the slot)."""
        self.kv.reset(slot)
        self.conv[:, slot].zero_()
        self.recurrent[:, slot].zero_()

    def replicate(self, src: int, dst_start: int, dst_stop: int) -> None:
        """Copy row `src` (keys, states, length) into rows [dst_start, dst_stop)."""
        if dst_start >= dst_stop:
            return
        self.kv.replicate(src, dst_start, dst_stop)
        self.conv[:, dst_start:dst_stop] = self.conv[:, src : src + 1]
        self.recurrent[:, dst_start:dst_stop] = self.recurrent[:, src : src + 1]

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (keeps the engine's active rows contiguous)."""
        self.kv.move(src, dst)
        self.conv[:, dst] = self.conv[:, src]
        self.recurrent[:, dst] = self.recurrent[:, src]


class HybridCacheRows:
    """A contiguous range of a `HybridCache`'s rows, as `Hybrid.forward` uses it.

    Full-attention layer j calls `insert(j, k, v)` (engine.models.gpt.KVCache's protocol, on
    the KV part); linear layer i reads and updates `conv_state(i)` (B, C, K-1) and
    `recurrent_state(i)` (B, H_v, Dk, Dv) in place; the forward reads `lengths` for positions,
    checks `check_room(T)` first and calls `advance(T)` once at the end.
    """

    def __init__(self, cache: HybridCache, start: int, stop: int) -> None:
        self._cache = cache
        self._kv: CacheRows = cache.kv.rows(start, stop)
        self._start, self._stop = start, stop
        self._conv = [layer[start:stop] for layer in cache.conv]
        self._recurrent = [layer[start:stop] for layer in cache.recurrent]
        self.max_len = cache.max_len

    @property
    def lengths(self) -> torch.Tensor:
        return self._kv.lengths

    def host_lengths(self) -> list[int]:
        return self._kv.host_lengths()

    def check_room(self, num_new: int) -> None:
        """ValueError when `num_new` more positions do not fit every row (checked before any
        state changes; the KV part checks again, but a model without full layers has none)."""
        longest = max(self._kv.host_lengths())
        if longest + num_new > self.max_len:
            raise ValueError(
                f"cache overflow: {num_new} new tokens after {longest} cached positions "
                f"exceed max_len {self.max_len}"
            )

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._kv.insert(layer, k, v)

    def conv_state(self, layer: int) -> torch.Tensor:
        return self._conv[layer]

    def recurrent_state(self, layer: int) -> torch.Tensor:
        return self._recurrent[layer]

    def advance(self, num_tokens: int) -> None:
        self._kv.advance(num_tokens)
