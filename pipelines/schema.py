"""The tables the pipelines write: their pyarrow schemas, where they live, how to read them back.

The edit pipeline's manifest and prompts tables (`MANIFEST_SCHEMA`, `PROMPTS_SCHEMA`) are at the end;
their layout is in `pipelines.edit`. The preprocess layout under a destination ``DST`` (any fsspec URI)::

    DST/shards/part-<run>-<n>-<uuid>.parquet   committed feature shards, one row per clip (SHARD_SCHEMA)
    DST/shards/_tmp/<run_id>/<uuid>.parquet    shards being written; never read as data
    DST/errors/part-<run>-<n>-<uuid>.parquet   committed error rows (ERRORS_SCHEMA)
    DST/errors/_tmp/<run_id>/<uuid>.parquet
    DST/_index/shards/part-<run>-<n>-<uuid>.parquet  the clip ids (hashed) of that shard (`pipelines.commit_index`)
    DST/_index/shards/merged.parquet           the clip ids of many shards at once, read at start
    DST/runs/<run_id>.json                     config and summary of each run
    DST/_lease/lease-<generation>.json         the driver writing into DST now (`pipelines.lease`)

A file is *committed* when it has its final ``part-*.parquet`` name: it is written under ``_tmp/`` first
and then moved (a rename locally, a copy of one object on S3), so a reader never sees a half-written
shard. Arrays are stored as little-endian C-order bytes with their shape beside them; the ``row_*``
helpers turn a row back into numpy arrays.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
RUNS_DIR = "runs"
TMP_DIR = "_tmp"
PART_PREFIX = "part-"
COMPRESSION = "zstd"

_INT_LIST = pa.list_(pa.int32())

SHARD_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # gen1.video.clip_id(source_uri, start, num_frames, stride)
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=False),  # first source frame
        pa.field("stride", pa.int32(), nullable=False),  # source frames between sampled frames
        pa.field("frame_indices", _INT_LIST, nullable=False),  # source frame index of every sampled frame
        pa.field("fps", pa.float64(), nullable=False),  # source frame rate
        pa.field("num_frames", pa.int32(), nullable=False),  # f
        pa.field("height", pa.int32(), nullable=False),  # h of the stored frames / depth
        pa.field("width", pa.int32(), nullable=False),  # w
        pa.field("depth", pa.binary(), nullable=False),  # float16 (f, h, w): relative inverse depth in [-1, 1]
        pa.field("depth_shape", _INT_LIST, nullable=False),
        pa.field("clip_embedding", pa.binary(), nullable=False),  # float16 (f, clip_dim), L2-normalised
        pa.field("clip_dim", pa.int32(), nullable=False),
        pa.field("frames", pa.list_(pa.binary()), nullable=True),  # one entry per frame, see frames_format
        pa.field("frames_format", pa.string(), nullable=True),  # "jpeg" | "raw" (uint8 (h, w, 3) RGB)
        pa.field("latents", pa.binary(), nullable=True),  # float16 (c, f, h/8, w/8), scaled VAE posterior mean
        pa.field("latents_shape", _INT_LIST, nullable=True),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("depth_model", pa.string(), nullable=False),  # weight specs used
        pa.field("clip_model", pa.string(), nullable=False),
        pa.field("vae_model", pa.string(), nullable=True),  # set when latents were computed
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
    ],
    metadata={"gen1.table": "preprocess-shard", "gen1.schema_version": str(SCHEMA_VERSION)},
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # for a whole-video failure: the id of its start-0 clip
        pa.field("uri", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=True),  # null for a whole-video failure
        pa.field("stage", pa.string(), nullable=False),  # plan | decode | depth | clip | latents | write | pipeline
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("traceback", pa.string(), nullable=True),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
    ],
    metadata={"gen1.table": "preprocess-errors", "gen1.schema_version": str(SCHEMA_VERSION)},
)


# ------------------------------------------------------------------------------------- edit tables
# What `pipelines.edit` writes under its DST (see that module for the layout and commit order); the
# manifest is also what evaluation reads (`gen1 eval --edits DST`), so metrics need no second decode.

EDIT_SCHEMA_VERSION = 2  # 2: the editor columns (gen1.editors); rows of version 1 read back with editor null (gen1)
MANIFEST_DIR = "manifest"
PROMPTS_DIR = "prompts"
OUTPUTS_DIR = "outputs"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("edit_key", pa.string(), nullable=False),  # `edit_key(...)`: what a rerun skips
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=False),
        pa.field("stride", pa.int32(), nullable=False),
        pa.field("frame_indices", _INT_LIST, nullable=False),  # source frames edited
        pa.field("num_frames", pa.int32(), nullable=False),  # f of the output
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("fps", pa.float64(), nullable=False),  # of the output (source fps / stride)
        pa.field("caption", pa.string(), nullable=True),  # the caption the prompt was written from
        pa.field("prompt", pa.string(), nullable=True),  # the text prompt; null for image content
        pa.field("prompt_index", pa.int32(), nullable=False),  # position among the clip's prompts
        pa.field("prompt_source", pa.string(), nullable=False),  # user | clip | template | chat
        pa.field("prompt_tag", pa.string(), nullable=True),  # e.g. a TGVE prompt kind
        pa.field("content_kind", pa.string(), nullable=False),  # text | image
        pa.field("image_uri", pa.string(), nullable=True),  # the reference image of image content
        pa.field("masked", pa.bool_(), nullable=False),
        pa.field(
            "mask", pa.string(), nullable=True
        ),  # the mask's URI, or a dataset sequence's object selection
        # the editor (gen1.editors) and its weight specs (JSON role -> spec); null in rows of schema version 1: gen1
        pa.field("editor", pa.string(), nullable=True),
        pa.field("editor_models", pa.string(), nullable=True),
        # settings; null where the row's editor does not take them (gen1.editors.base.Editor.takes)
        pa.field("t_s", pa.int32(), nullable=True),  # structure strength 0..7 (gen1)
        pa.field("w", pa.float64(), nullable=False),  # content guidance
        pa.field("w_t", pa.float64(), nullable=True),  # temporal guidance (eq. 8) (gen1)
        pa.field("strength", pa.float64(), nullable=True),  # SDEdit strength (sd-depth, animatediff-depth)
        pa.field("controlnet_scale", pa.float64(), nullable=True),  # depth conditioning (animatediff-depth, wan-vace)
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("sampler", pa.string(), nullable=True),  # gen1's sampler; the diffusers editors keep their scheduler
        pa.field("output_uri", pa.string(), nullable=False),
        pa.field("preview_uri", pa.string(), nullable=True),
        # metrics (gen1.metrics) of the output, with the models' own CLIP and depth estimator
        pa.field("frame_consistency", pa.float64(), nullable=True),  # consecutive frames (paper)
        pa.field("frame_consistency_all_pairs", pa.float64(), nullable=True),  # all pairs (TGVE)
        pa.field("prompt_consistency", pa.float64(), nullable=True),  # vs the prompt (or reference image)
        pa.field("flow_warp_error", pa.float64(), nullable=True),  # Fig. 4, [0, 1] intensities
        pa.field("depth_fidelity", pa.float64(), nullable=True),  # Pearson(input depth, output depth)
        pa.field("models", pa.string(), nullable=False),  # preset name
        pa.field("vae_model", pa.string(), nullable=True),  # weight specs of gen1's models (null for other editors)
        pa.field("unet_model", pa.string(), nullable=True),
        pa.field("clip_model", pa.string(), nullable=False),  # CLIP and depth: every editor's (metrics, structure)
        pa.field("depth_model", pa.string(), nullable=False),
        pa.field("prior_model", pa.string(), nullable=True),
        pa.field("caption_model", pa.string(), nullable=True),  # set when the caption came from BLIP
        pa.field("tiny_models", pa.bool_(), nullable=False),  # outputs of tiny random models (any): not results
        pa.field("seconds", pa.float64(), nullable=False),  # sampling (edit_video)
        pa.field("total_seconds", pa.float64(), nullable=False),  # decode + edit + metrics + write
        pa.field("unet_forwards", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
    ],
    metadata={"gen1.table": "edit-manifest", "gen1.schema_version": str(EDIT_SCHEMA_VERSION)},
)

PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("caption_model", pa.string(), nullable=True),  # null when the caption was given
        pa.field("prompt_index", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("writer", pa.string(), nullable=False),  # template | chat
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
    ],
    metadata={"gen1.table": "edit-prompts", "gen1.schema_version": str(EDIT_SCHEMA_VERSION)},
)


# ---------------------------------------------------------------------------------------------- arrays


def encode_array(x: np.ndarray, dtype: str = "float16") -> tuple[bytes, list[int]]:
    """Array -> (little-endian C-order bytes in ``dtype``, shape)."""
    a = np.ascontiguousarray(np.asarray(x).astype(np.dtype(dtype).newbyteorder("<"), copy=False))
    return a.tobytes(), [int(s) for s in a.shape]


def decode_array(data: bytes, shape: Sequence[int], dtype: str = "float16") -> np.ndarray:
    """Inverse of `encode_array`; checks that the byte count matches the shape."""
    dt = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape)) * dt.itemsize
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes for {dtype} {tuple(shape)}; found {len(data)}")
    return np.frombuffer(data, dtype=dt).reshape(tuple(shape)).astype(np.dtype(dtype))


def encode_frames(frames: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> list[bytes]:
    """uint8 (f, h, w, 3) RGB -> one JPEG or raw byte string per frame."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (f, h, w, 3); found {frames.dtype} {frames.shape}")
    if fmt == "raw":
        return [np.ascontiguousarray(f).tobytes() for f in frames]
    if fmt == "jpeg":
        import cv2

        out = []
        for f in frames:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(f[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"JPEG encoding failed for a frame of shape {f.shape}")
            out.append(buf.tobytes())
        return out
    raise ValueError(f"expected frames format 'jpeg' or 'raw'; found {fmt!r}")


def decode_frames(data: Sequence[bytes], fmt: str, height: int, width: int) -> np.ndarray:
    """Inverse of `encode_frames`: uint8 (f, height, width, 3) RGB."""
    if fmt == "raw":
        return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(height, width, 3) for b in data])
    if fmt == "jpeg":
        import cv2

        frames = [cv2.imdecode(np.frombuffer(b, dtype=np.uint8), cv2.IMREAD_COLOR)[..., ::-1] for b in data]
        return np.ascontiguousarray(np.stack(frames))
    raise ValueError(f"expected frames format 'jpeg' or 'raw'; found {fmt!r}")


