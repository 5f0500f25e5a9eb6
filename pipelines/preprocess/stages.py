"""The stages of the preprocess stream: plain classes with ``__call__(batch: pandas.DataFrame) -> DataFrame``,
callable without Ray.

- `DecodeStage` (an actor pool, each actor with a child process that decodes): videos (`video_rows`: a
  video's planned clips) -> one row per clip with its decoded, resized frames in ``frames_raw``.
- `ModelStage`, the base of `DepthStage`, `ClipStage` and `LatentsStage` (actor pools): the frames ->
  ``depth``; ``clip_embedding`` and ``clip_dim``; ``latents`` and ``lat_c``, ``lat_h``, ``lat_w``.
- `FusedModels` (an actor pool): several model stages in one actor, applied in turn.
- `ShardWriter` (CPU tasks): the healthy rows of a batch -> shard files, its error rows -> an errors file,
  all under ``_tmp/``; it returns one `WRITTEN_COLUMNS` row per file, for the driver to commit.

A stage row holds the plan columns, ``status`` and the error columns (`pipelines.failures`), and every
`FEATURE_COLUMNS` column (b"" and 0 where a stage has not run, so no column changes its Arrow type). A
clip that fails in a stage becomes an error row, which later stages pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gen1.config import UNIT_CONTENT, ContentConvention
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
from pipelines.schema import (
    ERRORS_DIR,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    SHARDS_DIR,
    TableStore,
    encode_array,
    encode_frames,
)
from pipelines.sources import PLAN_COLUMNS
from pipelines.timeouts import Retirement, StageTimeout

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


def video_rows(plans: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Planned clips (`pipelines.sources.PLAN_SCHEMA` rows) -> one `DecodeStage` input row per video, in
    first-seen order: ``source_uri`` and ``plans``, the video's plan rows as JSON."""
    by_uri: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        row = {c: p[c] for c in PLAN_COLUMNS if c in p}
        row["frame_indices"] = [int(i) for i in row["frame_indices"]]
        by_uri.setdefault(str(p["source_uri"]), []).append(row)
    return [{"source_uri": uri, "plans": json.dumps(rows, default=_json_scalar)} for uri, rows in by_uri.items()]


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a video row")


