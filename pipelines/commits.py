"""The one commit protocol of every job: a part is written whole under ``_tmp/``, then moved into place,
and a key (a clip id, an edit key) is committed once.

A table under a destination ``DST`` is a folder of committed ``part-*.parquet`` files
(`pipelines.schema.TableStore`): readers only ever see whole parts. Only the driver commits. `Committer`
keeps the keys already committed (listed from DST, and those this run committed) and drops a part's rows
whose key is already there, also when another run committed them meanwhile, so DST never holds a key
twice. A committer given the run's lease of DST (`pipelines.lease`) checks it before each commit, so a
driver that lost the lease to another commits nothing more. Error parts (key ``None``) are committed as
they are. `RowBuffer` gathers rows that the driver
itself builds (edit manifest rows, error records) into parts of ``every`` rows, or fewer once the oldest
has waited ``max_wait_s``, so a kill redoes at most that much work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.failures import error_table
from pipelines.schema import TableStore

if TYPE_CHECKING:
    from pipelines.lease import Lease

logger = logging.getLogger(__name__)


class Committer:
    """The single committer of one table of one run.

    ``key``: the column that identifies a row (None: no deduplication, e.g. errors). ``track``: further
    columns whose committed values are kept (``values[col]``), e.g. the source URIs that have a clip.
    ``committed``: keys in DST (any run) as of the last `refresh` and this run's commits; ``written``: keys
    committed by this run (for a keyless table: the keys the caller named). ``lease``: the run's lease of DST,
    checked (`Lease.check`) before each part is moved into place.
    """

    def __init__(self, store: TableStore, table: str, run_id: str, key: str | None = "clip_id",
                 track: Sequence[str] = (), lease: Lease | None = None):
        self.store, self.table, self.run_id, self.key, self.lease = store, table, run_id, key, lease
        self.track = tuple(track)
        self.seen: set[str] = set()  # committed part paths already read or written
        self.committed: set[str] = set()
        self.values: dict[str, set[Any]] = {c: set() for c in self.track}
        self.written: set[str] = set()
        self.rows = 0  # rows committed by this run
        self.parts = 0  # parts committed by this run
        self.dropped_duplicates = 0

    def refresh(self) -> set[str]:
        """Re-list the committed parts (reading only the key columns of parts not seen yet); returns
        every committed key."""
        if self.key is None:
            return self.committed
        for path in self.store.committed(self.table):
            if path not in self.seen:
                part = self.store.read(path, [self.key, *self.track])
                keys = part.column(self.key).to_pylist()
                self.seen.add(path)
                self.committed.update(keys)
                for col in self.track:
                    self.values[col].update(part.column(col).to_pylist())
        return self.committed

    def _name(self) -> str:
        self.parts += 1
        return f"{self.run_id}-{self.parts:05d}-{uuid.uuid4().hex[:8]}"

    def commit_file(self, tmp_path: str, keys: Sequence[str]) -> int:
        """Commit the part at ``tmp_path`` (under ``_tmp/``) whose rows have ``keys``, minus rows whose key is
        already committed; returns the number of rows committed."""
        keys = [str(k) for k in keys]
        if self.key is not None:
            self.refresh()
            dup = set(keys) & self.committed
            if dup:
                self.dropped_duplicates += len(dup)
                logger.warning("%d rows of %s are already committed; dropping them", len(dup), tmp_path)
                if len(dup) == len(set(keys)):
                    self.store.fs.rm(tmp_path)
                    return 0
                data = self.store.read(tmp_path)
                keep = [k not in dup for k in data.column(self.key).to_pylist()]
                self.store.fs.rm(tmp_path)
                tmp_path = self.store.write_tmp(self.table, data.filter(pa.array(keep)), self.run_id)
                keys = [k for k in keys if k not in dup]
        if self.lease is not None:
            self.lease.check()
        final = self.store.commit(self.table, tmp_path, self._name())
        self.seen.add(final)
        if self.key is not None:
            self.committed.update(keys)
        self.written.update(keys)
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
