"""The engine's key/value cache for attention layers: rows allocated once, one length per row.

It lives apart from the engine's scheduler so that every model family can build its decode
state from it (`model.new_cache`): GPT and GPT-2 use it as is, the hybrid family keeps one for
its full-attention layers next to its recurrent states. What the engine's `Batch` asks of any
family's cache is what this class offers -- `rows(start, stop)` (a view a forward writes
through), `reset`, `replicate`, `move`, `host_lengths`, `lengths`, `max_len`, `batch_size` and
`dtype` -- so rows can join and leave a running batch whatever the layers keep.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class DecodeCache(Protocol):
    """What the engine's `Batch` asks of any family's decode state (`model.new_cache`).

    Rows are slots: `reset` empties one before a prompt is prefilled into it (a recurrent
    state must not leak from the previous conversation), `replicate` copies a prefilled row to
    its samples' rows, `move` keeps the active rows contiguous when one leaves, and `rows`
    gives the view a forward writes through (the model decides what it needs from it).
    `host_lengths` mirrors `lengths` on the host so a step is planned without a device read.
    """

    batch_size: int
    max_len: int
    host_lengths: list[int]

    @property
    def lengths(self) -> torch.Tensor: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def rows(self, start: int, stop: int) -> Any: ...

    def reset(self, slot: int) -> None: ...

    def replicate(self, src: int, dst_start: int, dst_stop: int) -> None: ...

    def move(self, src: int, dst: int) -> None: ...


class KVCache:
    """Keys and values for up to `batch_size` rows, allocated once.

    `lengths` (on the cache's device) is what the model reads; `host_lengths` mirrors it in
    Python so that planning a step (where to write, how far to attend) never waits on the
    device. `last_tokens` holds each row's latest token for models that look one token back
    outside attention (GPT's smear gate); the model writes it, rows copy it with their keys.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"KV cache {name} must be positive, got {value}")
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch_size
        self.max_len = max_len
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def rows(self, start: int, stop: int) -> CacheRows:
        """Rows [start, stop) as a cache a model forward can use (views, no copy)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {self.batch_size}")
        return CacheRows(self, start, stop)

    def reset(self, slot: int) -> None:
        """Empty one row (its old keys stay in memory but are never attended to)."""
        self.lengths[slot] = 0
        self.host_lengths[slot] = 0

    def replicate(self, src: int, dst_start: int, dst_stop: int) -> None:
        """Copy row `src`'s cached positions into rows [dst_start, dst_stop)."""
        length = self.host_lengths[src]
        if dst_start >= dst_stop:
            return
        if length:
            self.k[:, dst_start:dst_stop, :, :length] = self.k[:, src : src + 1, :, :length]
            self.v[:, dst_start:dst_stop, :, :length] = self.v[:, src : src + 1, :, :length]
        self.last_tokens[dst_start:dst_stop] = self.last_tokens[src]
        self.lengths[dst_start:dst_stop] = length
        self.host_lengths[dst_start:dst_stop] = [length] * (dst_stop - dst_start)

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (used to keep the active rows contiguous)."""
        length = self.host_lengths[src]
        if length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.last_tokens[dst] = self.last_tokens[src]
        self.lengths[dst] = length
        self.host_lengths[dst] = length


class CacheRows:
    """A contiguous range of a `KVCache`'s rows, implementing `engine.models.gpt.KVCache` and
    `engine.models.gpt_inference.StepKVCache`.

    Where a step writes and how many positions attention reads are planned once per forward,
    on layer 0, from the host lengths: when every row has the same length (one prompt's
    samples, a single stream) the new keys go in with one slice copy per layer, otherwise
    with one indexed write. `insert` hands attention only the positions up to the longest row,
    so its cost follows the real lengths rather than `max_len`.
    """

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        self._cache = cache
        self._start, self._stop = start, stop
        # Per-layer views made once, heads-first (B, H, max_len, D) for reading and
        # (B, max_len, H, D) for writing: a decode step then costs one copy and one narrow
        # per tensor.
        self._k = [layer[start:stop] for layer in cache.k]
        self._v = [layer[start:stop] for layer in cache.v]
        self._k_by_pos = [keys.transpose(1, 2) for keys in self._k]
        self._v_by_pos = [values.transpose(1, 2) for values in self._v]
        self.lengths = cache.lengths[start:stop]
        self.last_tokens = cache.last_tokens[start:stop]
        self.max_len = cache.max_len
        self._end = 0
        self._k_len = self.lengths
        self._write_at: int | None = None
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._row_ids: torch.Tensor | None = None  # (B, 1) arange, made on first use

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.write(layer, k, v)
        keys, values = self._k_by_pos[layer], self._v_by_pos[layer]
        return keys.narrow(1, 0, self._end), values.narrow(1, 0, self._end), self._k_len

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, H, D) at each row's next T positions and return the layer's
        whole heads-first keys and values (B, H, max_len, D); positions at or past a row's
        new length hold stale data."""
        num_new = k.size(1)
        if layer == 0:
            self._plan(num_new)
        keys, values = self._k_by_pos[layer], self._v_by_pos[layer]
        if self._write_at is not None:
            keys.narrow(1, self._write_at, num_new).copy_(k)
            values.narrow(1, self._write_at, num_new).copy_(v)
        else:
            keys.index_put_(self._index, k)
            values.index_put_(self._index, v)
        return self._k[layer], self._v[layer]

    def host_lengths(self) -> list[int]:
        """The rows' cached lengths as Python ints."""
        return self._cache.host_lengths[self._start : self._stop]

    def advance(self, num_tokens: int) -> None:
        self.lengths += num_tokens
        host = self._cache.host_lengths
        for slot in range(self._start, self._stop):
            host[slot] += num_tokens

    def _plan(self, num_new: int) -> None:
        host = self._cache.host_lengths[self._start : self._stop]
        shortest, longest = min(host), max(host)
        if longest + num_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {num_new} new tokens after {longest} cached positions "
                f"exceed max_len {self.max_len}"
            )
        self._end = longest + num_new
        self._k_len = self.lengths + num_new
        if shortest == longest:
            self._write_at, self._index = shortest, None
        else:
            device = self.lengths.device
            if self._row_ids is None:
                self._row_ids = torch.arange(len(host), device=device)[:, None]
            positions = self.lengths[:, None] + torch.arange(num_new, device=device)
            self._write_at, self._index = None, (self._row_ids, positions)
