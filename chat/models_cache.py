"""The checkpoints an engine worker keeps loaded: a small LRU that never evicts a busy model.

A worker serves whichever checkpoint a request names, but memory holds only a few models, so
the least recently used one is dropped to make room -- unless it is still generating, since
evicting it would kill replies mid-sentence. When every entry is busy the cache says so and
the caller keeps the request waiting until a model goes idle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ModelCache(Generic[K, V]):
    """Up to `capacity` values by key, least recently used first.

    `is_idle(value)` says whether a value may be evicted; `evict(value)` releases it.
    """

    def __init__(
        self, capacity: int, is_idle: Callable[[V], bool], evict: Callable[[V], None]
    ) -> None:
        if capacity < 1:
            raise ValueError(f"the model cache needs room for at least one model, got {capacity}")
        self.capacity = capacity
        self._is_idle = is_idle
        self._evict = evict
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get_or_create(self, key: K, create: Callable[[], V]) -> V | None:
        """The value for `key` (now the most recently used), created if absent; None when the
        cache is full of busy values and nothing can be evicted yet."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        while len(self._entries) >= self.capacity:
            victim = next((k for k, v in self._entries.items() if self._is_idle(v)), None)
            if victim is None:
                return None
            self._evict(self._entries.pop(victim))
        value = self._entries[key] = create()
        return value

    def discard(self, key: K) -> None:
        """Forget `key` without calling evict (the value is already gone, e.g. failed to load)."""
        self._entries.pop(key, None)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(list(self._entries.items()))