def row_depth(row: Mapping[str, Any]) -> np.ndarray:
    """A shard row's depth: float32 (f, h, w) in [-1, 1]."""
    return decode_array(row["depth"], row["depth_shape"]).astype(np.float32)


def row_clip_embedding(row: Mapping[str, Any]) -> np.ndarray:
    """A shard row's per-frame CLIP image embeddings: float32 (f, clip_dim)."""
    return decode_array(row["clip_embedding"], (row["num_frames"], row["clip_dim"])).astype(np.float32)


def row_frames(row: Mapping[str, Any]) -> np.ndarray | None:
    """A shard row's stored frames, uint8 (f, h, w, 3), or None when frames were not stored."""
    if row.get("frames") is None:
        return None
    return decode_frames(row["frames"], row["frames_format"], row["height"], row["width"])


def row_latents(row: Mapping[str, Any]) -> np.ndarray | None:
    """A shard row's VAE latents, float32 (c, f, h/8, w/8), or None when latents were not computed."""
    if row.get("latents") is None:
        return None
    return decode_array(row["latents"], row["latents_shape"]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- layout


class TableStore:
    """One destination ``DST``: atomic writes of committed parts and reads of them.

    ``table`` is ``SHARDS_DIR`` or ``ERRORS_DIR``. Paths handed around are the filesystem's own
    (no protocol); `uri` adds the protocol back for messages.
    """

    def __init__(self, dst: str, storage_options: Mapping[str, Any] | None = None):
        self.dst = dst
        self.fs, root = fsspec.core.url_to_fs(dst, **dict(storage_options or {}))
        if isinstance(self.fs, LocalFileSystem):
            root = self.fs._strip_protocol(root)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def committed(self, table: str) -> list[str]:
        """Paths of the committed parts of ``table``, sorted: one fresh listing of its folder (names only;
        the filesystem's cache of it is dropped after, since 100K parts' details would stay there)."""
        root = self.path(table)
        try:
            found = self.fs.ls(root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(root)
        return sorted(p for p in found if p.rsplit("/", 1)[-1].startswith(PART_PREFIX) and p.endswith(".parquet"))

    def write_tmp(self, table: str, data: pa.Table, run_id: str) -> str:
        """Write ``data`` under ``table/_tmp/<run_id>/`` and return its path (not yet committed)."""
        path = self.path(table, TMP_DIR, run_id, f"{uuid.uuid4().hex}.parquet")
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            pq.write_table(data, f, compression=COMPRESSION)
        return path

    def commit(self, table: str, tmp_path: str, name: str) -> str:
        """Move a tmp part to its final ``part-<name>.parquet`` name; returns the committed path."""
        final = self.path(table, f"{PART_PREFIX}{name}.parquet")
        if self.fs.exists(final):
            raise FileExistsError(f"refusing to overwrite committed part {self.uri(final)}")
        self.fs.mv(tmp_path, final)
        return final

    def read(self, path: str, columns: Sequence[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=list(columns) if columns else None)

    def read_all(self, table: str, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
        """Every committed part of ``table`` concatenated (an empty table of ``schema`` if none)."""
        parts = [self.read(p, columns) for p in self.committed(table)]
        if not parts:
            empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            return empty.empty_table()
        return pa.concat_tables(parts, promote_options="default")

    def remove_tmp(self, table: str, run_id: str) -> None:
        """Delete what a run left under ``table/_tmp/<run_id>`` (parts it never committed)."""
        path = self.path(table, TMP_DIR, run_id)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_stale_tmp(self, table: str, max_age_s: float, keep: str | None = None) -> list[str]:
        """Delete the run folders under ``table/_tmp/`` whose newest file is more than ``max_age_s`` seconds
        old (parts of runs that died before committing them), except ``keep`` (this run's); returns their
        URIs. A folder whose age the filesystem does not tell is kept. Safe only under DST's lease
        (`pipelines.lease`): no other run is writing there."""
        root = self.path(table, TMP_DIR)
        try:
            entries = self.fs.ls(root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        now = time.time()
        removed = []
        for entry in entries:
            entry = entry.rstrip("/")
            if entry.rsplit("/", 1)[-1] == keep:
                continue
            infos = list(self.fs.find(entry, detail=True).values()) or [self.fs.info(entry)]
            times = [t for t in map(_modified, infos) if t is not None]
            if not times or now - max(times) <= max_age_s:
                continue
            self.fs.rm(entry, recursive=True)
            removed.append(self.uri(entry))
        return removed


def _modified(info: Mapping[str, Any]) -> float | None:
    """When a file was last written (UNIX seconds), from its fsspec ``info``: ``mtime`` (local),
    ``LastModified`` (S3), ``created`` (memory), ``updated`` (GCS); None when it has none of them."""
    for key in ("mtime", "LastModified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def read_shards(dst: str, columns: Sequence[str] | None = None, storage_options=None) -> pa.Table:
    """All committed feature shards under ``dst`` as one table (SHARD_SCHEMA, or ``columns`` of it)."""
    return TableStore(dst, storage_options).read_all(SHARDS_DIR, SHARD_SCHEMA, columns)


def read_errors(dst: str, storage_options=None) -> pa.Table:
    """All committed error rows under ``dst`` (ERRORS_SCHEMA); a clip that failed and later succeeded
    still has its old rows here (filter with `committed_clip_ids`)."""
    return TableStore(dst, storage_options).read_all(ERRORS_DIR, ERRORS_SCHEMA)


def committed_clip_ids(dst: str, storage_options=None) -> set[str]:
    """The clip ids present in committed shards under ``dst``."""
    return set(read_shards(dst, ["clip_id"], storage_options).column("clip_id").to_pylist())
