"""The index of what a keyed table has committed: what a driver reads at start instead of every part.

`pipelines.commits.Committer` writes, with every part of a keyed table (feature shards by clip id, the edit
manifest by edit key), a small index of that part's keys; at start it lists the table's parts once and loads
their keys as hashes (`pipelines.keyset.KeySet`) from the index, not from the parts. Layout under ``DST``::

    DST/_index/<table>/part-<name>.parquet   the keys of DST/<table>/part-<name>.parquet (a "part index")
    DST/_index/<table>/merged.parquet        the keys of many committed parts at once (the "merged index")

Every index file is one row of `index_schema`: ``parts`` (the names of the committed parts it covers),
``keys`` (BLAKE2b-64 hashes of their key column, sorted, unique) and one ``track:<column>`` per tracked
column (hashes of its distinct values, e.g. the source URIs that have a clip). Sorted hashes are written
with Parquet's delta encoding: about 5.5 bytes a key (10M keys: 55 MB).

A part index is written whole before its part is moved into place, so every committed part written by this
code has one; one left by a run killed in between belongs to no committed part and is never read (only the
indexes of listed parts are). `load_committed` lists the committed parts (one listing, paginated on S3),
reads the merged index, then the part index of each listed part the merged one does not cover (fetched
many at a time: concurrently on S3). A part without an index -- committed by code older than this index --
has its key and tracked columns read and hashed instead, and a log line says how many. A merged index
that covers a part no longer listed (deleted by hand) is not used: every part is read from its own index.
When ``merge`` and at least `MERGE_AFTER_PARTS` parts were not covered, a new merged index covering every
listed part replaces the old one (written aside, then moved), so the next start reads one file; a failed
write of it is a warning (the run goes on, the next start reads the part indexes again). Only the
holder of DST's lease (`pipelines.lease`) may merge: it is then the one writer of DST.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.keyset import HASH_NAME, KeySet, key_hashes, sorted_unique
from pipelines.schema import COMPRESSION, TableStore

logger = logging.getLogger(__name__)

INDEX_DIR = "_index"
MERGED_FILE = "merged.parquet"
MERGE_AFTER_PARTS = 100  # parts read one by one at start before a new merged index is written
FETCH_BATCH = 1000  # part indexes fetched at once


def index_schema(track: Sequence[str] = ()) -> pa.Schema:
    fields = [pa.field("parts", pa.list_(pa.string()), nullable=False),
              pa.field("keys", pa.list_(pa.uint64()), nullable=False)]
    fields += [pa.field(f"track:{c}", pa.list_(pa.uint64()), nullable=False) for c in track]
    return pa.schema(fields, metadata={"gen1.table": "commit-index", "gen1.hash": HASH_NAME})


def index_path(store: TableStore, table: str, part: str) -> str:
    """Where the index of committed part ``part`` (its file name) of ``table`` lives."""
    return store.path(INDEX_DIR, table, part)


@dataclass
class CommittedKeys:
    """What a table has committed: ``keys`` and, per tracked column, ``values``; ``parts`` listed, and how
    many were read one by one (``read_parts``) and of those how many had no index (``legacy_parts``)."""

    keys: KeySet = field(default_factory=KeySet)
    values: dict[str, KeySet] = field(default_factory=dict)
    parts: int = 0
    read_parts: int = 0
    legacy_parts: int = 0


def write_part_index(store: TableStore, table: str, part: str, keys: np.ndarray,
                     tracked: Mapping[str, np.ndarray]) -> str:
    """Write the index of ``part`` (the file name it is about to be committed under): ``keys`` and the
    ``tracked`` columns' value hashes. Written in place: it is read only once ``part`` is committed."""
    path = index_path(store, table, part)
    store.fs.makedirs(store.path(INDEX_DIR, table), exist_ok=True)
    _write(store, path, [part], keys, tracked)
    return path


def load_committed(store: TableStore, table: str, key: str, track: Sequence[str] = (),
                   merge: bool = True) -> CommittedKeys:
    """The committed keys of ``table`` (see the module docstring); ``merge``: write a new merged index when
    `MERGE_AFTER_PARTS` or more parts had to be read one by one."""
    listed = [p.rsplit("/", 1)[-1] for p in store.committed(table)]
    out = CommittedKeys(values={c: KeySet() for c in track}, parts=len(listed))
    merged = _read_merged(store, table, track, set(listed))
    covered: set[str] = set()
    if merged is not None:
        covered, keys, tracked = merged
        out.keys.add_hashes(keys)
        for c in track:
            out.values[c].add_hashes(tracked[c])
    todo = [p for p in listed if p not in covered]
    keys_parts, tracked_parts = _read_parts(store, table, key, track, todo, out)
    if keys_parts:
        out.keys.add_hashes(_sorted(keys_parts))
        for c in track:
            out.values[c].add_hashes(_sorted(tracked_parts[c]))
    if merge and len(todo) >= MERGE_AFTER_PARTS:
        try:
            _write_merged(store, table, listed, out)
        except Exception as e:  # an optimisation of the next start: this run goes on without it
            logger.warning("could not write the merged key index of %s (%s: %s); the next start reads the parts' "
                           "own indexes again", store.uri(store.path(table)), type(e).__name__, e)
    return out


