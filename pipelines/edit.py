"""The mass-edit pipeline: clips -> captions -> edit prompts -> (clip x prompt x settings x seed) edits ->
mp4 + side-by-side preview + one manifest row per output, with the paper's metrics computed in the pass.

Three Ray Data passes, each over plain stage classes (``__call__(batch) -> pyarrow.Table``, callable
without Ray)::

    plan     list videos (driver) -> PlanStage (CPU tasks: probe, pick clips)      [pipelines.preprocess]
             (or an injected clip list: `EditClip`s, e.g. DAVIS sequences with their masks)
    prompts  clips lacking prompts -> CaptionStage (actor pool: BLIP on the middle frame)
             -> PromptStage (actor pool: template or chat writer) -> DST/prompts (driver commits)
    edits    clips x prompts x grid x seeds -> drop edit keys already in DST/manifest (driver)
             -> EditStage (actor pool, one Gen1Models per actor: edit, metrics, write mp4 + preview)
             -> DST/manifest and DST/errors (driver commits)

Why prompts are a pass of their own whose output is committed: an edit's identity, its `edit_key`,
hashes the prompt text, and a chat model does not write the same prompts twice. Committing the prompts
of each clip before editing lets a rerun find them, and so find the edits already made.

Layout under ``DST`` (any fsspec URI)::

    DST/outputs/<clip_id>/<edit_key>.mp4           edited videos
    DST/outputs/<clip_id>/<edit_key>.preview.mp4   input | depth | output
    DST/outputs/_tmp/<run_id>/...                  outputs being written (then renamed)
    DST/manifest/part-<run>-<n>.parquet            one row per output (MANIFEST_SCHEMA)
    DST/prompts/part-<run>-<n>.parquet             one row per (clip, prompt) written by a writer (PROMPTS_SCHEMA)
    DST/errors/part-<run>-<n>.parquet              failures (pipelines.schema.ERRORS_SCHEMA)
    DST/runs/edit-<run_id>.json                    config and summary of each run

Commit order makes reruns exact: an output is renamed into place before its manifest row exists, and
the driver commits manifest rows (atomically, `pipelines.schema.TableStore`) only after an actor has
returned them, so a committed row always has its mp4. A rerun skips committed edit keys; an edit killed
midway is redone (its half-written files live under ``_tmp`` and are replaced). Failures are data: a
video that cannot be probed, a clip that cannot be captioned, an edit that raises become `errors` rows
and the job goes on; edits neither committed nor failed when the stream ends become ``pipeline`` errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gen1.config import ConfigError, ModelSpecs, config_from_mapping, load_model_specs, read_yaml_mapping
from gen1.masks import read_mask
from gen1.prompts import ChatConfig, PromptSpec, PromptWriterError, make_prompt_writer, read_prompt_file
from pipelines.failures import (
    ERROR_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    apply_per_clip,
    error_record,
    error_table,
    healthy,
    mark_failed,
    with_error_columns,
)
from pipelines.schema import (
    EDIT_SCHEMA_VERSION,
    ERRORS_DIR,
    ERRORS_SCHEMA,
    MANIFEST_DIR,
    MANIFEST_SCHEMA,
    OUTPUTS_DIR,
    PROMPTS_DIR,
    PROMPTS_SCHEMA,
    RUNS_DIR,
    TMP_DIR,
    TableStore,
)
from pipelines.sources import (
    VIDEO_EXTENSIONS,
    PlanStage,
    is_manifest,
    list_videos,
    normalize_uri,
    read_manifest_rows,
)
from pipelines.timeouts import call_with_timeout, check_time_limits

logger = logging.getLogger(__name__)

GRID_KEYS = {
    "ts": "t_s",
    "t_s": "t_s",
    "w": "w",
    "wt": "w_t",
    "w_t": "w_t",
    "seed": "seeds",
    "seeds": "seeds",
}

_STATUS_FIELDS = [pa.field("status", pa.string()), *[pa.field(c, pa.string()) for c in ERROR_COLUMNS]]
# What an EditStage returns: a manifest row, or an error row (manifest columns null, error columns set).
RESULT_SCHEMA = pa.schema(
    [
        f.with_nullable(True)
        for f in MANIFEST_SCHEMA
        if f.name not in ("created_at", "run_id", "schema_version")
    ]
    + _STATUS_FIELDS
)
# What the prompt pass carries per clip.
PROMPT_PLAN_SCHEMA = pa.schema(
    [
        pa.field("clip", pa.binary()),  # pickled EditClip
        pa.field("clip_id", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("start", pa.int64()),
        pa.field("caption", pa.string()),  # "" until captioned
        pa.field("caption_model", pa.string()),  # "" when the caption was given
        pa.field("existing", pa.list_(pa.string())),  # prompts committed by earlier runs, kept first
        pa.field("prompts", pa.list_(pa.string())),
        pa.field("writer", pa.string()),
        *_STATUS_FIELDS,
    ]
)


# ------------------------------------------------------------------------------------------------ clips


@dataclass(frozen=True)
class EditClip:
    """One clip to edit: which frames of which video, at which size, with its own prompts or mask if any.

    ``width x height`` is the edit size (multiples of 8, in the source's orientation); ``fps`` is the
    output's (source fps / stride). ``prompts`` (e.g. a column of a source manifest, TGVE's prompts)
    replace the job's prompts for this clip; ``caption`` skips captioning. ``mask_uri``: an image (one
    mask for every frame) or a video aligned with the source; white = edit, black = keep.
    Subclasses override `load_frames` / `load_mask` for other storage (`SequenceClip`).
    """

    clip_id: str
    source_uri: str
    start: int
    stride: int
    frame_indices: tuple[int, ...]
    fps: float
    width: int
    height: int
    caption: str | None = None
    prompts: tuple[PromptSpec, ...] = ()
    mask_uri: str | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def masked(self) -> bool:
        return self.mask_uri is not None

    @property
    def mask_key(self) -> str:
        """What identifies the mask in an edit key ("" without a mask)."""
        return self.mask_uri or ""

    def load_frames(self) -> np.ndarray:
        """uint8 (f, height, width, 3)."""
        from gen1.video import read_frames, resize_center_crop

        frames = resize_center_crop(read_frames(self.source_uri, self.frame_indices), self.width, self.height)
        if len(frames) != self.num_frames:
            raise RuntimeError(
                f"clip {self.clip_id}: expected {self.num_frames} frames, decoded {len(frames)}"
            )
        return frames

    def middle_frame(self) -> np.ndarray:
        """uint8 (height, width, 3): the frame captions are made from (only that frame is decoded)."""
        from gen1.video import read_frames, resize_center_crop

        index = self.frame_indices[len(self.frame_indices) // 2]
        return resize_center_crop(read_frames(self.source_uri, [index]), self.width, self.height)[0]

    def load_mask(self) -> np.ndarray | None:
        """float32 (f, height, width) in {0, 1}, 1 = edit; None without a mask."""
        if self.mask_uri is None:
            return None
        return read_mask(self.mask_uri, self.frame_indices, self.width, self.height)

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.load_frames(), self.load_mask()

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any], **extra: Any) -> EditClip:
        """From a `pipelines.preprocess.PlanStage` row (or a `pipelines.sources.ClipPlan` dict)."""
        stride = int(plan["stride"])
        return cls(
            clip_id=str(plan["clip_id"]),
            source_uri=str(plan["source_uri"]),
            start=int(plan["start"]),
            stride=stride,
            frame_indices=tuple(int(i) for i in plan["frame_indices"]),
            fps=max(float(plan["fps"]) / stride, 1.0),
            width=int(plan["width"]),
            height=int(plan["height"]),
            **extra,
        )


@dataclass(frozen=True)
class SequenceClip(EditClip):
    """A clip of a video stored as numbered frames (`pipelines.datasets.VideoSequence`: DAVIS, TGVE),
    with the sequence's object masks when ``mask_objects`` is set (() = every object)."""

    sequence: Any = None  # pipelines.datasets.VideoSequence
    mask_objects: tuple[int, ...] | None = None  # None: no mask
    invert_mask: bool = False  # edit the background instead of the objects

    @property
    def masked(self) -> bool:
        return self.mask_objects is not None

    @property
    def mask_key(self) -> str:
        if self.mask_objects is None:
            return ""
        return f"objects={list(self.mask_objects) or 'all'};invert={self.invert_mask}"

    @staticmethod
    def _read(uri: str, mode: str) -> np.ndarray:
        from gen1.video import read_image

        return read_image(uri, mode)

    def load_frames(self) -> np.ndarray:
        from gen1.video import resize_center_crop

        frames = np.stack([self._read(self.sequence.frame_uris[i], "RGB") for i in self.frame_indices])
        return resize_center_crop(frames, self.width, self.height)

    def middle_frame(self) -> np.ndarray:
        from gen1.video import resize_center_crop

        index = self.frame_indices[len(self.frame_indices) // 2]
        return resize_center_crop(
            self._read(self.sequence.frame_uris[index], "RGB")[None], self.width, self.height
        )[0]

    def load_mask(self) -> np.ndarray | None:
        from pipelines.datasets import load_sequence_mask

        if self.mask_objects is None:
            return None
        objects = list(self.mask_objects) or None
        return load_sequence_mask(
            self.sequence, self.frame_indices, (self.width, self.height), objects, self.invert_mask
        )

    @classmethod
    def from_sequence(
        cls,
        seq: Any,
        frames: int,
        size: tuple[int, int],
        stride: int = 1,
        start: int = 0,
        mask_objects: Sequence[int] | None = None,
        invert_mask: bool = False,
        prompts: Sequence[PromptSpec] | None = None,
    ) -> SequenceClip:
        """``frames`` frames of ``seq`` ``stride`` apart (shrunk to fit short sequences), edited at ``size``
        (w, h) for landscape frames (transposed for portrait). ``prompts`` default to the sequence's own
        (TGVE), tagged with their kind; its caption is kept."""
        from gen1.video import clip_id, target_size
        from pipelines.datasets import choose_indices

        indices, used = choose_indices(seq.num_frames, frames, stride, start)
        h, w = cls._read(seq.frame_uris[indices[0]], "RGB").shape[:2]
        width, height = target_size(w, h, size)
        if prompts is None:
            prompts = [PromptSpec(text=t, tag=k) for k, t in (seq.prompts or {}).items()]
        return cls(
            clip_id=clip_id(seq.frames_uri, start, len(indices), used),
            source_uri=seq.frames_uri,
            start=start,
            stride=used,
            frame_indices=tuple(indices),
            fps=max(seq.fps / used, 1.0),
            width=width,
            height=height,
            caption=seq.caption,
            prompts=tuple(prompts),
            sequence=seq,
            mask_objects=None if mask_objects is None else tuple(mask_objects),
            invert_mask=invert_mask,
        )


def read_source_table(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A source manifest (CSV or Parquet) -> {normalised video URI: {prompts, caption, mask_uri}}.

    Columns: ``uri`` (required), and optionally ``prompt`` (a text prompt), ``image`` (a reference image
    URI), ``mask`` (a mask image/video URI), ``caption``. Several rows may name one video, one prompt
    each. Relative URIs resolve against the manifest's directory.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in read_manifest_rows(uri, ("uri", "image", "mask"), storage_options):
        entry = out.setdefault(row["uri"], {"prompts": [], "caption": None, "mask_uri": None})
        text = (row.get("prompt") or "").strip()
        if text:
            entry["prompts"].append(PromptSpec(text=text))
        if row.get("image"):
            entry["prompts"].append(PromptSpec(image_uri=row["image"]))
        if row.get("mask"):
            entry["mask_uri"] = row["mask"]
        if (row.get("caption") or "").strip():
            entry["caption"] = row["caption"].strip()
    return out


# ----------------------------------------------------------------------------------------- grid, keys


@dataclass(frozen=True)
class EditGrid:
    """The settings grid: every combination of t_s, w, w_t and seed is one edit per (clip, prompt)."""

    t_s: tuple[int, ...] = (3,)
    w: tuple[float, ...] = (7.5,)
    w_t: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("t_s", "w", "w_t", "seeds"):
            values = tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"grid {name}: expected at least one value")
            cast = int if name in ("t_s", "seeds") else float
            object.__setattr__(self, name, tuple(dict.fromkeys(cast(v) for v in values)))

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> EditGrid:
        """``["ts=1,5", "w=7.5", "wt=1.0,1.5", "seed=0,1"]`` -> EditGrid; unnamed keys keep defaults."""
        values: dict[str, list[str]] = {}
        for item in items or ():
            key, sep, vals = item.partition("=")
            name = GRID_KEYS.get(key.strip().lower())
            if not sep or name is None or not vals.strip():
                raise ConfigError(f"grid entry {item!r}: expected KEY=V1,V2,... with KEY in ts, w, wt, seed")
            values[name] = [v.strip() for v in vals.split(",") if v.strip()]
        try:
            return cls(**values)
        except ValueError as e:
            raise ConfigError(f"grid {list(items or ())}: {e}") from e

    def combinations(self) -> list[tuple[int, float, float, int]]:
        """(t_s, w, w_t, seed) tuples, in a stable order."""
        return list(itertools.product(self.t_s, self.w, self.w_t, self.seeds))

    def __len__(self) -> int:
        return len(self.t_s) * len(self.w) * len(self.w_t) * len(self.seeds)


def model_key(specs: ModelSpecs) -> dict[str, str]:
    """The weight specs that determine an edit's pixels."""
    return {c: getattr(specs, c) for c in ("vae", "unet", "clip", "depth", "prior")}


def edit_key(
    clip_id: str,
    content: str,
    t_s: int,
    w: float,
    w_t: float,
    seed: int,
    steps: int,
    sampler: str,
    models: Mapping[str, str],
    size: tuple[int, int],
    mask: str = "",
) -> str:
    """Stable id of one edit: sha1 hex[:20] of (clip id, content (`PromptSpec.key`), mask, t_s, w, w_t,
    seed, steps, sampler, the models' weight specs, output size)."""
    payload = [
        clip_id,
        content,
        mask,
        int(t_s),
        float(w),
        float(w_t),
        int(seed),
        int(steps),
        sampler,
        dict(sorted(models.items())),
        [int(size[0]), int(size[1])],
    ]
    return hashlib.sha1(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- config


@dataclass
class EditJobConfig:
    """Everything one `run_edit` needs. ``clips`` (an injected clip list, e.g. `SequenceClip`s for
    evaluation) replaces listing ``src``. Loadable with `from_yaml`; printed at job start."""

    dst: str
    src: str | None = None  # a directory/prefix, one video, or a CSV/Parquet manifest (pipelines.sources)
    models: str = "tiny"  # preset or YAML of weight specs
    prompts: tuple[
        PromptSpec, ...
    ] = ()  # every clip's prompts (a --prompts file), unless the clip has its own
    prompts_file: str | None = None  # read into ``prompts`` when set
    auto_prompts: int = 0  # N: caption each clip and write N prompts for it (clips without prompts)
    grid: EditGrid = field(default_factory=EditGrid)
    steps: int = 50
    sampler: str = "ddim"
    frames: int | None = None  # frames per clip (None: the model's window)
    stride: int = 1  # source frames between edited frames
    clips_per_video: int | None = 1  # clips per source video (None: every non-overlapping clip)
    size: tuple[int, int] | None = None  # (w, h) for landscape sources (None: the model's)
    limit: int | None = None  # edit only the first N clips
    clips: Sequence[EditClip] | None = None  # injected clips; ``src`` is then ignored
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    llm: ChatConfig | None = None  # chat endpoint for prompts (None: $GEN1_LLM_BASE_URL, else templates)
    prompt_seed: int = 0  # template writer variety
    previews: bool = True  # also write input | depth | output previews
    metrics: bool = True  # compute per-output metrics in the same pass
    # execution
    caption_batch_size: int = 8
    caption_concurrency: int = 1
    prompt_concurrency: int = 2  # chat requests in flight
    edit_batch_size: int = 1  # edits per actor call (the unit that is redone after a kill)
    edit_concurrency: int | None = None  # edit actors (None: one per GPU, else one per 4 CPUs)
    edit_num_gpus: float = 1.0  # per edit actor when the cluster has GPUs
    caption_num_gpus: float = 0.25
    actor_num_cpus: float = 0.5  # per model actor on a CPU-only cluster (< 1 so tasks are not starved)
    task_num_cpus: float = 0.25
    device: str | None = None  # None: cuda when the actor has a GPU, else cpu
    commit_every: int = 8  # manifest rows per committed part (a kill redoes at most this many edits)
    commit_interval_s: float = 60.0  # ... or fewer, once the oldest uncommitted row is this old
    max_failure_fraction: float = 0.1  # `gen1 edit` exits non-zero above this
    # Time limits (seconds; 0 or None: none). A call past its limit fails its clip or edit task alone with
    # error_type "timeout" (`pipelines.timeouts`) and the run goes on.
    decode_timeout_s: float | None = 120.0  # per clip decode (the edit's frames, the caption's middle frame)
    caption_timeout_s: float | None = 600.0  # per BLIP call (a batch, or one clip's on retry)
    edit_timeout_s: float | None = 3600.0  # per edit task: decode, sampling, metrics, writing
    ray_address: str | None = None
    num_cpus: int | None = None  # of a local Ray
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.grid, Mapping):
            self.grid = EditGrid(**self.grid)
        elif isinstance(self.grid, (list, tuple)):
            self.grid = EditGrid.parse(self.grid)
        self.prompts = tuple(
            p if isinstance(p, PromptSpec) else PromptSpec.parse(str(p)) for p in self.prompts
        )
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        if isinstance(self.llm, Mapping):
            self.llm = ChatConfig(**self.llm)
        self.extensions = tuple(self.extensions)
        if self.auto_prompts < 0:
            raise ConfigError(f"auto_prompts: expected N >= 0, found {self.auto_prompts}")
        for name in (
            "steps",
            "stride",
            "caption_batch_size",
            "caption_concurrency",
            "prompt_concurrency",
            "edit_batch_size",
            "commit_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)!r}")
        check_time_limits(self, ("decode_timeout_s", "caption_timeout_s", "edit_timeout_s"))
        if self.auto_prompts and (self.prompts or self.prompts_file):
            raise ConfigError("give prompts (a file or a list) or auto_prompts, not both")
        if self.src is None and self.clips is None:
            raise ConfigError("nothing to edit: give src (videos or a manifest) or clips")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EditJobConfig:
        """Fields from a YAML mapping, then ``overrides`` (None values ignored)."""
        return config_from_mapping(cls, read_yaml_mapping(path, "edit settings"), path, overrides)

    def as_dict(self) -> dict[str, Any]:
        """For logs and run records: no secrets, no pixels."""
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("clips", "llm", "prompts", "grid", "storage_options")
        }
        d["grid"] = dataclasses.asdict(self.grid)
        d["prompts"] = [p.key for p in self.prompts]
        d["clips"] = None if self.clips is None else f"{len(self.clips)} injected clips"
        d["llm"] = self.llm.describe() if self.llm else None
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d


