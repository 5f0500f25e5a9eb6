"""The preprocess pipeline: videos -> clips -> decode -> depth -> CLIP (-> VAE latents) -> Parquet shards.

Ray Data streams clips through plain stage classes (each ``__call__(batch: pandas.DataFrame) ->
DataFrame``, callable without Ray)::

    list videos (driver) -> PlanStage (CPU tasks, or the driver for a few videos: probe, pick clips)
      -> drop clips already in DST (driver)
      -> DecodeStage (CPU tasks) -> DepthStage (actor pool) -> ClipStage (actor pool)
      -> [LatentsStage (actor pool)] -> ShardWriter (CPU tasks: write shards/_tmp/...)
      -> Committer (driver: move each tmp file to its final name, one at a time)

Failures are data: a clip that cannot be decoded or fails in a stage becomes an error row that flows on
to the writer and lands in ``DST/errors`` (`pipelines.failures`). Completion is tracked per clip id:
a rerun plans the same clips, skips those already committed and retries the ones that failed. The
driver is the only committer and drops rows whose clip id is already committed (also by another run
that committed meanwhile), so DST never holds a clip id twice. Whatever is neither committed nor in
errors when the stream ends (e.g. the stream itself failed) is recorded as a ``pipeline`` error, so
every planned clip ends either written or in ``errors``.

Resources: model actors take ``num_gpus`` when the cluster has GPUs, and a fraction of a CPU otherwise.
CPU tasks (decode, write) claim no CPU by default and are capped by a task pool instead, so they are never
starved by actors that hold every CPU (which hangs Ray Data): measured on 2 CPUs, and after a worker node
dies and its actors restart on the head.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gen1.config import ConfigError, ModelSpecs, config_from_mapping, load_model_specs, read_yaml_mapping
from pipelines.commits import Committer
from pipelines.failures import (
    STATUS_ERROR,
    STATUS_OK,
    apply_per_clip,
    batch_rows,
    error_record,
    error_table,
    healthy,
    mark_failed,
    with_error_columns,
)
from pipelines.quarantine import Quarantine, load_quarantine, write_quarantine
from pipelines.runtime import (
    ActorPool,
    init_ray,
    new_run_id,
    plan_resources,
    task_concurrency,
    write_run_record,
)
from pipelines.schema import (
    ERRORS_DIR,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    SHARDS_DIR,
    TableStore,
    encode_array,
    encode_frames,
)
from pipelines.sources import PLAN_COLUMNS, VIDEO_EXTENSIONS, PlanStage, list_videos
from pipelines.timeouts import call_with_timeout, check_time_limits

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- config


@dataclass
class PreprocessConfig:
    """Everything a preprocess run needs besides SRC and DST. Load with `from_yaml`; printed at start."""

    models: str = "tiny"  # preset name or YAML of weight specs (gen1.config.load_model_specs)
    depth_model: str | None = None  # override the preset's weight spec of that component
    clip_model: str | None = None
    vae_model: str | None = None
    # sampling: None = the preset's (sd15: 8 frames 4 apart at 448x256; tiny: 4 frames 2 apart at 64x64)
    frames: int | None = None
    stride: int | None = None
    clips_per_video: int | None = None  # None: every non-overlapping clip; else that many, evenly spread
    size: tuple[int, int] | None = None  # (w, h) for landscape sources; portrait sources get (h, w)
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    manifest_column: str = "uri"
    # outputs
    store_frames: bool = True  # keep the resized frames (so training can compute VAE latents)
    frames_format: str = "jpeg"  # "jpeg" (compact) | "raw" (exact uint8)
    jpeg_quality: int = 95
    latents: bool = False  # compute VAE latents of the frames (LatentsStage)
    shard_size: int = 64  # clips per shard file (when target_shard_bytes is None)
    # Shard files sized by bytes instead: each file holds rows whose in-memory Arrow size totals at most this
    # (a row larger than it gets a file of its own), so a file is at most target + one row, and smaller once
    # zstd compresses it. Writer batches hold about this many bytes (estimated from the frame size), so most
    # files come close to it. None: shard_size clips per file.
    target_shard_bytes: int | None = None
    # execution
    plan_batch_size: int = 1  # videos per planning task
    plan_in_driver_max: int = 8  # corpora up to this many videos are planned in the driver (no task start-up)
    # Memory: blocks stream through the object store; Ray Data backpressures each stage by its share of the
    # store (about half of it in all), and decodes run at most max_concurrent_decodes at once, so memory does
    # not grow with the corpus. A block is decode_batch_size decoded clips (frames * h * w * 3 bytes each,
    # plus float16 depth after the depth stage); every stage may hold a block or two in and out whatever the
    # budget, and Ray spills past 80% of the store, so keep a block under about 1/16 of the object store (the
    # test runs 4.4 MiB blocks in 80 MiB) or blocks spill to disk. Frames leave the stream after the last
    # model stage unless store_frames is set. The writer's batch (shard_size rows, or target_shard_bytes)
    # also waits in the store: keep it a small part of the store too, or the stages starve each other.
    decode_batch_size: int = 4  # clips per decode task
    depth_batch_size: int = 4  # clips per depth call
    clip_batch_size: int = 8  # clips per CLIP call
    latents_batch_size: int = 4
    depth_concurrency: int = 1  # actors per model pool
    clip_concurrency: int = 1
    latents_concurrency: int = 1
    # CPU tasks (plan, decode, write) claim task_num_cpus each, at most task_concurrency at once (None: the
    # cluster's CPU count). 0 CPUs means they never wait behind model actors: actors that hold every CPU,
    # e.g. after a node died and its actors restarted elsewhere, would otherwise starve them and hang the job.
    task_num_cpus: float = 0.0
    task_concurrency: int | None = None
    actor_num_cpus: float = 0.5  # model actors on a CPU-only cluster
    depth_num_gpus: float = 0.5  # model actors when the cluster has GPUs (defaults fit on one GPU)
    clip_num_gpus: float = 0.25
    latents_num_gpus: float = 0.25
    device: str | None = None  # None: cuda when the actor got a GPU, else cpu
    max_failure_fraction: float = 0.1  # exit non-zero when failed / (ok + failed) exceeds this
    # time limits (`pipelines.timeouts`; None or 0: none). A clip over the limit becomes an error row of its
    # stage with error_type "timeout"; the hung thread is abandoned, not killed.
    decode_timeout_s: float | None = 120.0  # per probe (plan) and per clip decode
    model_timeout_s: float | None = 600.0  # per model call (a batch forward, or one clip's on retry)
    max_concurrent_decodes: int | None = None  # decode tasks in flight at once (None: the task pool's size)
    # inputs that failed in 2 runs are skipped (pipelines.quarantine) unless this is set
    retry_quarantined: bool = False
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started here
    num_cpus: int | None = None  # CPUs of a local Ray (None: the machine's)
    progress: bool = True  # Ray Data progress bars
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for SRC and DST

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        self.extensions = tuple(self.extensions)
        if self.frames_format not in ("jpeg", "raw"):
            raise ConfigError(f"frames_format: expected 'jpeg' or 'raw'; found {self.frames_format!r}")
        for name in ("shard_size", "plan_batch_size", "decode_batch_size", "depth_batch_size",
                     "clip_batch_size", "latents_batch_size", "depth_concurrency", "clip_concurrency",
                     "latents_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1; found {getattr(self, name)!r}")
        if self.target_shard_bytes is not None and int(self.target_shard_bytes) < 1:
            raise ConfigError(f"target_shard_bytes: expected bytes >= 1 or None; found {self.target_shard_bytes!r}")
        if self.max_concurrent_decodes is not None and int(self.max_concurrent_decodes) < 1:
            raise ConfigError(f"max_concurrent_decodes: expected an integer >= 1 or None; found "
                              f"{self.max_concurrent_decodes!r}")
        check_time_limits(self, ("decode_timeout_s", "model_timeout_s"))
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"max_failure_fraction: expected a value in [0, 1]; found {self.max_failure_fraction}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PreprocessConfig:
        """Fields from a YAML mapping, then ``overrides`` (None values ignored)."""
        return config_from_mapping(cls, read_yaml_mapping(path, "preprocess settings"), path, overrides)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d

    def resolved(self) -> ResolvedConfig:
        """The config with preset defaults filled in."""
        specs = load_model_specs(self.models)
        return ResolvedConfig(
            specs=specs,
            frames=self.frames or specs.frames,
            stride=self.stride or specs.frame_stride,
            size=self.size or (specs.width, specs.height),
            depth_model=self.depth_model or specs.depth,
            clip_model=self.clip_model or specs.clip,
            vae_model=(self.vae_model or specs.vae) if self.latents else None,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    specs: ModelSpecs
    frames: int
    stride: int
    size: tuple[int, int]
    depth_model: str
    clip_model: str
    vae_model: str | None


# -------------------------------------------------------------------------------------------- columns

# Added by the stages (bytes are b"" and ints 0 where a stage did not run, so types never vary).
FEATURE_COLUMNS = ("frames_raw", "depth", "clip_embedding", "clip_dim", "latents", "lat_c", "lat_h", "lat_w")
WRITTEN_COLUMNS = ("table", "tmp_path", "clip_ids", "num_rows")


def _rows(batch: pd.DataFrame | Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stage batch as row dicts, with the error columns and every feature column set (`FEATURE_COLUMNS`)."""
    rows = batch_rows(batch)
    for row in rows:
        with_error_columns(row)
        for col in FEATURE_COLUMNS:
            row.setdefault(col, 0 if col in ("clip_dim", "lat_c", "lat_h", "lat_w") else b"")
    return rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*PLAN_COLUMNS, *FEATURE_COLUMNS])


