"""The committed-key index: `KeySet` (hashes, levels), the per-part and merged index files, and a
`Committer` that lists DST once and then commits without listing or reading other parts."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import commit_index
from pipelines.commit_index import INDEX_DIR, MERGED_FILE, index_path, load_committed, read_index
from pipelines.commits import Committer
from pipelines.keyset import KeySet, key_hashes
from pipelines.schema import SHARDS_DIR, TableStore


def test_key_hashes_are_blake2b_64_little_endian():
    # hashlib.blake2b(b"abc", digest_size=8).digest() read as a little-endian integer: fixed forever,
    # since hashes written to DST by one run are read by the next
    assert key_hashes(["abc"]).tolist() == [6455300059550759896]
    assert key_hashes([]).dtype == np.uint64 and len(key_hashes([])) == 0


def test_keyset_adds_in_few_levels_and_answers_membership():
    keys = KeySet()
    for i in range(1000):
        assert keys.add([f"id-{i}-{j}" for j in range(10)]) == 10
    assert keys.add(["id-0-0", "id-999-9", "new", "new"]) == 1  # repeats and known keys are not added again
    assert len(keys) == 10_001 and keys.nbytes == 8 * 10_001
    assert keys.levels <= int(np.log2(1001)) + 2  # each level at least twice the next
    probe = [f"id-{i}-3" for i in range(0, 1000, 7)] + ["absent-1", "absent-2"]
    assert keys.contains(probe).tolist() == [True] * 143 + [False, False]
    assert "id-5-5" in keys and "absent" not in keys and 5 not in keys
    hashes = keys.hashes()
    assert keys.levels == 1 and len(hashes) == 10_001 and bool(np.all(hashes[1:] > hashes[:-1]))
    assert KeySet.of(["new", "x", "y"]).count_not_in(keys) == 2


def _part(ids: list[str], uris: list[str]) -> pa.Table:
    return pa.table({"clip_id": ids, "source_uri": uris, "payload": list(range(len(ids)))})


def _commit(committer: Committer, ids: list[str], uris: list[str]) -> int:
    return committer.commit_table(_part(ids, uris), ids)


def test_committer_lists_once_then_commits_without_listing(tmp_path, monkeypatch):
    store = TableStore(str(tmp_path / "dst"))
    first = Committer(store, SHARDS_DIR, "run1", track=("source_uri",))
    for i in range(3):
        assert _commit(first, [f"c{i}a", f"c{i}b"], [f"v{i}", f"v{i}"]) == 2
    part = store.committed(SHARDS_DIR)[0].rsplit("/", 1)[-1]
    index = read_index(index_path(store, SHARDS_DIR, part))
    assert list(index) == ["parts", "keys", "track:source_uri"]
    assert index["parts"].tolist() == key_hashes([part]).tolist()
    assert index["keys"].tolist() == sorted(key_hashes(["c0a", "c0b"]).tolist())
    assert index["track:source_uri"].tolist() == key_hashes(["v0"]).tolist()
    assert pq.ParquetFile(index_path(store, SHARDS_DIR, part)).schema_arrow.names == ["hash"]  # flat: one column

    listings = []
    real = store.committed
    monkeypatch.setattr(store, "committed", lambda table: listings.append(table) or real(table))
    second = Committer(store, SHARDS_DIR, "run2", track=("source_uri",))
    assert second.committed.contains(["c0a", "c2b", "c9"]).tolist() == [True, True, False]
    assert "v1" in second.values["source_uri"] and listings == [SHARDS_DIR]

    def no_listing(*args, **kwargs):
        raise AssertionError("a commit listed DST")

    for name in ("glob", "ls", "find", "walk"):
        monkeypatch.setattr(store.fs, name, no_listing)
    assert _commit(second, ["c9", "c0a"], ["v9", "v0"]) == 1  # c0a dropped: committed by run1
    assert _commit(second, ["c9", "c10"], ["v9", "v10"]) == 1  # c9 dropped: committed earlier in this run
    assert second.dropped_duplicates == 2 and listings == [SHARDS_DIR]
    assert len(second.written) == 2 and second.written.contains(["c9", "c10", "c0a"]).tolist() == [True, True, False]
    assert second.values["source_uri"].contains(["v9", "v10"]).all()
    monkeypatch.undo()
    ids = [i for p in store.committed(SHARDS_DIR) for i in store.read(p, ["clip_id"]).column("clip_id").to_pylist()]
    assert sorted(ids) == sorted(["c0a", "c0b", "c1a", "c1b", "c2a", "c2b", "c9", "c10"])


def test_start_up_reads_the_merged_index_and_the_key_columns_of_parts_without_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(commit_index, "MERGE_AFTER_PARTS", 3)
    store = TableStore(str(tmp_path / "dst"))
    run1 = Committer(store, SHARDS_DIR, "run1", track=("source_uri",))
    for i in range(3):
        _commit(run1, [f"c{i}"], [f"v{i}"])
    # a shard committed by code older than the index: no index file
    legacy = store.write_tmp(SHARDS_DIR, _part(["old1", "old2"], ["vold", "vold"]), "run0")
    store.commit(SHARDS_DIR, legacy, "run0-00001-00000000")
    merged = store.path(INDEX_DIR, SHARDS_DIR, MERGED_FILE)
    assert not store.fs.exists(merged)  # run1 found nothing to merge at its start

    with caplog.at_level(logging.INFO, logger="pipelines.commit_index"):
        cold = load_committed(store, SHARDS_DIR, "clip_id", ("source_uri",))
    assert (cold.parts, cold.read_parts, cold.legacy_parts) == (4, 4, 1)
    assert "1 of 4 committed parts" in caplog.text and "no key index we read" in caplog.text
    assert store.fs.exists(merged)  # 4 parts read one by one >= MERGE_AFTER_PARTS: merged for the next start
    expected = ["c0", "c1", "c2", "old1", "old2"]
    assert len(cold.keys) == 5 and cold.keys.contains(expected).all()
    assert cold.values["source_uri"].contains(["v0", "v1", "v2", "vold"]).all()

    warm = load_committed(store, SHARDS_DIR, "clip_id", ("source_uri",))
    assert (warm.parts, warm.read_parts, warm.legacy_parts) == (4, 0, 0)
    assert np.array_equal(warm.keys.hashes(), cold.keys.hashes())
    assert np.array_equal(warm.values["source_uri"].hashes(), cold.values["source_uri"].hashes())

    _commit(Committer(store, SHARDS_DIR, "run2", track=("source_uri",)), ["c3"], ["v3"])
    after = load_committed(store, SHARDS_DIR, "clip_id", ("source_uri",))
    assert (after.parts, after.read_parts, len(after.keys)) == (5, 1, 6)  # the merged index + one part's

    store.fs.rm(store.path(SHARDS_DIR, store.committed(SHARDS_DIR)[0].rsplit("/", 1)[-1]))  # deleted by hand
    with caplog.at_level(logging.WARNING, logger="pipelines.commit_index"):
        rebuilt = load_committed(store, SHARDS_DIR, "clip_id", ("source_uri",), merge=False)
    assert "no longer committed" in caplog.text
    assert (rebuilt.parts, rebuilt.read_parts, rebuilt.legacy_parts) == (4, 4, 0)
    assert len(rebuilt.keys) == 4 and not rebuilt.keys.contains(["old1", "old2"]).any()


def test_a_keyless_committer_has_no_index(tmp_path):
    store = TableStore(str(tmp_path / "dst"))
    errors = Committer(store, "errors", "run1", key=None)
    assert errors.commit_table(pa.table({"x": [1, 2]}), ["a", "a"]) == 2
    assert errors.written.contains(["a"]).tolist() == [True] and not store.fs.exists(store.path(INDEX_DIR))
    with pytest.raises(ValueError, match="has no key"):
        errors.committed  # noqa: B018
