"""Quarantine: inputs that failed on two consecutive runs are skipped until asked for again.

An *input* is a clip (its clip id) or, when it failed before any clip could be planned (stage ``plan``:
unreadable, corrupt, too short), a whole video (its source URI). Its failures are the rows of
``DST/errors`` about it; every row carries the ``run_id`` of the run that wrote it.

An input is quarantined when at least `QUARANTINE_AFTER` distinct runs recorded an error for it and it
has not succeeded since: a clip is not committed, a video has no committed clip. Since every run over
DST retries each input that is neither committed nor quarantined, this is the same as "its last two
attempts failed". Rows of stage ``pipeline`` (the stream itself broke; the input may never have been
tried) do not count; rows of a clip lost with its Ray worker or actor on every attempt, also when run
alone (stage ``worker``, error_type ``crash``: `pipelines.failures.WorkerLost`), count like any other.

The list is recomputed from ``errors`` and ``shards`` at the start of every run (nothing else is state)
and written, for people and tools, to ``DST/quarantine/quarantine.parquet`` (`QUARANTINE_SCHEMA`) at the
end of every run. ``retry_quarantined`` / ``--retry-quarantined`` processes quarantined inputs again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.keyset import KeySet
from pipelines.schema import COMPRESSION, ERRORS_DIR, ERRORS_SCHEMA, TableStore

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
QUARANTINE_FILE = "quarantine.parquet"
QUARANTINE_AFTER = 2  # runs with an error for the same input
KIND_CLIP, KIND_VIDEO = "clip", "video"
NOT_COUNTED_STAGES = frozenset({"pipeline"})

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # clip | video
        pa.field("clip_id", pa.string(), nullable=False),  # for a video: the id of its start-0 clip
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # of the latest failure
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("failed_runs", pa.list_(pa.string()), nullable=False),  # oldest first
        pa.field("last_failed", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"gen1.table": "preprocess-quarantine"},
)

_ERROR_COLUMNS = ("clip_id", "uri", "stage", "error_type", "message", "run_id", "timestamp")


@dataclass
class Quarantine:
    """Quarantined inputs: clip id -> entry, video URI -> entry (entries are QUARANTINE_SCHEMA rows)."""

    clips: dict[str, dict[str, Any]] = field(default_factory=dict)
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clips) + len(self.videos)

    def table(self) -> pa.Table:
        rows = sorted([*self.videos.values(), *self.clips.values()], key=lambda r: (r["kind"], r["uri"], r["clip_id"]))
        return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def find_quarantined(errors: pa.Table, committed_ids: KeySet, committed_uris: KeySet,
                     after: int = QUARANTINE_AFTER) -> Quarantine:
    """The inputs of ``errors`` (ERRORS_SCHEMA rows) that failed in ``after`` or more runs and have not
    succeeded since (see the module docstring): ``committed_ids`` and ``committed_uris`` are the clip ids and
    the source URIs that DST/shards has committed."""
    history: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in errors.select(list(_ERROR_COLUMNS)).to_pylist():
        if row["stage"] in NOT_COUNTED_STAGES:
            continue
        key = (KIND_VIDEO, row["uri"]) if row["stage"] == "plan" else (KIND_CLIP, row["clip_id"])
        history.setdefault(key, []).append(row)
    inputs = list(history)
    done = np.where([kind == KIND_CLIP for kind, _ in inputs],
                    committed_ids.contains([key for _, key in inputs]),
                    committed_uris.contains([key for _, key in inputs]))
    out = Quarantine()
    for (kind, key), succeeded in zip(inputs, done, strict=True):
        if succeeded:
            continue
        rows = history[(kind, key)]
        rows.sort(key=lambda r: r["timestamp"])
        runs = list(dict.fromkeys(r["run_id"] for r in rows))
        if len(runs) < after:
            continue
        last = rows[-1]
        entry = {"kind": kind, "clip_id": last["clip_id"], "uri": last["uri"], "stage": last["stage"],
                 "error_type": last["error_type"], "message": last["message"], "failed_runs": runs,
                 "last_failed": last["timestamp"]}
        (out.videos if kind == KIND_VIDEO else out.clips)[key] = entry
    return out


def load_quarantine(store: TableStore, committed_ids: KeySet, committed_uris: KeySet) -> Quarantine:
    """`find_quarantined` over the committed errors of ``store``."""
    errors = store.read_all(ERRORS_DIR, ERRORS_SCHEMA, list(_ERROR_COLUMNS))
    return find_quarantined(errors, committed_ids, committed_uris)


def write_quarantine(store: TableStore, quarantine: Quarantine) -> str:
    """Replace ``DST/quarantine/quarantine.parquet`` with ``quarantine`` (written aside, then moved)."""
    final = store.path(QUARANTINE_DIR, QUARANTINE_FILE)
    tmp = store.path(QUARANTINE_DIR, f".{uuid.uuid4().hex}.tmp")
    store.fs.makedirs(store.path(QUARANTINE_DIR), exist_ok=True)
    with store.fs.open(tmp, "wb") as f:
        pq.write_table(quarantine.table(), f, compression=COMPRESSION)
    store.fs.mv(tmp, final)
    return final


def read_quarantine(dst: str, storage_options=None) -> pa.Table:
    """The quarantine list of the last run over ``dst`` (an empty QUARANTINE_SCHEMA table if none)."""
    store = TableStore(dst, storage_options)
    path = store.path(QUARANTINE_DIR, QUARANTINE_FILE)
    if not store.fs.exists(path):
        return QUARANTINE_SCHEMA.empty_table()
    with store.fs.open(path, "rb") as f:
        return pq.read_table(f)
