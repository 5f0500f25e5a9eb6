"""`KeySet`: a set of string keys (clip ids, edit keys, source URIs) held as sorted 64-bit hashes.

Every membership test of the drivers ("is this clip id committed?", "does this video have a clip?", "did
this run write or fail this clip?") goes through this one class. A corpus of 10M clips would take about
1 GB as a Python ``set`` of id strings; as uint64 hashes it takes 80 MB.

The hash (`key_hashes`) is BLAKE2b with an 8-byte digest (`hashlib`, in the standard library: no new
dependency -- xxhash is not installed here; unlike Python's ``hash()`` it is the same in every process,
Python version and machine, so hashes can be written to DST and read back by a later run). 64 bits: among
10M keys the chance that any two share a hash is about n^2 / 2^65 = 2.7e-6; a run testing 10M new keys
against 10M committed ones takes one for committed (and skips it) with probability about 5.4e-6. Clip ids
themselves are 64-bit (sha1 hex[:16], `gen1.video.clip_id`), so they collide at the same rate.

Layout (the logarithmic method): sorted, disjoint uint64 arrays ("levels"), each at least twice the size of
the next. `add` appends the new hashes as a level and merges the last two while the older is no more than
twice the newer, so each hash is merged O(log n) times, a lookup is one ``searchsorted`` per level (at most
about log2(n) levels), and adding k keys costs O(k log n) amortised whatever is already in the set. Merges
copy (two levels into one new array), so a set of n hashes briefly needs up to 2 x 8n bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

Row = TypeVar("Row", bound=Mapping[str, Any])

HASH_NAME = "blake2b-64"  # recorded in what is written (`pipelines.commit_index`)


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """BLAKE2b-64 of each key's UTF-8 bytes: uint64 (n,), in the order of ``keys``."""
    digests = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest() for k in keys)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64, copy=False)


def sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """``hashes`` sorted, without repeats (itself when it already is: no copy)."""
    h = np.asarray(hashes, dtype=np.uint64)
    if len(h) < 2 or bool(np.all(h[1:] > h[:-1])):
        return h
    h = np.sort(h)
    keep = np.empty(len(h), dtype=bool)
    keep[0] = True
    np.not_equal(h[1:], h[:-1], out=keep[1:])
    return h if keep.all() else h[keep]


class KeySet:
    """A set of strings held as their `key_hashes` (see the module docstring)."""

    def __init__(self, hashes: np.ndarray | None = None):
        self._levels: list[np.ndarray] = []
        if hashes is not None:
            self.add_hashes(hashes)

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeySet:
        return cls(key_hashes(keys))

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self._levels)

    @property
    def levels(self) -> int:
        return len(self._levels)

    def contains_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """bool (n,): which of ``hashes`` (uint64 (n,)) are in the set."""
        h = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(h), dtype=bool)
        for level in self._levels:
            i = np.searchsorted(level, h)
            np.minimum(i, len(level) - 1, out=i)
            found |= level[i] == h
        return found

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """bool (n,): which of ``keys`` are in the set."""
        return self.contains_hashes(key_hashes(keys))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.contains([key])[0])

    def add_hashes(self, hashes: np.ndarray) -> int:
        """Add ``hashes`` (uint64, any order, repeats allowed); returns how many were new."""
        h = sorted_unique(hashes)
        if self._levels:
            h = h[~self.contains_hashes(h)]
        if len(h):
            self._levels.append(h)
            while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
                newer, older = self._levels.pop(), self._levels.pop()
                self._levels.append(_merge(older, newer))
        return len(h)

    def add(self, keys: Iterable[str]) -> int:
        """Add ``keys``; returns how many were new."""
        return self.add_hashes(key_hashes(keys))

    def hashes(self) -> np.ndarray:
        """Every hash of the set, sorted: uint64 (n,). Merges the levels into one first."""
        if len(self._levels) > 1:
            merged = np.concatenate(self._levels)
            self._levels = []
            merged.sort()
            self._levels = [merged]
        return self._levels[0] if self._levels else np.empty(0, dtype=np.uint64)

    def count_not_in(self, other: KeySet) -> int:
        """How many keys of this set ``other`` does not hold."""
        return sum(int(np.count_nonzero(~other.contains_hashes(level))) for level in self._levels)


def rows_not_in(rows: Sequence[Row], key: str, *sets: KeySet) -> list[Row]:
    """The rows of ``rows`` (in order) whose ``key`` value is in none of ``sets``."""
    hashes = key_hashes([r[key] for r in rows])
    found = np.zeros(len(rows), dtype=bool)
    for keys in sets:
        found |= keys.contains_hashes(hashes)
    return [r for r, f in zip(rows, found, strict=True) if not f]


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted disjoint arrays -> one sorted array (a stable sort finds the two runs: linear time)."""
    out = np.concatenate([a, b])
    out.sort(kind="stable")
    return out
