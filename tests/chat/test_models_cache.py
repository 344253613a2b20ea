"""chat/models_cache.py: an LRU that evicts only idle models."""

import pytest

from chat.models_cache import ModelCache


class Model:
    def __init__(self, name):
        self.name, self.busy, self.evicted = name, False, False


def cache_of(capacity):
    return ModelCache(
        capacity, is_idle=lambda m: not m.busy, evict=lambda m: setattr(m, "evicted", True)
    )


def test_hits_return_the_same_model_and_misses_create():
    cache = cache_of(2)
    a = cache.get_or_create("a", lambda: Model("a"))
    assert cache.get_or_create("a", lambda: pytest.fail("created twice")) is a
    assert len(cache) == 1


def test_the_least_recently_used_idle_model_is_evicted():
    cache = cache_of(2)
    a = cache.get_or_create("a", lambda: Model("a"))
    b = cache.get_or_create("b", lambda: Model("b"))
    cache.get_or_create("a", lambda: None)  # a is now the most recent
    c = cache.get_or_create("c", lambda: Model("c"))
    assert b.evicted and not a.evicted and not c.evicted
    assert [k for k, _ in cache.items()] == ["a", "c"]


def test_busy_models_are_skipped_and_a_full_busy_cache_says_none():
    cache = cache_of(2)
    a = cache.get_or_create("a", lambda: Model("a"))
    b = cache.get_or_create("b", lambda: Model("b"))
    a.busy = True
    cache.get_or_create("c", lambda: Model("c"))
    assert b.evicted and not a.evicted
    cache.get_or_create("c", lambda: None).busy = True
    assert cache.get_or_create("d", lambda: Model("d")) is None
    assert "d" not in cache and len(cache) == 2
    a.busy = False
    assert cache.get_or_create("d", lambda: Model("d")).name == "d"
    assert a.evicted


def test_discard_forgets_without_evicting():
    cache = cache_of(1)
    a = cache.get_or_create("a", lambda: Model("a"))
    cache.discard("a")
    assert "a" not in cache and not a.evicted


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        cache_of(0)
