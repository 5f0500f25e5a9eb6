"""Failures are data: an exception about one clip becomes an error record instead of failing the job.

Stage batches carry a ``status`` column (``ok`` | ``error``) and four error columns (``error_stage``,
``error_type``, ``error_message``, ``error_traceback``; empty strings on healthy rows, so every column
keeps one Arrow type in every block). Later stages pass error rows through untouched; the writer turns
them into ``errors`` rows (`pipelines.schema.ERRORS_SCHEMA`).

Work that comes back from no attempt is recorded by the driver, by one of two rules:

- a pass that *finished* without an item lost it with its Ray worker or actor: every attempt of its block
  died (or raised) within the bounded retries (`pipelines.runtime.RetryConfig`), and Ray Data dropped the
  block (`pipelines.runtime.bounded_pass`). Its row is marked failed with `WorkerLost` (stage
  `LOST_STAGE`, or ``plan`` for a video lost while planning; ``error_type`` ``crash``), which counts toward
  quarantine like any failure of the item itself. Where that matters (preprocess), an item lost in a
  block it shared is first run again in a pass of its own, so only the item that fails alone is recorded;
- a pass that *broke* (an exception in the driver's stream) leaves what it did not return as
  `missing_record` rows of stage ``pipeline``, which do not count toward quarantine: the item may never
  have been tried.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines.schema import ERRORS_SCHEMA, SCHEMA_VERSION
from pipelines.timeouts import Retirement, call_with_timeout

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
LOST_STAGE = "worker"  # the stage of an item lost with its Ray worker or actor (the stage it died in is unknown)
ERROR_COLUMNS = ("error_stage", "error_type", "error_message", "error_traceback")
_MAX_TRACEBACK = 4000

Row = dict[str, Any]


def batch_rows(batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> list[Row]:
    """A stage batch (pyarrow Table, pandas DataFrame or a mapping of columns) as a list of row dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    df = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(dict(batch))
    return df.to_dict("records")