def _read_parts(store: TableStore, table: str, key: str, track: Sequence[str], parts: list[str],
                out: CommittedKeys) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The hashes of ``parts``, each from its index, else (no index) from its columns."""
    keys: list[np.ndarray] = []
    tracked: dict[str, list[np.ndarray]] = {c: [] for c in track}
    legacy = []
    for lo in range(0, len(parts), FETCH_BATCH):
        batch = parts[lo:lo + FETCH_BATCH]
        paths = [index_path(store, table, p) for p in batch]
        blobs = store.fs.cat(paths, on_error="return") if paths else {}
        for part, path in zip(batch, paths, strict=True):
            blob = blobs.get(path, FileNotFoundError(path))
            if isinstance(blob, BaseException) and not isinstance(blob, FileNotFoundError):
                raise blob
            row = None if isinstance(blob, FileNotFoundError) else _parse(
                pq.read_table(pa.BufferReader(blob)), track, store.uri(path))
            if row is None:
                legacy.append(part)
                continue
            keys.append(row[1])
            for c in track:
                tracked[c].append(row[2][c])
    if legacy:
        logger.info("%d of %d committed parts of %s have no key index (committed by older code); reading their "
                    "column(s) %s instead", len(legacy), out.parts, store.uri(store.path(table)),
                    ", ".join([key, *track]))
    for part in legacy:
        data = store.read(store.path(table, part), [key, *track])
        keys.append(key_hashes(data.column(key).to_pylist()))
        for c in track:
            tracked[c].append(key_hashes(set(data.column(c).to_pylist())))
    out.read_parts, out.legacy_parts = len(parts), len(legacy)
    return keys, tracked


def _read_merged(store: TableStore, table: str, track: Sequence[str], listed: set[str]
                 ) -> tuple[set[str], np.ndarray, dict[str, np.ndarray]] | None:
    """(covered parts, keys, tracked) of the merged index; None when there is none, or when it was written
    with another hash or other tracked columns, or covers a part no longer committed."""
    path = store.path(INDEX_DIR, table, MERGED_FILE)
    try:
        data = pq.read_table(pa.BufferReader(store.fs.cat_file(path)))  # one GET on S3
    except FileNotFoundError:
        return None
    parsed = _parse(data, track, store.uri(path))
    if parsed is None:
        return None
    covered = set(parsed[0])
    if not covered <= listed:
        logger.warning("%s covers %d parts that are no longer committed; reading every part's own index instead",
                       store.uri(path), len(covered - listed))
        return None
    return covered, parsed[1], parsed[2]


def _parse(data: pa.Table, track: Sequence[str], what: str
           ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None:
    """(parts, keys, tracked) of one index file's row; None (with a warning) when it does not fit."""
    meta = data.schema.metadata or {}
    names = [f"track:{c}" for c in track]
    if meta.get(b"gen1.hash") != HASH_NAME.encode() or not set(["parts", "keys", *names]) <= set(data.column_names) \
            or data.num_rows != 1:
        logger.warning("%s is not a %s index with columns %s; not used", what, HASH_NAME, ["parts", "keys", *names])
        return None
    parts = data.column("parts").combine_chunks().values.to_pylist()
    return parts, _values(data, "keys"), {c: _values(data, n) for c, n in zip(track, names, strict=True)}


def _values(data: pa.Table, column: str) -> np.ndarray:
    """The uint64 list of ``column`` in the table's one row, without a copy where Arrow allows."""
    return data.column(column).chunk(0).flatten().to_numpy(zero_copy_only=False)


def _sorted(chunks: list[np.ndarray]) -> np.ndarray:
    out = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)
    chunks.clear()  # the pieces go before the sort's copy is made
    return sorted_unique(out)


def _write_merged(store: TableStore, table: str, parts: list[str], index: CommittedKeys) -> None:
    """Replace the merged index of ``table`` by one covering ``parts`` (written aside, then moved)."""
    tmp = store.path(INDEX_DIR, table, f".merged-{uuid.uuid4().hex}.tmp")
    store.fs.makedirs(store.path(INDEX_DIR, table), exist_ok=True)
    _write(store, tmp, parts, index.keys.hashes(), {c: s.hashes() for c, s in index.values.items()})
    final = store.path(INDEX_DIR, table, MERGED_FILE)
    store.fs.mv(tmp, final)
    logger.info("wrote %s: %d keys of %d parts", store.uri(final), len(index.keys), len(parts))


def _write(store: TableStore, path: str, parts: list[str], keys: np.ndarray,
           tracked: Mapping[str, np.ndarray]) -> None:
    def one_row(hashes: np.ndarray) -> pa.Array:
        h = sorted_unique(hashes)
        return pa.ListArray.from_arrays(pa.array([0, len(h)], pa.int32()), pa.array(h, pa.uint64()))

    columns = {"parts": pa.array([parts], pa.list_(pa.string())), "keys": one_row(keys)}
    columns.update({f"track:{c}": one_row(h) for c, h in tracked.items()})
    data = pa.table(columns, schema=index_schema(list(tracked)))
    encoding = {f"{name}.list.element": "DELTA_BINARY_PACKED" for name in data.column_names if name != "parts"}
    with store.fs.open(path, "wb") as f:
        pq.write_table(data, f, compression=COMPRESSION, use_dictionary=False, column_encoding=encoding)

