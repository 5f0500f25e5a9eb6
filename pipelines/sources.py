"""Sources: which videos a corpus holds, and which clips to sample from each.

A source ``SRC`` is either a directory/prefix at any fsspec location (``/data/videos``,
``s3://bucket/videos``), listed recursively and filtered by extension, a single video, or a *manifest*:
a CSV or Parquet file with a column of video URIs (relative entries are resolved against the manifest's
own directory).

URIs are normalised before they are hashed into clip ids (`gen1.video.clip_id`): local files become
absolute paths without ``file://``; remote objects keep their protocol (``s3://bucket/key``). The same
corpus therefore gets the same clip ids on every run, whatever the working directory.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from gen1.decoding import probe
from gen1.video import VideoInfo, clip_id, clip_starts, sample_indices, target_size
from pipelines.failures import ERROR_COLUMNS, mark_failed, with_error_columns
from pipelines.timeouts import call_with_timeout

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class ClipPlan:
    """One clip to sample: ``frame_indices`` of ``source_uri``, resized to ``width x height``."""

    clip_id: str
    source_uri: str
    start: int
    stride: int
    frame_indices: list[int] = field(hash=False)
    fps: float
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_uri(uri: str) -> str:
    """Local paths -> absolute paths (no ``file://``); other URIs keep their protocol."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(fs._strip_protocol(path))
    return fs.unstrip_protocol(path)


def is_manifest(uri: str) -> bool:
    return uri.split("?", 1)[0].lower().endswith(MANIFEST_EXTENSIONS)


def list_videos(
    src: str,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    manifest_column: str = "uri",
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Normalised URIs of the videos named by ``src`` (a directory/prefix, one video, or a manifest).

    Directories are listed recursively; a file matches when its name ends with one of ``extensions``
    (case-insensitive). The result is sorted (manifests keep their order) and free of duplicates.
    Raises FileNotFoundError when ``src`` does not exist.
    """
    if is_manifest(src):
        return read_manifest(src, manifest_column, storage_options)
    fs, path = fsspec.core.url_to_fs(src, **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"source {src!r} does not exist (expected a directory, a video or a manifest)")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if fs.isfile(path):
        found = [path]
    else:
        found = [p for p, info in fs.find(path, detail=True).items() if info.get("type") == "file"]
        found = sorted(p for p in found if p.lower().endswith(exts))
    uris = [normalize_uri(fs.unstrip_protocol(p)) for p in found]
    logger.info("%s: %d videos (extensions %s)", src, len(uris), ", ".join(exts))
    return _unique(uris, src)


def read_manifest_rows(
    uri: str, resolve: Sequence[str] = ("uri",), storage_options: Mapping[str, Any] | None = None,
    verbatim_urls: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The rows of a CSV or Parquet manifest, in file order, as dicts (empty strings read as None).

    The columns named in ``resolve`` hold URIs: stripped, relative ones resolved against the manifest's
    own directory, all normalised (`normalize_uri`), except URLs (``scheme://``) of the ``verbatim_urls``
    columns, kept as written. Rows whose first ``resolve`` column is empty are dropped. `ValueError` when
    that column is missing.
    """
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".csv"):
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    key = resolve[0]
    if key not in table.column_names:
        raise ValueError(f"manifest {uri!r}: expected a column {key!r}; found columns {table.column_names}")
    base = posixpath.dirname(fs.unstrip_protocol(path))
    rows = []
    for row in table.to_pylist():
        for col in resolve:
            entry = row.get(col)
            entry = str(entry).strip() if entry is not None else ""
            if entry and "://" in entry and col in verbatim_urls:
                row[col] = entry
                continue
            if entry and "://" not in entry and not os.path.isabs(entry):
                entry = posixpath.join(base, entry)
            row[col] = normalize_uri(entry) if entry else None
        if row[key] is not None:
            rows.append(row)
    return rows


def read_manifest(
    uri: str, column: str = "uri", storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Video URIs from column ``column`` of a CSV or Parquet manifest, in file order, duplicates dropped."""
    uris = [row[column] for row in read_manifest_rows(uri, (column,), storage_options)]
    logger.info("manifest %s: %d videos", uri, len(uris))
    return _unique(uris, uri)


def _unique(uris: list[str], src: str) -> list[str]:
    out = list(dict.fromkeys(uris))
    if len(out) != len(uris):
        logger.warning("%s: dropped %d duplicate video URIs", src, len(uris) - len(out))
    return out


def plan_clips(
    info: VideoInfo,
    frames: int,
    stride: int,
    clips_per_video: int | None = None,
    size: tuple[int, int] = (448, 256),
) -> list[ClipPlan]:
    """The clips of one probed video: non-overlapping windows of ``frames`` frames ``stride`` apart.

    ``clips_per_video`` picks that many windows evenly over the video (all when None). ``size`` is
    (w, h) for landscape sources, transposed for portrait ones (`gen1.video.target_size`). Raises
    `gen1.video.VideoDecodeError` when the video is too short for one clip.
    """
    starts = clip_starts(info.num_frames, frames, stride, clips_per_video)
    if not starts:
        sample_indices(info.num_frames, frames, stride, 0, uri=info.uri)  # raises "clip too short ..."
        raise AssertionError("unreachable: a video with no clip start must be too short")
    w, h = target_size(info.width, info.height, size)
    return [
        ClipPlan(
            clip_id=clip_id(info.uri, s, frames, stride),
            source_uri=info.uri,
            start=s,
            stride=stride,
            frame_indices=sample_indices(info.num_frames, frames, stride, s, uri=info.uri),
            fps=float(info.fps),
            width=w,
            height=h,
        )
        for s in starts
    ]


def plan_video(
    uri: str,
    frames: int,
    stride: int,
    clips_per_video: int | None = None,
    size: tuple[int, int] = (448, 256),
    storage_options: Mapping[str, Any] | None = None,
) -> list[ClipPlan]:
    """Probe ``uri`` (with fsspec's ``storage_options``) and plan its clips (`plan_clips`); raises
    `gen1.video.VideoDecodeError`."""
    return plan_clips(probe(uri, storage_options), frames, stride, clips_per_video, size)


# ------------------------------------------------------------------------------------------- the plan stage
# Rows of planned clips, as they enter the preprocess and edit pipelines (status and error columns:
# `pipelines.failures`).
PLAN_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source_uri", pa.string()),
        ("start", pa.int64()),  # -1 on a whole-video error row
        ("stride", pa.int64()),
        ("frame_indices", pa.list_(pa.int64())),
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("status", pa.string()),
        *[(c, pa.string()) for c in ERROR_COLUMNS],
    ]
)
PLAN_COLUMNS = tuple(PLAN_SCHEMA.names)


class PlanStage:
    """Videos -> clips: probe each ``uri`` (with the job's fsspec ``storage_options``) and pick its clips; a
    video that cannot be probed or is too short becomes one error row (stage ``plan``, ``start`` -1, the clip
    id of its start-0 clip).

    batch: ``{"uri": [...]}`` -> pyarrow Table of PLAN_SCHEMA.
    """

    def __init__(self, frames: int, stride: int, clips_per_video: int | None, size: tuple[int, int],
                 timeout_s: float | None = None, storage_options: Mapping[str, Any] | None = None):
        self.frames, self.stride, self.clips_per_video, self.size = frames, stride, clips_per_video, size
        self.timeout_s = timeout_s  # per probe (`pipelines.timeouts`); None: no limit
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pa.Table:
        uris = list(batch["uri"])
        out: list[dict[str, Any]] = []
        for uri in uris:
            try:
                plans = call_with_timeout(plan_video, self.timeout_s, uri, self.frames, self.stride,
                                          self.clips_per_video, self.size, self.storage_options,
                                          what=f"probe {uri}")
                out.extend(with_error_columns({**p.as_dict(), "num_frames": p.num_frames}) for p in plans)
            except Exception as e:
                out.append(self.error_row(uri, e))
        return pa.Table.from_pylist([{c: r[c] for c in PLAN_COLUMNS} for r in out], schema=PLAN_SCHEMA)

    def error_row(self, uri: str, exc: BaseException) -> dict[str, Any]:
        """The plan error row of video ``uri`` that failed with ``exc``."""
        row = {
            "clip_id": clip_id(uri, 0, self.frames, self.stride),
            "source_uri": uri, "start": -1, "stride": self.stride, "frame_indices": [],
            "fps": 0.0, "num_frames": self.frames, "width": 0, "height": 0,
        }
        return {c: v for c, v in mark_failed(with_error_columns(row), "plan", exc).items() if c in PLAN_COLUMNS}