class DecodeStage:
    """Videos -> their planned clips, decoded and resized into ``frames_raw`` (uint8 (f, h, w, 3) bytes).

    A generator stage: each input row is one video (`video_rows`), decoded once by `gen1.decoding.decode_clips`
    (one pass, or seeks for sparse plans) in a child process (`pipelines.child_worker.ChildWorker`), and its
    clips come out as they complete, ``batch_clips`` rows per yielded batch. A clip whose decode takes longer
    than ``timeout_s`` gets an error row (stage ``decode``, error type ``timeout``); the child is killed and the
    video's other clips are decoded again by a fresh one (after a second timeout in the same video, its
    remaining clips fail with ``timeout`` too). A child that dies (segfault, abort, OOM kill) turns the clips
    of its video not yet out into error rows of error type ``crash``. Other decode errors fail the clips they
    reach. ``decoder`` stands in for `gen1.decoding.decode_clips` (a module-level function: it is pickled to
    the child by reference).
    """

    def __init__(self, timeout_s: float | None = None, batch_clips: int = 4,
                 storage_options: Mapping[str, Any] | None = None, threads: int = 0,
                 decoder: Callable[..., Any] | None = None):
        from pipelines.child_worker import ChildWorker

        self.timeout_s, self.batch_clips, self.threads = timeout_s, max(1, int(batch_clips)), int(threads)
        self.storage_options = dict(storage_options or {})
        self.decoder = decoder
        self.worker = ChildWorker(preload=("gen1.decoding",))

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> Iterator[pd.DataFrame]:
        for video in batch_rows(batch):
            rows = _rows(pd.DataFrame([{**p, "status": STATUS_OK} for p in json.loads(video["plans"])]))
            yield from self.decode_video(str(video["source_uri"]), rows)

    def decode_video(self, uri: str, rows: list[dict[str, Any]]) -> Iterator[pd.DataFrame]:
        """Decode the clips ``rows`` of video ``uri``; yields batches of stage rows, every row once."""
        from gen1.decoding import ClipRequest, decode_clips

        decoder = self.decoder or decode_clips
        pending = {i: r for i, r in enumerate(rows) if healthy(r)}
        out = [r for r in rows if not healthy(r)]
        timeouts = 0
        while pending:
            order = list(pending)
            requests = [ClipRequest(tuple(int(i) for i in pending[k]["frame_indices"]),
                                    (int(pending[k]["width"]), int(pending[k]["height"]))) for k in order]
            what = f"decode of {uri}"
            try:
                for j, frames in self.worker.run(decoder, (uri, requests, self.storage_options, self.threads),
                                                 self.timeout_s, what=what):
                    row = pending.pop(order[j])
                    try:
                        row["frames_raw"] = _checked_frames(row, frames)
                    except Exception as e:
                        mark_failed(row, "decode", e)
                    out.append(row)
                    if len(out) >= self.batch_clips:
                        yield _frame(out)
                        out = []
                break
            except StageTimeout:
                timeouts += 1
                late = [min(pending, key=lambda k: max(pending[k]["frame_indices"]))] if timeouts < 2 else list(pending)
                for k in late:  # the clip the pass was working on (after a second timeout: all that are left)
                    row = pending.pop(k)
                    out.append(mark_failed(row, "decode", StageTimeout(
                        f"decode of clip {row['clip_id']} (start {row['start']}) of {uri}", self.timeout_s, killed=True)))
            except Exception as e:  # a crash of the child, or a decode error: the clips not yet out fail
                for k in list(pending):
                    out.append(mark_failed(pending.pop(k), "decode", e))
        if out:
            yield _frame(out)

    def decode(self, plans: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        """Every clip of ``plans`` (PLAN_SCHEMA rows, any videos) decoded, in their order, as one frame: the
        stage without Ray, for tests and single-machine tools. Plan error rows pass through."""
        rows = _rows(plans)
        videos = video_rows([r for r in rows if healthy(r)])
        out = pd.concat([*(self(pd.DataFrame(videos)) if videos else []), _frame([r for r in rows if not healthy(r)])],
                        ignore_index=True)
        position = {r["clip_id"]: i for i, r in enumerate(rows)}
        return out.iloc[sorted(range(len(out)), key=lambda i: position[out.clip_id.iloc[i]])].reset_index(drop=True)

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


def _checked_frames(row: Mapping[str, Any], frames: np.ndarray) -> bytes:
    """The decoded frames of ``row``'s clip as ``frames_raw`` bytes, once their shape matches the plan."""
    expected = (int(row["num_frames"]), int(row["height"]), int(row["width"]), 3)
    if tuple(frames.shape) != expected:
        raise RuntimeError(f"clip {row['clip_id']}: expected decoded frames of shape {expected}; got {frames.shape}")
    return np.ascontiguousarray(frames, dtype=np.uint8).tobytes()


class ModelStage:
    """A model over the healthy clips of a batch: the model is loaded once (`load`, from ``__init__``);
    `predict` runs on every clip of a call at once, and on each clip alone when that raises
    (`pipelines.failures.apply_per_clip`); `store` writes one clip's output into its row. A clip that
    fails alone becomes an error row of stage `name`. A model call past ``timeout_s`` retires the stage
    (`pipelines.timeouts.Retirement`): in a Ray actor its next call ends the process first.
    """

    name: str  # the stage of its error rows
    device: str  # where `load` put the model

    def __init__(self, spec: str, device: str | None = None, timeout_s: float | None = None,
                 drop_frames: bool = False, batch_frames: int = 16, threads: int | None = None):
        self.spec, self.timeout_s = spec, timeout_s  # timeout_s: per model call (`apply_per_clip`)
        self.drop_frames = drop_frames  # the last stage that needs the frames, and they are not stored
        self.batch_frames = int(batch_frames)  # frames per forward
        self.retirement = Retirement()
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.load(device)

    def load(self, device: str | None) -> None:
        """Load the model of ``self.spec`` onto ``device`` (None: the stage's default); set ``self.device``."""
        raise NotImplementedError

    def infer(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """`predict` under `gen1.devices.inference` (inference mode; autocast on CUDA). Entered here, in
        the thread that runs the call, since both are per thread."""
        from gen1.devices import inference

        with inference(self.device):
            return self.predict(clips)

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> one output array each."""
        raise NotImplementedError

    def store(self, row: dict[str, Any], out: np.ndarray) -> None:
        """Check one clip's output and write it into its row."""
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        self.retirement.check()
        rows = _rows(batch)
        apply_per_clip(rows, self.name, self.infer, clip_frames, self.store, self.timeout_s, self.retirement)
        return _frame(_without_frames(rows) if self.drop_frames else rows)


class DepthStage(ModelStage):
    """Per-clip depth (`gen1.depth.DepthEstimator`, normalised per clip) -> ``depth`` (float16 bytes)."""

    name = "depth"

    def load(self, device: str | None) -> None:
        from gen1.depth import DepthEstimator

        self.estimator = DepthEstimator(self.spec, device=device, batch_size=self.batch_frames)
        self.device = str(self.estimator.device)

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
    """Per-frame CLIP image embeddings (`gen1.clip.ClipEmbedder`) -> ``clip_embedding`` (float16 bytes), in
    the preset's content ``convention`` (`gen1.config.ContentConvention`): what the UNet trains on."""

    name = "clip"

    def __init__(self, spec: str, device: str | None = None, *, convention: ContentConvention = UNIT_CONTENT,
                 **kwargs: Any):
        self.convention = convention
        super().__init__(spec, device, **kwargs)

    def load(self, device: str | None) -> None:
        from gen1.clip import ClipEmbedder

        self.embedder = ClipEmbedder(self.spec, device=device, batch_size=self.batch_frames,
                                     convention=self.convention)
        self.device = str(self.embedder.device)

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
        from gen1.devices import default_device
        from gen1.weights import load_vae

        self.device = device or default_device()
        self.vae = load_vae(self.spec, device=self.device).eval()
        self.scale = float(getattr(self.vae.config, "scaling_factor", 1.0))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames uint8 (n, h, w, 3) -> float32 (n, c, h/8, w/8)."""
        from gen1.devices import to_device
        from gen1.video import frames_to_tensor

        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in np.array_split(frames, max(1, -(-len(frames) // self.batch_frames))):
            x = to_device(frames_to_tensor(chunk), self.device).to(dtype)
            out.append((self.vae.encode(x).latent_dist.mean * self.scale).float().cpu().numpy())
        return np.concatenate(out)

    def predict(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """clips: uint8 (f, h, w, 3) each -> float32 (c, f, h/8, w/8) each."""
        return [z.transpose(1, 0, 2, 3) for z in _by_shape(clips, self.encode)]  # (f, c, ..) -> (c, f, ..)

    def store(self, row: dict[str, Any], z: np.ndarray) -> None:
        row["latents"] = encode_array(z, "float16")[0]
        row["lat_c"], _, row["lat_h"], row["lat_w"] = (int(s) for s in z.shape)


class FusedModels:
    """Model stages run one after another in one actor: ``stages`` is ``[(ModelStage subclass, its keyword
    arguments), ...]``, each built once here and applied to each batch in order. Saves a process (its
    imports and its copy of the batch) per model on a CPU-only cluster, where the models share the cores.
    """

    def __init__(self, stages: Sequence[tuple[type[ModelStage], Mapping[str, Any]]]):
        self.stages = [cls(**dict(kwargs)) for cls, kwargs in stages]

    def __call__(self, batch: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        for stage in self.stages:
            batch = stage(batch)
        return batch if isinstance(batch, pd.DataFrame) else _frame(_rows(batch))


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