def clip_frames(row: Mapping[str, Any]) -> np.ndarray:
    """The decoded frames a stage batch row carries: uint8 (f, h, w, 3)."""
    data = row["frames_raw"]
    if not data:
        raise ValueError(f"clip {row['clip_id']}: expected decoded frames; the row has none")
    shape = (int(row["num_frames"]), int(row["height"]), int(row["width"]), 3)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()  # writable: torch.from_numpy needs it


def _without_frames(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``frames_raw`` emptied: after the last stage that reads them, when they are not stored,
    so the frames (the largest column) take no more object-store room downstream."""
    for row in rows:
        row["frames_raw"] = b""
    return rows


def _by_shape(inputs: list[np.ndarray], fn: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Apply ``fn`` to the concatenation of same-shaped clips (f, h, w, 3), split the result per clip."""
    out: list[np.ndarray | None] = [None] * len(inputs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape[1:]), []).append(i)
    for idx in groups.values():
        result = fn(np.concatenate([inputs[i] for i in idx]))
        offsets = np.cumsum([0] + [len(inputs[i]) for i in idx])
        for k, i in enumerate(idx):
            out[i] = result[offsets[k] : offsets[k + 1]]
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- stages


class DecodeStage:
    """Decode and resize the frames of each planned clip into ``frames_raw`` (uint8 (f, h, w, 3) bytes).

    A remote video is fetched once per batch (into a temp file) however many of its clips the batch
    holds; sparse reads go through `gen1.video.read_frames`. Each clip's decode runs under ``timeout_s``
    (`pipelines.timeouts.call_with_timeout`): a clip whose decode hangs becomes an error row (stage
    ``decode``, error type ``timeout``) and the next clip goes on. The fetch itself is not limited here
    (fsspec's own timeouts apply).
    """

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        from gen1 import video

        rows = _rows(batch)
        by_uri: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if healthy(row):
                by_uri.setdefault(row["source_uri"], []).append(row)
        for uri, group in by_uri.items():
            with _local_copy(uri) as (local, fetch_error):
                for row in group:
                    try:
                        if fetch_error is not None:
                            raise fetch_error
                        row["frames_raw"] = call_with_timeout(
                            self._decode, self.timeout_s, video, uri, local, row,
                            what=f"decode of clip {row['clip_id']} (start {row['start']}) of {uri}",
                        )
                    except Exception as e:
                        mark_failed(row, "decode", e)
        return _frame(rows)

    @staticmethod
    def _decode(video: Any, uri: str, local: str, row: Mapping[str, Any]) -> bytes:
        # `video.read_frames` is looked up at call time so a test can stand in a hanging decoder
        indices = [int(i) for i in row["frame_indices"]]
        frames = _rename_decode_errors(uri, local, video.read_frames, indices)
        frames = video.resize_center_crop(frames, int(row["width"]), int(row["height"]))
        if len(frames) != int(row["num_frames"]):
            raise RuntimeError(f"expected {row['num_frames']} frames; decoded {len(frames)}")
        return np.ascontiguousarray(frames).tobytes()


