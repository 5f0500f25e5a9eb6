"""The one commit protocol of every job: a part is written whole under ``_tmp/``, then moved into place,
and a key (a clip id, an edit key) is committed once.

A table under a destination ``DST`` is a folder of committed ``part-*.parquet`` files
(`pipelines.schema.TableStore`): readers only ever see whole parts. Only the driver commits, and only the
driver holding DST's lease (`pipelines.lease`): a committer given the run's lease checks it before each
commit, so a driver that lost the lease to another commits nothing more. `Committer` of a keyed table lists
what is committed once, at its first use, from the table's key index (`pipelines.commit_index`: the hashes
of every part's keys, merged, read instead of the parts); afterwards only this run's own commits change what
is committed, so a commit costs the same however much DST holds: no listing, no read of other parts. Rows
whose key is already committed (by an earlier run, or earlier in this run) are dropped, so DST never holds
a key twice. Each part of a keyed table is committed with its index: the index is written first, then the
part is moved into place. Error parts (key ``None``) are committed as they are, without an index.
`RowBuffer` gathers rows that the driver itself builds (edit manifest rows, error records) into parts of
``every`` rows, or fewer once the oldest has waited ``max_wait_s``, so a kill redoes at most that much work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.commit_index import CommittedKeys, load_committed, write_part_index
from pipelines.failures import error_table
from pipelines.keyset import KeySet, key_hashes
from pipelines.schema import PART_PREFIX, TableStore

if TYPE_CHECKING:
    from pipelines.lease import Lease

logger = logging.getLogger(__name__)


class Committer:
    """The single committer of one table of one run.

    ``key``: the column that identifies a row (None: no deduplication and no index, e.g. errors).
    ``track``: further columns whose committed values are kept (``values[col]``), e.g. the source URIs that
    have a clip. ``committed``: the keys in DST when first asked (any run) plus this run's commits;
    ``written``: the keys committed by this run (for a keyless table: the keys the caller named); all three
    are `KeySet`s (hashes, not strings). ``lease``: the run's lease of DST, checked (`Lease.check`) before
    each part is moved into place.
    """

    def __init__(self, store: TableStore, table: str, run_id: str, key: str | None = "clip_id",
                 track: Sequence[str] = (), lease: Lease | None = None):
        self.store, self.table, self.run_id, self.key, self.lease = store, table, run_id, key, lease
        self.track = tuple(track)
        self._index: CommittedKeys | None = None  # listed at first use (under the lease)
        self.written = KeySet()
        self.rows = 0  # rows committed by this run
        self.parts = 0  # parts committed by this run
        self.dropped_duplicates = 0

    @property
    def index(self) -> CommittedKeys:
        """The table's committed keys and tracked values, loaded at first use (with the counts of what
        start-up read), plus this run's commits since."""
        if self.key is None:
            raise ValueError(f"table {self.table!r} has no key: nothing to look up")
        if self._index is None:
            t0 = time.monotonic()
            self._index = load_committed(self.store, self.table, self.key, self.track)
            logger.info("%s: %d keys committed in %d parts (%d read one by one, %d without an index) in %.1fs",
                        self.store.uri(self.store.path(self.table)), len(self._index.keys), self._index.parts,
                        self._index.read_parts, self._index.legacy_parts, time.monotonic() - t0)
        return self._index

    @property
    def committed(self) -> KeySet:
        """Every committed key: DST's as listed at first use, and this run's commits since."""
        return self.index.keys

    @property
    def values(self) -> dict[str, KeySet]:
        """Per tracked column, its committed values (as `committed`)."""
        return self.index.values

    def _name(self) -> str:
        self.parts += 1
        return f"{self.run_id}-{self.parts:05d}-{uuid.uuid4().hex[:8]}"

    def commit_file(self, tmp_path: str, keys: Sequence[str]) -> int:
        """Commit the part at ``tmp_path`` (under ``_tmp/``) whose rows have ``keys``, minus rows whose key is
        already committed; returns the number of rows committed."""
        keys = [str(k) for k in keys]
        hashes = key_hashes(keys)
        tracked: dict[str, np.ndarray] = {}
        if self.key is not None:
            dup = self.committed.contains_hashes(hashes)
            data = None
            if dup.any():
                n = len(np.unique(hashes[dup]))
                self.dropped_duplicates += n
                logger.warning("%d rows of %s are already committed; dropping them", n, tmp_path)
                if dup.all():
                    self.store.fs.rm(tmp_path)
                    return 0
                data = self.store.read(tmp_path)
                keep = ~self.committed.contains(data.column(self.key).to_pylist())
                self.store.fs.rm(tmp_path)
                data = data.filter(pa.array(keep))
                tmp_path = self.store.write_tmp(self.table, data, self.run_id)
                keys, hashes = [k for k, d in zip(keys, dup, strict=True) if not d], hashes[~dup]
            if self.track:
                data = data if data is not None else self.store.read(tmp_path, self.track)
                tracked = {c: key_hashes(set(data.column(c).to_pylist())) for c in self.track}
        if self.lease is not None:
            self.lease.check()
        name = self._name()
        if self.key is not None:
            write_part_index(self.store, self.table, f"{PART_PREFIX}{name}.parquet", hashes, tracked)
        final = self.store.commit(self.table, tmp_path, name)
        if self.key is not None:
            self.committed.add_hashes(hashes)
            for c, h in tracked.items():
                self.values[c].add_hashes(h)
        self.written.add_hashes(hashes)
        self.rows += len(keys)
        logger.info("committed %s (%d rows)", self.store.uri(final), len(keys))
        return len(keys)

    def commit_table(self, data: pa.Table, keys: Sequence[str]) -> int:
        """Write ``data`` (rows with ``keys``) under ``_tmp/`` and commit it."""
        if data.num_rows == 0:
            return 0
        return self.commit_file(self.store.write_tmp(self.table, data, self.run_id), keys)

    def commit_errors(self, records: Sequence[dict[str, Any]]) -> int:
        """Commit error records (`pipelines.failures.error_table` rows); their clip ids count as written."""
        if not records:
            return 0
        return self.commit_table(error_table(list(records), self.run_id), [r["clip_id"] for r in records])

    def remove_tmp(self) -> None:
        """Remove this run's ``_tmp/`` leftovers of the table."""
        self.store.remove_tmp(self.table, self.run_id)


class RowBuffer:
    """Rows pending a commit: ``commit(rows)`` runs once ``every`` rows are pending or the oldest has waited
    ``max_wait_s``, and on `flush`."""

    def __init__(self, commit: Callable[[list[dict[str, Any]]], Any], every: int, max_wait_s: float = 60.0):
        self.commit, self.every, self.max_wait_s = commit, every, max_wait_s
        self.pending: list[dict[str, Any]] = []
        self.since = 0.0  # when the oldest pending row arrived

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.pending.extend(rows)
        if len(self.pending) >= self.every or time.monotonic() - self.since >= self.max_wait_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            rows, self.pending = self.pending, []
            self.commit(rows)