# ---------------------------------------------------------------------------------------------- stages


def _rows(batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> list[dict[str, Any]]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    df = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(dict(batch))
    return df.to_dict("records")


def _stage_rows(batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows with ``status`` and the error columns set (null ones read as a healthy row's)."""
    rows = _rows(batch)
    for row in rows:
        for col in ("status", *ERROR_COLUMNS):
            if row.get(col) is None:
                row.pop(col, None)
        with_error_columns(row)
    return rows


def _clip(row: Mapping[str, Any]) -> EditClip:
    return pickle.loads(row["clip"])


class CaptionStage:
    """Caption each clip's middle frame with BLIP (`gen1.captions.Captioner`), one batched call per batch.

    Rows that already have a caption pass through; a clip that fails alone becomes an error row of stage
    ``caption``. ``timeout_s`` limits each BLIP call and ``decode_timeout_s`` each middle-frame decode: a
    clip past either fails alone with error_type ``timeout``.
    batch: PROMPT_PLAN_SCHEMA rows -> pyarrow Table of PROMPT_PLAN_SCHEMA.
    """

    def __init__(
        self,
        spec: str,
        device: str | None = None,
        captioner: Any = None,
        timeout_s: float | None = None,
        decode_timeout_s: float | None = None,
    ):
        if captioner is None:
            from gen1.captions import Captioner

            captioner = Captioner(spec, device=device)
        self.spec = spec
        self.captioner = captioner
        self.timeout_s, self.decode_timeout_s = timeout_s, decode_timeout_s

    def middle_frame(self, row: Mapping[str, Any]) -> np.ndarray:
        clip = _clip(row)
        return call_with_timeout(
            clip.middle_frame, self.decode_timeout_s, what=f"decode of clip {clip.clip_id}"
        )

    def __call__(self, batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> pa.Table:
        rows = _stage_rows(batch)
        todo = [r for r in rows if not r["caption"]]

        def store(row: dict[str, Any], caption: str) -> None:
            row["caption"], row["caption_model"] = caption, self.spec

        apply_per_clip(todo, "caption", self.captioner, self.middle_frame, store, self.timeout_s)
        return pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)


class PromptStage:
    """Write ``n`` prompts per clip from its caption (template or chat writer, `gen1.prompts`), keeping the
    clip's ``existing`` prompts first. A failure becomes an error row of stage ``prompts``."""

    def __init__(self, n: int, llm: ChatConfig | None = None, seed: int = 0):
        self.n, self.llm, self.seed = n, llm, seed
        self._writer = None  # made where the stage runs (a chat writer holds an HTTP session)

    @property
    def writer(self):
        if self._writer is None:
            from gen1.prompts import TemplateWriter

            self._writer = (
                make_prompt_writer(self.llm) if self.llm is not None else TemplateWriter(seed=self.seed)
            )
        return self._writer

    def __call__(self, batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> pa.Table:
        rows = _stage_rows(batch)
        for row in rows:
            if not healthy(row):
                continue
            try:
                existing = list(row.get("existing") or [])
                written = self.writer.write(row["caption"], self.n)
                merged = list(dict.fromkeys(existing + list(written)))[: self.n]
                if len(merged) < self.n:
                    raise PromptWriterError(
                        f"{self.writer.name} writer gave {len(written)} prompts, {len(merged)} distinct with the "
                        f"{len(existing)} already committed; {self.n} needed"
                    )
                row["prompts"], row["writer"] = merged, self.writer.name
            except Exception as e:
                mark_failed(row, "prompts", e)
        return pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)


class EditStage:
    """Edit tasks -> outputs: per task, load the clip (cached), edit it (`gen1.sampling.edit_video`),
    compute its metrics, write the mp4 and preview atomically under DST, and return its manifest row.

    One `Gen1Models` per actor. A task that raises becomes an error row naming its stage (``decode``,
    ``content``, ``edit``, ``metrics``, ``write``); the other tasks of the batch go on. A clip decode past
    ``decode_timeout_s``, or a whole task past ``edit_timeout_s``, fails that task alone with error_type
    ``timeout`` and the stage it was in (its thread is abandoned, see `pipelines.timeouts`).
    batch: task rows (`plan_tasks`) -> pyarrow Table of RESULT_SCHEMA.
    """

    def __init__(
        self,
        specs: ModelSpecs,
        dst: str,
        run_id: str,
        device: str | None = None,
        previews: bool = True,
        metrics: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        models: Any = None,
        cache_clips: int = 4,
        decode_timeout_s: float | None = None,
        edit_timeout_s: float | None = None,
    ):
        if models is None:
            from gen1.models import Gen1Models

            models = Gen1Models.load(specs, device=device)
        self.specs, self.models = specs, models
        self.store = TableStore(dst, storage_options)
        self.run_id = run_id
        self.previews, self.metrics = previews, metrics
        self._clips: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_clips = cache_clips
        self.decode_timeout_s, self.edit_timeout_s = decode_timeout_s, edit_timeout_s

    def __call__(self, batch: pa.Table | pd.DataFrame | Mapping[str, Any]) -> pa.Table:
        out = []
        for task in _rows(batch):
            stage = ["decode"]
            try:
                row = call_with_timeout(
                    self.edit, self.edit_timeout_s, task, stage, what=f"edit {task['edit_key']}"
                )
                out.append(with_error_columns(row))
            except Exception as e:
                row = {k: task.get(k) for k in RESULT_SCHEMA.names if k in task}
                out.append(mark_failed(with_error_columns(row), stage[0], e))
        return pa.Table.from_pylist(
            [{k: r.get(k) for k in RESULT_SCHEMA.names} for r in out], schema=RESULT_SCHEMA
        )

    # -- pieces

    def _load_clip(self, clip: EditClip) -> tuple[np.ndarray, np.ndarray | None]:
        if clip.clip_id in self._clips:
            self._clips.move_to_end(clip.clip_id)
            return self._clips[clip.clip_id]
        loaded = clip.load()
        self._clips[clip.clip_id] = loaded
        while len(self._clips) > self.cache_clips:
            self._clips.popitem(last=False)
        return loaded

    def _load_image(self, uri: str) -> np.ndarray:
        from gen1.video import read_image

        if uri not in self._images:
            self._images[uri] = read_image(uri)
            while len(self._images) > 16:
                self._images.popitem(last=False)
        return self._images[uri]

    def _paths(self, clip_id: str, key: str) -> dict[str, tuple[str, str]]:
        """name -> (tmp path, final path) of each file of one output."""
        names = {"output": f"{key}.mp4"}
        if self.previews:
            names["preview"] = f"{key}.preview.mp4"
        return {
            k: (
                self.store.path(OUTPUTS_DIR, TMP_DIR, self.run_id, n),
                self.store.path(OUTPUTS_DIR, clip_id, n),
            )
            for k, n in names.items()
        }

    def _uri(self, path: str) -> str:
        return normalize_uri(self.store.uri(path))

    def compute_metrics(
        self, frames: np.ndarray, depth_in: np.ndarray, content: Any
    ) -> dict[str, float | None]:
        """The manifest's metric columns for output ``frames`` uint8 (f, h, w, 3) of an input with depth
        ``depth_in`` (f, h, w); prompt consistency against the text, or the reference image for image
        content."""
        from gen1.metrics import (
            depth_fidelity,
            flow_warp_error,
            frame_consistency,
            frame_consistency_all_pairs,
            prompt_consistency,
        )

        clip_model = self.models.content.clip
        emb = clip_model.embed_images(frames).float().cpu()  # (f, d)
        if content.text is not None:
            target = clip_model.embed_texts([content.text])[0]
        else:
            target = clip_model.embed_images(content.image[None])[0]
        many = len(frames) >= 2
        depth_out = self.models.structure.depth(frames)
        return {
            "frame_consistency": frame_consistency(emb) if many else None,
            "frame_consistency_all_pairs": frame_consistency_all_pairs(emb) if many else None,
            "prompt_consistency": prompt_consistency(emb, target.float().cpu()),
            "flow_warp_error": flow_warp_error(frames) if many else None,
            "depth_fidelity": depth_fidelity(depth_in, depth_out.float().cpu().numpy()),
        }

    def edit(self, task: Mapping[str, Any], stage: list[str]) -> dict[str, Any]:
        """One task -> its manifest row (without run_id/created_at); ``stage[0]`` tracks where it is."""
        from gen1.preview import depth_to_rgb, side_by_side
        from gen1.sampling import Content, EditSettings, edit_video
        from gen1.video import write_video

        t0 = time.perf_counter()
        clip = _clip(task)
        stage[0] = "decode"
        frames, mask = call_with_timeout(
            self._load_clip, self.decode_timeout_s, clip, what=f"decode of clip {clip.clip_id}"
        )
        stage[0] = "content"
        if task["image_uri"]:
            content = Content(image=self._load_image(task["image_uri"]), image_uri=task["image_uri"])
        else:
            content = Content(text=task["prompt"])
        stage[0] = "edit"
        settings = EditSettings(
            structure_strength=int(task["t_s"]),
            guidance=float(task["w"]),
            temporal_guidance=float(task["w_t"]),
            steps=int(task["steps"]),
            seed=int(task["seed"]),
            sampler=task["sampler"],
        )
        result = edit_video(self.models, frames, content, settings, mask=mask)
        stage[0] = "metrics"
        metrics = self.compute_metrics(result.frames, result.depth, content) if self.metrics else {}
        stage[0] = "write"
        paths = self._paths(clip.clip_id, task["edit_key"])
        write_video(result.frames, self.store.uri(paths["output"][0]), clip.fps)
        if "preview" in paths:
            preview = side_by_side(frames, depth_to_rgb(result.depth), result.frames)
            write_video(preview, self.store.uri(paths["preview"][0]), clip.fps)
        for tmp, final in paths.values():  # outputs first, the manifest row (by the driver) after
            _move(self.store, tmp, final)
        f, h, w, _ = result.frames.shape
        return {
            **{
                k: task[k]
                for k in (
                    "edit_key",
                    "clip_id",
                    "source_uri",
                    "caption",
                    "prompt",
                    "prompt_index",
                    "prompt_source",
                    "prompt_tag",
                    "image_uri",
                    "t_s",
                    "w",
                    "w_t",
                    "seed",
                    "steps",
                    "sampler",
                    "caption_model",
                )
            },
            "start": clip.start,
            "stride": clip.stride,
            "frame_indices": list(clip.frame_indices),
            "num_frames": f,
            "width": w,
            "height": h,
            "fps": clip.fps,
            "content_kind": content.kind,
            "masked": mask is not None,
            "mask": clip.mask_key or None,
            "output_uri": self._uri(paths["output"][1]),
            "preview_uri": self._uri(paths["preview"][1]) if "preview" in paths else None,
            **{
                k: metrics.get(k)
                for k in (
                    "frame_consistency",
                    "frame_consistency_all_pairs",
                    "prompt_consistency",
                    "flow_warp_error",
                    "depth_fidelity",
                )
            },
            "models": self.specs.name,
            "vae_model": self.specs.vae,
            "unet_model": self.specs.unet,
            "clip_model": self.specs.clip,
            "depth_model": self.specs.depth,
            "prior_model": self.specs.prior,
            "tiny_models": self.specs.is_tiny,
            "seconds": float(result.seconds),
            "total_seconds": time.perf_counter() - t0,
            "unet_forwards": int(result.unet_forwards),
            "device": str(self.models.device),
        }


def _move(store: TableStore, tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` (replacing a leftover of an edit that was killed before its row)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(store.fs, LocalFileSystem):
        store.fs.makedirs(store.fs._parent(final), exist_ok=True)
        os.replace(tmp, final)
    else:
        store.fs.mv(tmp, final)


# -------------------------------------------------------------------------------------------- planning


def plan_tasks(
    clips: Iterable[EditClip],
    prompts_for: Mapping[str, Sequence[tuple[PromptSpec, str, str | None, str | None]]],
    grid: EditGrid,
    steps: int,
    sampler: str,
    specs: ModelSpecs,
) -> list[dict[str, Any]]:
    """The cross product clips x prompts x grid: one task row per edit, unique by edit key, grouped by clip.

    ``prompts_for[clip_id]``: (prompt, prompt_source, caption, caption_model) per prompt of the clip.
    """
    from gen1.schedule import SAMPLERS

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler: expected one of {SAMPLERS}, found {sampler!r}")
    models = model_key(specs)
    tasks: dict[str, dict[str, Any]] = {}
    for clip in clips:
        blob = pickle.dumps(clip)
        for index, (prompt, source, caption, caption_model) in enumerate(prompts_for.get(clip.clip_id, ())):
            for t_s, w, w_t, seed in grid.combinations():
                key = edit_key(
                    clip.clip_id,
                    prompt.key,
                    t_s,
                    w,
                    w_t,
                    seed,
                    steps,
                    sampler,
                    models,
                    (clip.width, clip.height),
                    clip.mask_key,
                )
                if key in tasks:
                    logger.warning("clip %s: prompt %r repeats; editing it once", clip.clip_id, prompt.key)
                    continue
                tasks[key] = {
                    "edit_key": key,
                    "clip": blob,
                    "clip_id": clip.clip_id,
                    "source_uri": clip.source_uri,
                    "start": clip.start,
                    "caption": caption,
                    "caption_model": caption_model,
                    "prompt": prompt.text,
                    "image_uri": prompt.image_uri,
                    "prompt_index": index,
                    "prompt_source": source,
                    "prompt_tag": prompt.tag,
                    "t_s": t_s,
                    "w": w,
                    "w_t": w_t,
                    "seed": seed,
                    "steps": steps,
                    "sampler": sampler,
                }
    return list(tasks.values())


# ---------------------------------------------------------------------------------------------- tables


def _read_table(dst: str, table: str, schema: pa.Schema, storage_options=None) -> pa.Table:
    return TableStore(dst, storage_options).read_all(table, schema)


def read_manifest(dst: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every committed manifest row under ``dst`` (MANIFEST_SCHEMA), one per edit key (the last)."""
    table = _read_table(dst, MANIFEST_DIR, MANIFEST_SCHEMA, storage_options)
    keys = table.column("edit_key").to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    if len(last) != len(keys):
        logger.warning("%s: %d duplicate manifest rows ignored", dst, len(keys) - len(last))
        table = table.take(sorted(last.values()))
    return table


def read_prompts(dst: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every committed prompt row under ``dst`` (PROMPTS_SCHEMA)."""
    return _read_table(dst, PROMPTS_DIR, PROMPTS_SCHEMA, storage_options)


def _committed_prompts(dst: str, storage_options) -> dict[str, list[dict[str, Any]]]:
    """clip id -> its committed prompt rows, by prompt index (first row of each index wins)."""
    by_clip: dict[str, dict[int, dict[str, Any]]] = {}
    for row in read_prompts(dst, storage_options).to_pylist():
        by_clip.setdefault(row["clip_id"], {}).setdefault(int(row["prompt_index"]), row)
    return {c: [rows[i] for i in sorted(rows)] for c, rows in by_clip.items()}


class _Committer:
    """The driver's commits of one table: buffers rows and writes them as one part (atomically) once
    ``every`` rows are pending or the oldest has waited ``max_wait_s``, and on `flush`."""

    def __init__(
        self,
        store: TableStore,
        table: str,
        schema: pa.Schema,
        run_id: str,
        every: int,
        max_wait_s: float = 60.0,
    ):
        self.store, self.table, self.schema, self.run_id = store, table, schema, run_id
        self.every, self.max_wait_s = every, max_wait_s
        self.pending: list[dict[str, Any]] = []
        self.since = 0.0  # when the oldest pending row arrived
        self.parts = 0
        self.rows = 0

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.pending.extend(rows)
        if len(self.pending) >= self.every or time.monotonic() - self.since >= self.max_wait_s:
            self.flush()

    def _table(self) -> pa.Table:
        return pa.Table.from_pylist(self.pending, schema=self.schema)

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = self.store.write_tmp(self.table, self._table(), self.run_id)
        self.parts += 1
        infix = "-edit" if self.table == ERRORS_DIR else ""  # errors/ is shared with preprocess runs
        final = self.store.commit(self.table, tmp, f"{self.run_id}{infix}-{self.parts:05d}")
        logger.info("committed %s (%d rows)", self.store.uri(final), len(self.pending))
        self.rows += len(self.pending)
        self.pending = []


class _ErrorCommitter(_Committer):
    def __init__(self, store: TableStore, run_id: str, every: int, max_wait_s: float = 60.0):
        super().__init__(store, ERRORS_DIR, ERRORS_SCHEMA, run_id, every, max_wait_s)

    def _table(self) -> pa.Table:
        return error_table(self.pending, self.run_id)


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class EditSummary:
    run_id: str
    dst: str
    videos: int = 0
    clips: int = 0  # clips planned (ok)
    clips_failed: int = 0  # videos that failed planning + clips that failed captioning / prompting
    tasks: int = 0  # edits the job asks for (clips x prompts x grid)
    skipped: int = 0  # already in the manifest before this run
    ok: int = 0  # edits committed by this run
    failed: int = 0  # edits that ended in `errors`
    seconds: float = 0.0
    tiny_models: bool = False
    error: str | None = None  # what stopped the stream, if anything

    @property
    def edits_per_minute(self) -> float:
        return 60.0 * self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_fraction(self) -> float:
        done = self.ok + self.failed + self.clips_failed
        return (self.failed + self.clips_failed) / done if done else 0.0

    def line(self) -> str:
        tiny = " [TINY RANDOM MODELS]" if self.tiny_models else ""
        return (
            f"edit {self.run_id}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped of {self.tasks} edits "
            f"({self.clips} clips, {self.clips_failed} failed) in {self.seconds:.1f}s "
            f"({self.edits_per_minute:.1f} edits/min) -> {self.dst}{tiny}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "edits_per_minute": self.edits_per_minute,
            "failure_fraction": self.failure_fraction,
        }


def _resources(config: EditJobConfig) -> dict[str, Any]:
    """Actor sizes and counts from the cluster: GPUs per actor when the cluster has GPUs, else a CPU
    fraction; checks that the actors leave CPU for Ray Data's tasks (a pool claiming every CPU hangs)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus > 0:
        concurrency = config.edit_concurrency or max(1, int(gpus // config.edit_num_gpus))
        if concurrency * config.edit_num_gpus > gpus:
            raise ConfigError(
                f"{concurrency} edit actors x {config.edit_num_gpus:g} GPUs exceed the cluster's {gpus:g}"
            )
        edit = {"num_gpus": config.edit_num_gpus, "num_cpus": min(1.0, config.actor_num_cpus)}
        caption = {
            "num_gpus": min(config.caption_num_gpus, gpus),
            "num_cpus": min(1.0, config.actor_num_cpus),
        }
    else:
        concurrency = config.edit_concurrency or max(1, int(cpus // 4))
        edit = {"num_gpus": 0, "num_cpus": config.actor_num_cpus}
        caption = {"num_gpus": 0, "num_cpus": config.actor_num_cpus}
    claimed = concurrency * edit["num_cpus"]
    if claimed + config.task_num_cpus > cpus:
        raise ConfigError(
            f"{concurrency} edit actors claim {claimed:g} of the cluster's {cpus:g} CPUs, leaving less than "
            f"task_num_cpus={config.task_num_cpus:g} for Ray Data's tasks (the job would hang); lower "
            f"edit_concurrency or actor_num_cpus"
        )
    return {"edit": edit, "edit_concurrency": concurrency, "caption": caption, "gpus": gpus, "cpus": cpus}


def _plan_clips(
    config: EditJobConfig, size: tuple[int, int], frames: int, summary: EditSummary, errors: _ErrorCommitter
) -> list[EditClip]:
    """The clips to edit: injected, or listed from ``src`` and planned on the cluster (PlanStage)."""
    import ray


    if config.clips is not None:
        clips = list(config.clips)
    else:
        table = read_source_table(config.src, config.storage_options) if is_manifest(config.src) else {}
        uris = (
            list(table)
            if table
            else list_videos(config.src, config.extensions, storage_options=config.storage_options)
        )
        summary.videos = len(uris)
        clips = []
        if uris:
            ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=min(len(uris), 200))
            ds = ds.map_batches(
                PlanStage(frames, config.stride, config.clips_per_video, size),
                batch_size=1,
                batch_format="pandas",
                num_cpus=config.task_num_cpus,
            )
            for row in ds.take_all():
                if row["status"] != STATUS_OK:
                    errors.add([error_record(row)])
                    summary.clips_failed += 1
                    continue
                extra = table.get(row["source_uri"], {})
                clips.append(
                    EditClip.from_plan(
                        row,
                        caption=extra.get("caption"),
                        prompts=tuple(extra.get("prompts", ())),
                        mask_uri=extra.get("mask_uri"),
                    )
                )
        clips.sort(key=lambda c: (c.source_uri, c.start))
    unique = list({c.clip_id: c for c in clips}.values())
    if len(unique) != len(clips):
        logger.warning("%d duplicate clips dropped", len(clips) - len(unique))
    return unique[: config.limit] if config.limit is not None else unique


def _write_prompts(
    config: EditJobConfig,
    clips: list[EditClip],
    specs: ModelSpecs,
    store: TableStore,
    run_id: str,
    res: dict[str, Any],
    summary: EditSummary,
    errors: _ErrorCommitter,
) -> None:
    """Caption and write prompts for clips with fewer committed prompts than ``auto_prompts``."""
    import ray

    committed = _committed_prompts(config.dst, config.storage_options)
    rows = []
    for clip in clips:
        have = committed.get(clip.clip_id, [])
        if clip.prompts or len(have) >= config.auto_prompts:
            continue
        caption = have[0]["caption"] if have else clip.caption
        caption_model = have[0]["caption_model"] if have else None
        rows.append(
            with_error_columns(
                {
                    "clip": pickle.dumps(clip),
                    "clip_id": clip.clip_id,
                    "source_uri": clip.source_uri,
                    "start": clip.start,
                    "caption": caption or "",
                    "caption_model": caption_model or "",
                    "existing": [r["prompt"] for r in have],
                    "prompts": [],
                    "writer": "",
                }
            )
        )
    if not rows:
        return
    logger.info(
        "writing prompts for %d clips (%d captions to make)", len(rows), sum(not r["caption"] for r in rows)
    )
    ds = ray.data.from_items(
        rows, override_num_blocks=max(1, math.ceil(len(rows) / config.caption_batch_size))
    )
    if any(not r["caption"] for r in rows):
        ds = ds.map_batches(
            CaptionStage,
            fn_constructor_kwargs={
                "spec": specs.caption,
                "device": config.device,
                "timeout_s": config.caption_timeout_s,
                "decode_timeout_s": config.decode_timeout_s,
            },
            batch_size=config.caption_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.caption_concurrency),
            **res["caption"],
        )
    llm = config.llm if config.llm is not None else ChatConfig.from_env()  # resolved here, not on workers
    logger.info(
        "prompt writer: %s", f"chat {llm.describe()}" if llm else f"templates (seed {config.prompt_seed})"
    )
    ds = ds.map_batches(  # CPU tasks; `concurrency` bounds the requests in flight to a chat endpoint
        PromptStage(config.auto_prompts, llm, config.prompt_seed),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=config.task_num_cpus,
        concurrency=config.prompt_concurrency,
    )
    prompts = _Committer(store, PROMPTS_DIR, PROMPTS_SCHEMA, run_id, every=256)
    now = dt.datetime.now(dt.UTC)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            if row["status"] != STATUS_OK:
                errors.add([error_record(row)])
                summary.clips_failed += 1
                continue
            new = [
                {
                    "clip_id": row["clip_id"],
                    "source_uri": row["source_uri"],
                    "caption": row["caption"],
                    "caption_model": row["caption_model"] or None,
                    "prompt_index": i,
                    "prompt": p,
                    "writer": row["writer"],
                    "run_id": run_id,
                    "created_at": now,
                    "schema_version": EDIT_SCHEMA_VERSION,
                }
                for i, p in enumerate(row["prompts"])
                if i >= len(row["existing"] or [])
            ]
            prompts.add(new)
    prompts.flush()


def _prompts_for(config: EditJobConfig, clips: list[EditClip]) -> dict[str, list[tuple]]:
    """clip id -> [(prompt, source, caption, caption_model)]: the clip's own, else the job's, else the
    committed written ones."""
    committed = _committed_prompts(config.dst, config.storage_options) if config.auto_prompts else {}
    out: dict[str, list[tuple]] = {}
    for clip in clips:
        if clip.prompts:
            out[clip.clip_id] = [(p, "clip", clip.caption, None) for p in clip.prompts]
        elif config.prompts:
            out[clip.clip_id] = [(p, "user", clip.caption, None) for p in config.prompts]
        elif config.auto_prompts:
            rows = committed.get(clip.clip_id, [])[: config.auto_prompts]
            out[clip.clip_id] = [
                (PromptSpec(text=r["prompt"]), r["writer"], r["caption"], r["caption_model"]) for r in rows
            ]
    return out


def run_edit(config: EditJobConfig) -> EditSummary:
    """Mass-edit ``config.src`` (or ``config.clips``) into ``config.dst``; see the module docstring."""
    import ray

    from gen1.models import check_weights
    from pipelines.preprocess import init_ray, new_run_id

    if config.prompts_file:
        config.prompts = tuple(read_prompt_file(config.prompts_file))
    if not (
        config.prompts
        or config.auto_prompts
        or config.clips is not None
        or (config.src and is_manifest(config.src))
    ):
        raise ConfigError(
            "no prompts: pass a prompts file, auto_prompts N, or a source manifest with prompts"
        )
    specs = load_model_specs(config.models)
    size = config.size or (specs.width, specs.height)
    frames = config.frames or specs.frames
    needs_caption = bool(config.auto_prompts)
    check_weights(specs, ("vae", "unet", "clip", "depth", "prior") + (("caption",) if needs_caption else ()))
    run_id = new_run_id()
    logger.info(
        "edit %s -> %s, run %s, models %s\nconfig: %s",
        config.src or "<injected clips>",
        config.dst,
        run_id,
        specs.label(),
        json.dumps(config.as_dict(), default=str),
    )
    if specs.is_tiny:
        logger.warning("tiny random models: the outputs are plumbing checks, not real edits")
    t0 = time.monotonic()
    store = TableStore(config.dst, config.storage_options)
    summary = EditSummary(run_id=run_id, dst=config.dst, tiny_models=specs.is_tiny)
    errors = _ErrorCommitter(store, run_id, config.commit_every, config.commit_interval_s)
    started = init_ray(config.ray_address, config.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = config.progress
        res = _resources(config)
        clips = _plan_clips(config, size, frames, summary, errors)
        errors.flush()
        summary.clips = len(clips)
        if config.auto_prompts:
            _write_prompts(config, clips, specs, store, run_id, res, summary, errors)
            errors.flush()
        prompts_for = _prompts_for(config, clips)
        unprompted = [c.clip_id for c in clips if not prompts_for.get(c.clip_id)]
        if unprompted:
            logger.warning(
                "%d clips have no prompts and are not edited (first: %s)", len(unprompted), unprompted[0]
            )
        tasks = plan_tasks(clips, prompts_for, config.grid, config.steps, config.sampler, specs)
        done = set(read_manifest(config.dst, config.storage_options).column("edit_key").to_pylist())
        todo = [t for t in tasks if t["edit_key"] not in done]
        summary.tasks, summary.skipped = len(tasks), len(tasks) - len(todo)
        logger.info(
            "%d clips -> %d edits: %d to do, %d already in %s",
            len(clips),
            len(tasks),
            len(todo),
            summary.skipped,
            config.dst,
        )
        if todo:
            _run_edits(config, specs, todo, store, run_id, res, summary, errors, done)
    finally:
        summary.seconds = time.monotonic() - t0
        for table in (MANIFEST_DIR, PROMPTS_DIR, ERRORS_DIR, OUTPUTS_DIR):
            store.remove_tmp(table, run_id)
        if started:
            ray.shutdown()
    _write_run_record(store, run_id, config, summary)
    logger.info("%s", summary.line())
    return summary


def _run_edits(
    config: EditJobConfig,
    specs: ModelSpecs,
    todo: list[dict[str, Any]],
    store: TableStore,
    run_id: str,
    res: dict[str, Any],
    summary: EditSummary,
    errors: _ErrorCommitter,
    done: set[str],
) -> None:
    import ray

    manifest = _Committer(
        store, MANIFEST_DIR, MANIFEST_SCHEMA, run_id, config.commit_every, config.commit_interval_s
    )
    finished: set[str] = set()
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / config.edit_batch_size)))
    ds = ds.map_batches(
        EditStage,
        fn_constructor_kwargs={
            "specs": specs,
            "dst": config.dst,
            "run_id": run_id,
            "device": config.device,
            "previews": config.previews,
            "metrics": config.metrics,
            "storage_options": config.storage_options,
            "decode_timeout_s": config.decode_timeout_s,
            "edit_timeout_s": config.edit_timeout_s,
        },
        batch_size=config.edit_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res["edit_concurrency"]),
        **res["edit"],
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            now = dt.datetime.now(dt.UTC)
            for row in batch.to_pylist():
                key = row["edit_key"]
                if key in done or key in finished:
                    logger.warning("edit %s came back twice; keeping the first", key)
                    continue
                finished.add(key)
                if row["status"] == STATUS_ERROR:
                    errors.add([{**error_record(row), "message": f"edit {key}: {row['error_message']}"}])
                    summary.failed += 1
                    continue
                manifest.add(
                    [
                        {
                            **{k: row[k] for k in MANIFEST_SCHEMA.names if k in row},
                            "run_id": run_id,
                            "created_at": now,
                            "schema_version": EDIT_SCHEMA_VERSION,
                        }
                    ]
                )
                summary.ok += 1
    except Exception as e:  # the stream broke: what is not committed becomes a pipeline error
        logger.exception("the edit stream stopped early: %s", e)
        summary.error = f"{type(e).__name__}: {e}"
    finally:
        manifest.flush()
        errors.flush()
    missing = [t for t in todo if t["edit_key"] not in finished]
    if missing:
        message = f"the pipeline ended without this edit: {summary.error or 'no result came back'}"
        errors.add(
            [
                {
                    "clip_id": t["clip_id"],
                    "uri": t["source_uri"],
                    "start": None,
                    "stage": "pipeline",
                    "error_type": "MissingOutput",
                    "message": f"edit {t['edit_key']}: {message}",
                }
                for t in missing
            ]
        )
        errors.flush()
        summary.failed += len(missing)


def _write_run_record(store: TableStore, run_id: str, config: EditJobConfig, summary: EditSummary) -> None:
    path = store.path(RUNS_DIR, f"edit-{run_id}.json")
    record = {"run_id": run_id, "kind": "edit", "config": config.as_dict(), "summary": summary.as_dict()}
    try:
        store.fs.makedirs(store.path(RUNS_DIR), exist_ok=True)
        store.fs.pipe_file(path, json.dumps(record, indent=2, default=str).encode())
    except Exception:
        logger.exception("could not write the run record %s", store.uri(path))
