"""The index of what a keyed table has committed: what a driver reads at start instead of every part.

`pipelines.commits.Committer` writes, with every part of a keyed table (feature shards by clip id, the edit
manifest by edit key), a small index of that part's keys; at start it lists the table's parts once and loads
their keys as hashes (`pipelines.keyset.KeySet`) from the index, not from the parts. Layout under ``DST``::

    DST/_index/<table>/part-<name>.parquet   the keys of DST/<table>/part-<name>.parquet (a "part index")
    DST/_index/<table>/merged.parquet        the keys of many committed parts at once (the "merged index")

Every index file is a flat Parquet table of one uint64 column, ``hash``, cut into segments that its schema
metadata names (``gen1.segments``: ``[[name, rows], ...]``): ``parts`` (hashes of the file names of the
committed parts it covers), ``keys`` (hashes of their key column) and one ``track:<column>`` per tracked
column (hashes of its values, e.g. the source URIs that have a clip); each segment sorted, without repeats.
Hashes are BLAKE2b-64 (`pipelines.keyset`), written with Parquet's delta encoding (about 5.5 bytes a key:
10M keys in 55 MB) and read row group by row group into one array, so loading n keys needs about 8n bytes.

A part index is written whole before its part is moved into place, so every committed part written by this
code has one; one left by a run killed in between belongs to no committed part and is never read (only the
indexes of listed parts are). `load_committed` lists the committed parts (one listing, paginated on S3),
reads the merged index, then the part index of each listed part the merged one does not cover (fetched
many at a time: concurrently on S3). A part without an index -- committed by code older than this index --
has its key and tracked columns read and hashed instead, and a log line says how many. A merged index
that covers a part no longer listed (deleted by hand) is not used: every part is read from its own index.
When ``merge`` and at least `MERGE_AFTER_PARTS` parts were not covered, a new merged index covering every
listed part replaces the old one (written aside, then moved), so the next start reads one file; a failed
write of it is a warning (the run goes on, the next start reads the part indexes again). Only the holder
of DST's lease (`pipelines.lease`) may merge: it is then the one writer of DST.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
ROW_GROUP = 1 << 16  # hashes per row group: a read holds one decoded row group (512 KiB) besides its result
PARTS, KEYS = "parts", "keys"


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
    segments = {PARTS: key_hashes([part]), KEYS: keys, **{f"track:{c}": h for c, h in tracked.items()}}
    with store.fs.open(path, "wb") as f:
        write_index(f, segments)
    return path


def load_committed(store: TableStore, table: str, key: str, track: Sequence[str] = (),
                   merge: bool = True) -> CommittedKeys:
    """The committed keys of ``table`` (see the module docstring); ``merge``: write a new merged index when
    `MERGE_AFTER_PARTS` or more parts had to be read one by one."""
    listed = [p.rsplit("/", 1)[-1] for p in store.committed(table)]
    out = CommittedKeys(values={c: KeySet() for c in track}, parts=len(listed))
    covered = np.zeros(len(listed), dtype=bool)
    merged = _read_merged(store, table, track)
    if merged is not None:
        parts = KeySet(merged[PARTS])
        covered = parts.contains_hashes(key_hashes(listed))
        if int(covered.sum()) == len(parts):
            out.keys.add_hashes(merged.pop(KEYS))
            for c in track:
                out.values[c].add_hashes(merged.pop(f"track:{c}"))
        else:
            logger.warning("%s covers %d parts that are no longer committed; reading every part's own index "
                           "instead", store.uri(store.path(INDEX_DIR, table, MERGED_FILE)),
                           len(parts) - int(covered.sum()))
            covered[:] = False
        del merged
    todo = [p for p, c in zip(listed, covered, strict=True) if not c]
    keys, tracked = _read_parts(store, table, key, track, todo, out)
    out.keys.add_hashes(_sorted(keys))
    for c in track:
        out.values[c].add_hashes(_sorted(tracked[c]))
    if merge and len(todo) >= MERGE_AFTER_PARTS:
        try:
            _write_merged(store, table, listed, out)
        except Exception as e:  # an optimisation of the next start: this run goes on without it
            logger.warning("could not write the merged key index of %s (%s: %s); the next start reads the "
                           "parts' own indexes again", store.uri(store.path(table)), type(e).__name__, e)
    return out


def _read_parts(store: TableStore, table: str, key: str, track: Sequence[str], parts: list[str],
                out: CommittedKeys) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The hashes of ``parts``, each from its index, else (no index) from its columns; one array per
    `FETCH_BATCH` parts (a small array per part would cost more than its hashes)."""
    keys: list[np.ndarray] = []
    tracked: dict[str, list[np.ndarray]] = {c: [] for c in track}
    legacy = []
    for lo in range(0, len(parts), FETCH_BATCH):
        batch = parts[lo:lo + FETCH_BATCH]
        paths = [index_path(store, table, p) for p in batch]
        blobs = store.fs.cat(paths, on_error="return") if paths else {}
        found: list[dict[str, np.ndarray]] = []
        for part, path in zip(batch, paths, strict=True):
            blob = blobs.get(path, FileNotFoundError(path))
            if isinstance(blob, BaseException) and not isinstance(blob, FileNotFoundError):
                raise blob
            index = None if isinstance(blob, BaseException) else read_index(pa.BufferReader(blob))
            if index is None or not _fits(index, track) or index[PARTS].tolist() != key_hashes([part]).tolist():
                legacy.append(part)  # no index, or one this code does not read
            else:
                found.append(index)
        if found:
            keys.append(np.concatenate([i[KEYS] for i in found]))
            for c in track:
                tracked[c].append(np.concatenate([i[f"track:{c}"] for i in found]))
    if legacy:
        logger.info("%d of %d committed parts of %s have no key index we read (committed by older code); reading their "
                    "column(s) %s instead", len(legacy), out.parts, store.uri(store.path(table)),
                    ", ".join([key, *track]))
    for part in legacy:
        data = store.read(store.path(table, part), [key, *track])
        keys.append(key_hashes(data.column(key).to_pylist()))
        for c in track:
            tracked[c].append(key_hashes(set(data.column(c).to_pylist())))
    out.read_parts, out.legacy_parts = len(parts), len(legacy)
    return keys, tracked