def stage_rows(batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> list[Row]:
    """`batch_rows` with ``status`` and the error columns set on every row (null ones read as a healthy
    row's, as they come back from a pass that added no error column)."""
    rows = batch_rows(batch)
    for row in rows:
        for col in ("status", *ERROR_COLUMNS):
            if row.get(col) is None:
                row.pop(col, None)
        with_error_columns(row)
    return rows


def healthy(row: Row) -> bool:
    return row.get("status", STATUS_OK) == STATUS_OK


def with_error_columns(row: Row) -> Row:
    """``row`` with ``status`` and the error columns filled in where missing (a healthy row)."""
    row.setdefault("status", STATUS_OK)
    for col in ERROR_COLUMNS:
        row.setdefault(col, "")
    return row


def error_type(exc: BaseException) -> str:
    """The ``error_type`` recorded for ``exc``: its class's ``error_type`` where it names a kind of failure
    (``"timeout"`` for a `StageTimeout`, ``"crash"`` for a `pipelines.child_worker.ChildCrashed`), else its
    class name."""
    return getattr(type(exc), "error_type", None) or type(exc).__name__


class WorkerLost(RuntimeError):
    """No attempt at ``what`` came back: the Ray worker or actor running it died (or its task raised) on
    every attempt its job's ``retries`` allow, and ``alone`` also in a pass of its own. ``error_type``
    ``crash``."""

    error_type = "crash"

    def __init__(self, what: str, alone: bool = False):
        self.what, self.alone = what, alone
        again = ", also when run again alone" if alone else ""
        super().__init__(f"{what}: lost with its Ray worker or actor on every attempt (the job's retries){again}; "
                         "a crash, an out-of-memory kill or its task raising (the Ray logs of the run say which)")

    def __reduce__(self):  # keep the fields across pickling (Ray)
        return (type(self), (self.what, self.alone))


def mark_failed(row: Row, stage: str, exc: BaseException) -> Row:
    """Turn ``row`` into an error of ``stage`` caused by ``exc`` (in place) and log it."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    row.update(
        status=STATUS_ERROR,
        error_stage=stage,
        error_type=error_type(exc),
        error_message=str(exc) or repr(exc),
        error_traceback=tb[-_MAX_TRACEBACK:],
    )
    logger.warning(
        "%s failed for clip %s of %s: %s: %s",
        stage, row.get("clip_id"), row.get("source_uri"), row["error_type"], row["error_message"],
    )
    return row


def apply_per_clip(
    rows: Sequence[Row],
    stage: str,
    batch_fn: Callable[[list[Any]], Sequence[Any]],
    item: Callable[[Row], Any],
    store: Callable[[Row, Any], None],
    timeout_s: float | None = None,
    retirement: Retirement | None = None,
) -> None:
    """Run ``batch_fn`` over the healthy ``rows`` at once; if that raises, retry clip by clip.

    ``item(row)`` builds one input, ``batch_fn(inputs) -> outputs`` (same length) and
    ``store(row, output)`` writes one result into its row. A clip whose own call (or ``item``) raises
    becomes an error row of ``stage``; the other clips of the batch are kept.

    ``timeout_s`` limits every ``batch_fn`` call (`pipelines.timeouts.call_with_timeout`): a batch call
    that hangs is retried clip by clip like one that raises, and a clip whose own call hangs becomes an
    error row with ``error_type`` ``"timeout"``. A batch of n clips may thus take up to (n + 1) limits.
    A call abandoned that way retires ``retirement`` (the stage's `pipelines.timeouts.Retirement`): the
    clips of this batch still get their own calls, and the stage's next batch runs in a fresh process.
    """

    def call(inputs: list[Any]) -> Sequence[Any]:
        return call_with_timeout(batch_fn, timeout_s, inputs, what=f"{stage} of {len(inputs)} clips",
                                 retirement=retirement)

    todo: list[tuple[Row, Any]] = []
    for row in rows:
        with_error_columns(row)
        if not healthy(row):
            continue
        try:
            todo.append((row, item(row)))
        except Exception as e:  # a malformed row fails alone
            mark_failed(row, stage, e)
    if not todo:
        return
    try:
        outputs = call([x for _, x in todo])
        if len(outputs) != len(todo):
            raise RuntimeError(f"{stage}: expected {len(todo)} outputs for the batch; got {len(outputs)}")
        for (row, _), out in zip(todo, outputs, strict=True):
            store(row, out)
        return
    except Exception as e:
        if len(todo) == 1:
            mark_failed(todo[0][0], stage, e)
            return
        logger.warning(
            "%s: a batch of %d clips failed (%s: %s); retrying clip by clip", stage, len(todo), type(e).__name__, e
        )
    for row, x in todo:
        try:
            (out,) = call([x])
            store(row, out)
        except Exception as e:
            mark_failed(row, stage, e)


def error_record(row: Row) -> Row:
    """An error row of a stage batch -> an error record (a row of `error_table`)."""
    start = row.get("start")
    return {
        "clip_id": row["clip_id"],
        "uri": row["source_uri"],
        "start": None if start is None or int(start) < 0 else int(start),
        "stage": row["error_stage"],
        "error_type": row["error_type"],
        "message": row["error_message"],
        "traceback": row.get("error_traceback") or None,
    }


def missing_record(clip_id: str, uri: str, start: int | None, message: str, error: str | None = None) -> Row:
    """The error record of work the pipeline lost: stage ``pipeline``, error type the exception that stopped
    the stream (``error``, "Type: message"), else ``MissingOutput``."""
    return {"clip_id": clip_id, "uri": uri, "start": start, "stage": "pipeline",
            "error_type": error.split(":", 1)[0] if error else "MissingOutput", "message": message,
            "traceback": None}


def error_table(records: Sequence[Row], run_id: str) -> pa.Table:
    """Error records -> an ERRORS_SCHEMA table.

    A record needs ``clip_id``, ``uri``, ``stage``, ``error_type``, ``message``; ``start`` and
    ``traceback`` may be None.
    """
    now = dt.datetime.now(dt.UTC)
    cols: dict[str, list[Any]] = {f.name: [] for f in ERRORS_SCHEMA}
    for r in records:
        cols["clip_id"].append(str(r["clip_id"]))
        cols["uri"].append(str(r["uri"]))
        cols["start"].append(r.get("start"))
        cols["stage"].append(str(r["stage"]))
        cols["error_type"].append(str(r["error_type"]))
        cols["message"].append(str(r["message"]))
        cols["traceback"].append(r.get("traceback") or None)
        cols["run_id"].append(run_id)
        cols["timestamp"].append(now)
        cols["schema_version"].append(SCHEMA_VERSION)
    return pa.Table.from_pydict(cols, schema=ERRORS_SCHEMA)