class _local_copy:
    """Context manager: (a local path for ``uri``, or the error fetching it). Local files are used as is."""

    def __init__(self, uri: str):
        self.uri, self.tmp = uri, None

    def __enter__(self) -> tuple[str, Exception | None]:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        from gen1.video import VideoDecodeError

        try:
            fs, path = fsspec.core.url_to_fs(self.uri)
            if isinstance(fs, LocalFileSystem):
                return self.uri, None
            suffix = os.path.splitext(path)[1]
            fd, self.tmp = tempfile.mkstemp(prefix="gen1-preprocess-", suffix=suffix)
            os.close(fd)
            fs.get_file(path, self.tmp)
            return self.tmp, None
        except Exception as e:
            err = VideoDecodeError(self.uri, f"cannot fetch: {type(e).__name__}: {e}")
            err.__cause__ = e
            return self.uri, err

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _rename_decode_errors(uri: str, local: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(local, *args)``; a VideoDecodeError about the temp copy names ``uri`` instead."""
    from gen1.video import VideoDecodeError

    try:
        return fn(local, *args)
    except VideoDecodeError as e:
        if local == uri:
            raise
        raise VideoDecodeError(uri, e.reason) from e


class ModelStage:
    """A model over the healthy clips of a batch: the model is loaded once (`load`, from ``__init__``);
    `predict` runs on every clip of a call at once, and on each clip alone when that raises
    (`pipelines.failures.apply_per_clip`); `store` writes one clip's output into its row. A clip that
    fails alone becomes an error row of stage `name`.
    """

    name: str  # the stage of its error rows

    def __init__(self, spec: str, device: str | None = None, timeout_s: float | None = None,
                 drop_frames: bool = False):
        self.spec, self.timeout_s = spec, timeout_s  # timeout_s: per model call (`apply_per_clip`)
        self.drop_frames = drop_frames  # the last stage that needs the frames, and they are not stored
        self.load(device)

    def load(self, device: str | None) -> None:
        """Load the model of ``self.spec`` onto ``device`` (None: the stage's default)."""
        raise NotImplementedError

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> one output array each."""
        raise NotImplementedError

    def store(self, row: dict[str, Any], out: np.ndarray) -> None:
        """Check one clip's output and write it into its row."""
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        rows = _rows(batch)
        apply_per_clip(rows, self.name, self.predict, clip_frames, self.store, self.timeout_s)
        return _frame(_without_frames(rows) if self.drop_frames else rows)


class DepthStage(ModelStage):
    """Per-clip depth (`gen1.depth.DepthEstimator`, normalised per clip) -> ``depth`` (float16 bytes)."""

    name = "depth"

    def load(self, device: str | None) -> None:
        from gen1.depth import DepthEstimator

        self.estimator = DepthEstimator(self.spec, device=device)

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> float32 (f, h, w) each, as `DepthEstimator.__call__` computes
        it (raw depth, then one min/max per clip), with the frames of same-sized clips in shared forwards."""
        import torch

        from gen1.structure import normalise_per_clip

        raw = _by_shape(clips, lambda x: self.estimator.predict_raw(x).float().cpu().numpy())
        return [normalise_per_clip(torch.from_numpy(d)).numpy() for d in raw]

    def store(self, row: dict[str, Any], depth: np.ndarray) -> None:
        expected = (int(row["num_frames"]), int(row["height"]), int(row["width"]))
        if depth.shape != expected:
            raise ValueError(f"depth of clip {row['clip_id']}: expected shape {expected}; got {depth.shape}")
        row["depth"] = encode_array(depth, "float16")[0]


class ClipStage(ModelStage):
    """Per-frame CLIP image embeddings (`gen1.clip.ClipEmbedder`) -> ``clip_embedding`` (float16 bytes)."""

    name = "clip"

    def load(self, device: str | None) -> None:
        from gen1.clip import ClipEmbedder

        self.embedder = ClipEmbedder(self.spec, device=device)

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> float32 (f, dim) each; one forward per frame shape."""
        return _by_shape(clips, lambda x: self.embedder.embed_images(x).float().cpu().numpy())

    def store(self, row: dict[str, Any], emb: np.ndarray) -> None:
        if emb.ndim != 2 or emb.shape[0] != int(row["num_frames"]):
            raise ValueError(f"CLIP embeddings of clip {row['clip_id']}: expected ({row['num_frames']}, d); "
                             f"got {emb.shape}")
        row["clip_embedding"] = encode_array(emb, "float16")[0]
        row["clip_dim"] = int(emb.shape[1])


class LatentsStage(ModelStage):
    """VAE latents of every frame: posterior mean times ``scaling_factor``, (c, f, h/8, w/8) float16."""

    name = "latents"

    def load(self, device: str | None) -> None:
        import torch

        from gen1.weights import load_vae

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = load_vae(self.spec, device=self.device).eval()
        self.scale = float(getattr(self.vae.config, "scaling_factor", 1.0))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames uint8 (n, h, w, 3) -> float32 (n, c, h/8, w/8)."""
        import torch

        from gen1.video import frames_to_tensor

        x = frames_to_tensor(frames).to(self.device, next(self.vae.parameters()).dtype)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean * self.scale
        return z.float().cpu().numpy()

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> float32 (c, f, h/8, w/8) each."""
        return [z.transpose(1, 0, 2, 3) for z in _by_shape(clips, self.encode)]  # (f, c, ..) -> (c, f, ..)

    def store(self, row: dict[str, Any], z: np.ndarray) -> None:
        row["latents"] = encode_array(z, "float16")[0]
        row["lat_c"], _, row["lat_h"], row["lat_w"] = (int(s) for s in z.shape)


class ShardWriter:
    """Write the healthy rows of a batch as one shard and its error rows as one errors file, both under
    ``_tmp/<run_id>/`` (not yet committed; the driver's `Committer` does that).

    Returns one row per file: ``table`` (shards | errors), ``tmp_path``, ``clip_ids``, ``num_rows``.
    """

    def __init__(self, dst: str, run_id: str, models: Mapping[str, str | None], store_frames: bool = True,
                 frames_format: str = "jpeg", jpeg_quality: int = 95,
                 storage_options: Mapping[str, Any] | None = None, target_bytes: int | None = None):
        self.dst, self.run_id, self.models = dst, run_id, dict(models)
        self.target_bytes = target_bytes  # split a batch into shards of at most this many Arrow bytes
        self.store_frames, self.frames_format, self.jpeg_quality = store_frames, frames_format, jpeg_quality
        self.storage_options = dict(storage_options or {})

    def shard_table(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Healthy stage rows -> a SHARD_SCHEMA table."""
        cols: dict[str, list[Any]] = {f.name: [] for f in SHARD_SCHEMA}
        for r in rows:
            f, h, w = int(r["num_frames"]), int(r["height"]), int(r["width"])
            if not r["depth"] or not r["clip_embedding"]:
                raise ValueError(f"clip {r['clip_id']}: expected depth and CLIP features; a stage did not run")
            frames = encode_frames(clip_frames(r), self.frames_format, self.jpeg_quality) if self.store_frames else None
            has_latents = bool(r["latents"])
            values = {
                "clip_id": r["clip_id"], "source_uri": r["source_uri"], "start": int(r["start"]),
                "stride": int(r["stride"]), "frame_indices": [int(i) for i in r["frame_indices"]],
                "fps": float(r["fps"]), "num_frames": f, "height": h, "width": w,
                "depth": r["depth"], "depth_shape": [f, h, w],
                "clip_embedding": r["clip_embedding"], "clip_dim": int(r["clip_dim"]),
                "frames": frames, "frames_format": self.frames_format if frames is not None else None,
                "latents": r["latents"] if has_latents else None,
                "latents_shape": [int(r["lat_c"]), f, int(r["lat_h"]), int(r["lat_w"])] if has_latents else None,
                "caption": None,
                "depth_model": self.models["depth"], "clip_model": self.models["clip"],
                "vae_model": self.models.get("vae") if has_latents else None,
                "run_id": self.run_id, "schema_version": SCHEMA_VERSION,
            }
            for k, v in values.items():
                cols[k].append(v)
        return pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        rows = _rows(batch)
        store = TableStore(self.dst, self.storage_options)
        written: list[dict[str, Any]] = []
        ok = [r for r in rows if healthy(r)]
        if ok:
            try:
                table = self.shard_table(ok)
            except Exception:  # one bad row must not lose the others: build row by row
                good = []
                for r in ok:
                    try:
                        self.shard_table([r])
                        good.append(r)
                    except Exception as e:
                        mark_failed(r, "write", e)
                ok = good
                table = self.shard_table(ok) if ok else None
            for lo, hi in (split_by_bytes(table, self.target_bytes) if table is not None else []):
                path = store.write_tmp(SHARDS_DIR, table.slice(lo, hi - lo), self.run_id)
                written.append({"table": SHARDS_DIR, "tmp_path": path,
                                "clip_ids": [r["clip_id"] for r in ok[lo:hi]], "num_rows": hi - lo})
        failed = [r for r in rows if r["status"] == STATUS_ERROR]
        if failed:
            path = store.write_tmp(ERRORS_DIR, error_table([error_record(r) for r in failed], self.run_id),
                                   self.run_id)
            written.append({"table": ERRORS_DIR, "tmp_path": path, "clip_ids": [r["clip_id"] for r in failed],
                            "num_rows": len(failed)})
        return pd.DataFrame(written, columns=list(WRITTEN_COLUMNS))


def split_by_bytes(table: pa.Table, target_bytes: int | None) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of ``table`` whose Arrow sizes total at most ``target_bytes`` each (a
    larger row alone); one range of every row when ``target_bytes`` is None. Greedy, in row order."""
    n = table.num_rows
    if not target_bytes or n == 0:
        return [(0, n)] if n else []
    ranges, lo, size = [], 0, 0
    for i in range(n):
        row = table.slice(i, 1).nbytes
        if i > lo and size + row > target_bytes:
            ranges.append((lo, i))
            lo, size = i, 0
        size += row
    ranges.append((lo, n))
    return ranges


def estimated_row_bytes(cfg: PreprocessConfig, res: ResolvedConfig) -> int:
    """About how many Arrow bytes one shard row takes: depth, CLIP embeddings, frames (JPEG guessed at a
    sixth of raw), latents, plus 1 KiB of ids and scalars. Sizes writer batches for target_shard_bytes."""
    f, (w, h) = res.frames, res.size
    frames = 0 if not cfg.store_frames else f * h * w * 3 // (1 if cfg.frames_format == "raw" else 6)
    latents = 4 * f * (h // 8) * (w // 8) * 2 if res.vae_model else 0
    return f * h * w * 2 + f * res.specs.clip_dim * 2 + frames + latents + 1024


def writer_batch_rows(cfg: PreprocessConfig, res: ResolvedConfig) -> int:
    """Rows per writer call: shard_size, or as many estimated rows as fit in target_shard_bytes."""
    if cfg.target_shard_bytes is None:
        return cfg.shard_size
    return max(1, cfg.target_shard_bytes // estimated_row_bytes(cfg, res))


# --------------------------------------------------------------------------------------------- driver


@dataclass
class PreprocessSummary:
    run_id: str
    dst: str
    videos: int = 0
    planned: int = 0  # clips sampled from the videos (whole-video failures count as one)
    ok: int = 0  # clips written by this run
    failed: int = 0  # clips (or whole videos) that ended in `errors` in this run
    skipped: int = 0  # clips already in DST before this run
    quarantined: int = 0  # inputs (clips, and videos that failed planning) skipped as quarantined
    in_quarantine: int = 0  # inputs on the quarantine list after this run (DST/quarantine)
    seconds: float = 0.0
    error: str | None = None  # the exception that stopped the stream, if any

    @property
    def clips_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_fraction(self) -> float:
        done = self.ok + self.failed
        return self.failed / done if done else 0.0

    def line(self) -> str:
        return (
            f"preprocess {self.run_id}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped, "
            f"{self.quarantined} quarantined (skipped; {self.in_quarantine} on the list) of {self.planned} clips from {self.videos} videos in {self.seconds:.1f}s "
            f"({self.clips_per_second:.2f} clips/s) -> {self.dst}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "clips_per_second": self.clips_per_second,
                "failure_fraction": self.failure_fraction}


def run_preprocess(src: str, dst: str, cfg: PreprocessConfig | None = None) -> PreprocessSummary:
    """Build feature shards under ``dst`` for the videos under ``src`` (see the module docstring)."""
    import ray

    cfg = cfg or PreprocessConfig()
    res = cfg.resolved()
    run_id = new_run_id()
    logger.info("preprocess %s -> %s, run %s, models %s\nconfig: %s", src, dst, run_id, res.specs.label(),
                json.dumps(cfg.as_dict(), default=str))
    _check_weights(res)
    t0 = time.monotonic()
    store = TableStore(dst, cfg.storage_options)
    commits = run_committers(store, run_id)
    shards, errors = commits[SHARDS_DIR], commits[ERRORS_DIR]
    summary = PreprocessSummary(run_id=run_id, dst=dst)

    uris = list_videos(src, cfg.extensions, cfg.manifest_column, cfg.storage_options)
    summary.videos = len(uris)
    quarantine = _current_quarantine(store, shards)
    if cfg.retry_quarantined:
        logger.info("retrying %d quarantined inputs (retry_quarantined)", len(quarantine))
    else:
        held = [u for u in uris if u in quarantine.videos]
        if held:
            logger.warning("skipping %d quarantined videos (failed planning in %d+ runs; --retry-quarantined "
                           "retries them): %s", len(held), 2, ", ".join(held[:5]) + (" ..." if len(held) > 5 else ""))
        uris = [u for u in uris if u not in quarantine.videos]
        summary.quarantined += len(held)
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        plans = _plan(uris, cfg, res)
        done = shards.refresh()
        ok_plans = _unique_clips([p for p in plans if p["status"] == STATUS_OK])
        todo = [p for p in ok_plans if p["clip_id"] not in done]
        summary.skipped = len(ok_plans) - len(todo)
        if not cfg.retry_quarantined:
            held_clips = [p for p in todo if p["clip_id"] in quarantine.clips]
            if held_clips:
                logger.warning("skipping %d quarantined clips (failed in 2+ runs; --retry-quarantined retries "
                               "them)", len(held_clips))
                todo = [p for p in todo if p["clip_id"] not in quarantine.clips]
            summary.quarantined += len(held_clips)
        plan_errors = [p for p in plans if p["status"] != STATUS_OK]
        summary.planned = len(ok_plans) + len(plan_errors)
        errors.commit_errors([error_record(p) for p in plan_errors])
        logger.info("%d videos -> %d clips: %d to do, %d already in %s, %d quarantined, %d videos failed "
                    "planning", len(uris), len(ok_plans), len(todo), summary.skipped, dst, summary.quarantined,
                    len(plan_errors))
        if todo:
            try:
                for batch in _build_dataset(todo, dst, run_id, cfg, res).iter_batches(
                    batch_size=None, batch_format="pandas"
                ):
                    for w in batch.to_dict("records"):
                        commits[w["table"]].commit_file(w["tmp_path"], [str(i) for i in w["clip_ids"]])
            except Exception as e:  # the stream broke: what is not committed yet becomes a pipeline error
                logger.exception("the pipeline stopped early: %s", e)
                summary.error = f"{type(e).__name__}: {e}"
            _record_missing(todo, shards, errors, summary.error)
        summary.ok = len(shards.written)
        summary.failed = len(errors.written - shards.written)
    finally:
        summary.seconds = time.monotonic() - t0
        for committer in commits.values():
            committer.remove_tmp()
        if started:
            ray.shutdown()
    _update_quarantine(store, shards, summary)
    write_run_record(store, run_id, {"run_id": run_id, "src": src, "config": cfg.as_dict(),
                                     "summary": summary.as_dict()})
    logger.info("%s", summary.line())
    return summary


def run_committers(store: TableStore, run_id: str) -> dict[str, Committer]:
    """The driver's committers of a run, by table: ``shards`` (a clip id once, tracking the source URIs
    that have a clip) and ``errors`` (every row)."""
    return {
        SHARDS_DIR: Committer(store, SHARDS_DIR, run_id, key="clip_id", track=("source_uri",)),
        ERRORS_DIR: Committer(store, ERRORS_DIR, run_id, key=None),
    }


def _current_quarantine(store: TableStore, shards: Committer) -> Quarantine:
    """The quarantine list from DST/errors, minus the inputs DST/shards has committed by now."""
    shards.refresh()
    return load_quarantine(store, shards.committed, shards.values["source_uri"])


def _check_weights(res: ResolvedConfig) -> None:
    """Fail before any work when a weight spec cannot be resolved."""
    from gen1.weights import resolve_spec

    for spec in (res.depth_model, res.clip_model, res.vae_model):
        if spec:
            resolve_spec(spec)


def _plan(uris: list[str], cfg: PreprocessConfig, res: ResolvedConfig) -> list[dict[str, Any]]:
    """Plan rows (PLAN_SCHEMA) of every video: in the driver for a few videos, else in Ray tasks."""
    import ray

    stage = PlanStage(res.frames, res.stride, cfg.clips_per_video, res.size, cfg.decode_timeout_s)
    if len(uris) <= cfg.plan_in_driver_max:
        return stage({"uri": uris}).to_pylist()
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=math.ceil(len(uris) / cfg.plan_batch_size))
    ds = ds.map_batches(stage, batch_size=cfg.plan_batch_size, batch_format="pandas", num_cpus=cfg.task_num_cpus,
                        concurrency=task_concurrency(cfg.task_concurrency))
    return ds.take_all()


def _unique_clips(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for p in plans:
        if p["clip_id"] not in seen:
            seen.add(p["clip_id"])
            out.append({k: (list(v) if k == "frame_indices" else v) for k, v in p.items()})
    return out


@dataclass(frozen=True)
class _ModelPass:
    """One model stage of the dataset: its class, weight spec, clips per call and actor pool."""

    stage: type
    spec: str
    batch_size: int
    pool: ActorPool


def _model_passes(cfg: PreprocessConfig, res: ResolvedConfig) -> list[_ModelPass]:
    passes = [
        _ModelPass(DepthStage, res.depth_model, cfg.depth_batch_size,
                   ActorPool("depth", cfg.depth_concurrency, cfg.depth_num_gpus)),
        _ModelPass(ClipStage, res.clip_model, cfg.clip_batch_size,
                   ActorPool("clip", cfg.clip_concurrency, cfg.clip_num_gpus)),
    ]
    if res.vae_model:
        passes.append(_ModelPass(LatentsStage, res.vae_model, cfg.latents_batch_size,
                                 ActorPool("latents", cfg.latents_concurrency, cfg.latents_num_gpus)))
    return passes


def _build_dataset(todo: list[dict[str, Any]], dst: str, run_id: str, cfg: PreprocessConfig,
                   res: ResolvedConfig):
    import ray

    passes = _model_passes(cfg, res)
    resources = plan_resources([p.pool for p in passes], cfg.actor_num_cpus, cfg.task_num_cpus)
    blocks = max(1, math.ceil(len(todo) / cfg.decode_batch_size))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    ds = ds.map_batches(DecodeStage(cfg.decode_timeout_s), batch_size=cfg.decode_batch_size,
                        batch_format="pandas", num_cpus=cfg.task_num_cpus,
                        concurrency=task_concurrency(cfg.task_concurrency, cfg.max_concurrent_decodes))
    for i, p in enumerate(passes):
        last = i == len(passes) - 1  # the last reader of the frames: it drops them unless they are stored
        ds = ds.map_batches(  # a class: Ray Data runs it in a pool of `concurrency` actors
            p.stage,
            fn_constructor_kwargs={"spec": p.spec, "device": cfg.device, "timeout_s": cfg.model_timeout_s,
                                   "drop_frames": last and not cfg.store_frames},
            batch_size=p.batch_size,
            batch_format="pandas",
            concurrency=p.pool.concurrency,
            **resources[p.pool.name],
        )
    writer = ShardWriter(dst, run_id, {"depth": res.depth_model, "clip": res.clip_model, "vae": res.vae_model},
                         cfg.store_frames, cfg.frames_format, cfg.jpeg_quality, cfg.storage_options,
                         target_bytes=cfg.target_shard_bytes)
    return ds.map_batches(writer, batch_size=writer_batch_rows(cfg, res), batch_format="pandas",
                          num_cpus=cfg.task_num_cpus, concurrency=task_concurrency(cfg.task_concurrency))


def _record_missing(todo: list[dict[str, Any]], shards: Committer, errors: Committer, error: str | None) -> None:
    """Planned clips neither written nor in errors (the stream broke, or lost them) -> `pipeline` errors."""
    missing = [p for p in todo if p["clip_id"] not in shards.written | errors.written]
    if not missing:
        return
    message = f"the pipeline ended without this clip: {error}" if error else "the pipeline ended without this clip"
    logger.error("%d planned clips were neither written nor failed; recording them as errors", len(missing))
    errors.commit_errors([
        {"clip_id": p["clip_id"], "uri": p["source_uri"], "start": int(p["start"]), "stage": "pipeline",
         "error_type": error.split(":", 1)[0] if error else "MissingOutput", "message": message, "traceback": None}
        for p in missing
    ])


def _update_quarantine(store: TableStore, shards: Committer, summary: PreprocessSummary) -> None:
    """Recompute the quarantine list with this run's errors and write it to DST/quarantine."""
    try:
        quarantine = _current_quarantine(store, shards)
        write_quarantine(store, quarantine)
        summary.in_quarantine = len(quarantine)
    except Exception:
        logger.exception("could not update the quarantine list under %s", store.dst)