def _read_merged(store: TableStore, table: str, track: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The segments of the merged index; None when there is none or it does not fit ``track``."""
    path = store.path(INDEX_DIR, table, MERGED_FILE)
    try:
        with store.fs.open(path, "rb") as f:
            index = read_index(f)
    except FileNotFoundError:
        return None
    if index is None or not _fits(index, track):
        logger.warning("%s is not an index of %s hashes with segments %s; not used", store.uri(path), HASH_NAME,
                       _names(track))
        return None
    return index


def _names(track: Sequence[str]) -> list[str]:
    return [PARTS, KEYS, *(f"track:{c}" for c in track)]


def _fits(index: Mapping[str, np.ndarray], track: Sequence[str]) -> bool:
    return set(_names(track)) <= set(index)


def read_index(source: Any) -> dict[str, np.ndarray] | None:
    """The segments of an index file (a path or file object, see the module docstring): name -> uint64
    hashes, views of one array filled row group by row group. None when ``source`` is not an index of
    `HASH_NAME` hashes."""
    data = pq.ParquetFile(source, pre_buffer=False)  # not the whole file at once
    meta = data.schema_arrow.metadata or {}
    try:
        segments = json.loads(meta[b"gen1.segments"]) if meta.get(b"gen1.hash") == HASH_NAME.encode() else None
    except (KeyError, ValueError):
        segments = None
    if segments is None or sum(n for _, n in segments) != data.metadata.num_rows:
        return None
    hashes = np.empty(data.metadata.num_rows, dtype=np.uint64)
    at = 0
    for i in range(data.metadata.num_row_groups):
        group = data.read_row_group(i, columns=["hash"], use_threads=False).column(0).to_numpy()
        hashes[at:at + len(group)] = group
        at += len(group)
    out, at = {}, 0
    for name, n in segments:
        out[name], at = hashes[at:at + n], at + n
    return out


def write_index(sink: Any, segments: Mapping[str, np.ndarray]) -> None:
    """Write ``segments`` (name -> hashes, any order) as an index file to ``sink`` (a path or file object)."""
    arrays = {name: sorted_unique(h) for name, h in segments.items()}
    meta = {"gen1.table": "commit-index", "gen1.hash": HASH_NAME,
            "gen1.segments": json.dumps([[name, len(a)] for name, a in arrays.items()])}
    schema = pa.schema([pa.field("hash", pa.uint64(), nullable=False)], metadata=meta)
    with pq.ParquetWriter(sink, schema, compression=COMPRESSION, use_dictionary=False,
                          column_encoding={"hash": "DELTA_BINARY_PACKED"}) as writer:
        for a in arrays.values():
            if len(a):
                writer.write_table(pa.table({"hash": a}, schema=schema), row_group_size=ROW_GROUP)


def _sorted(chunks: list[np.ndarray]) -> np.ndarray:
    out = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)
    chunks.clear()  # the pieces go before the sort
    out.sort()  # in place: no second copy
    return sorted_unique(out)


def _write_merged(store: TableStore, table: str, parts: list[str], index: CommittedKeys) -> None:
    """Replace the merged index of ``table`` by one covering ``parts`` (written aside, then moved)."""
    tmp = store.path(INDEX_DIR, table, f".merged-{uuid.uuid4().hex}.tmp")
    store.fs.makedirs(store.path(INDEX_DIR, table), exist_ok=True)
    segments = {PARTS: key_hashes(parts), KEYS: index.keys.hashes(),
                **{f"track:{c}": s.hashes() for c, s in index.values.items()}}
    with store.fs.open(tmp, "wb") as f:
        write_index(f, segments)
    final = store.path(INDEX_DIR, table, MERGED_FILE)
    store.fs.mv(tmp, final)
    logger.info("wrote %s: %d keys of %d parts", store.uri(final), len(index.keys), len(parts))
