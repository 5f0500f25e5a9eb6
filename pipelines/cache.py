"""`LRUCache`: the one small cache of the pipeline stages (decoded clips, reference images, input videos).

`functools.lru_cache` does not fit here: a stage keys its entries by clip id while loading them from a
row, and must be able to hold numpy arrays of several MB without hashing them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most ``size`` values, the least recently used evicted first."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an LRUCache holds at least 1 value; size={size}")
        self.size = size
        self._values: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The value cached under ``key``, else ``load()`` (cached)."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = load()
        self._values[key] = value
        while len(self._values) > self.size:
            self._values.popitem(last=False)
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)
