"""The stages of the edit pipeline's Ray Data passes: plain classes, ``__call__(batch) -> pyarrow.Table``,
callable without Ray.

- `CaptionStage` (actor pool): BLIP captions of each clip's middle frame;
- `PromptStage` (CPU tasks): a template or chat writer turns a caption into edit prompts;
- `EditStage` (actor pool, one `Gen1Models` per actor, and each other editor of the job once it is
  needed, `gen1.editors`): edit, measure (`gen1.metrics.video_metrics`), write the mp4 and preview, return
  the output's manifest row.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gen1.config import ModelSpecs
from gen1.prompts import ChatConfig, ChatEndpointDown, PromptWriterError, TemplateWriter, make_prompt_writer
from pipelines.cache import LRUCache
from pipelines.edit.clips import EditClip
from pipelines.edit.keys import model_key
from pipelines.failures import (
    ERROR_COLUMNS,
    apply_per_clip,
    batch_rows,
    healthy,
    mark_failed,
    stage_rows,
    with_error_columns,
)
from pipelines.schema import EDIT_SCHEMA_VERSION, MANIFEST_SCHEMA, OUTPUTS_DIR, TMP_DIR, TableStore
from pipelines.sources import normalize_uri
from pipelines.timeouts import Cancellation, Retirement, call_with_timeout

logger = logging.getLogger(__name__)

Batch = pa.Table | pd.DataFrame | Mapping[str, Any]

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
# The manifest columns an EditStage fills in (the driver adds run_id, created_at, schema_version).
OUTPUT_COLUMNS = tuple(n for n in RESULT_SCHEMA.names if n not in ("status", *ERROR_COLUMNS))
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


def prompt_plan_row(clip: EditClip, committed: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt pass's row (PROMPT_PLAN_SCHEMA) of ``clip``, whose ``committed`` prompt rows (by index)
    are kept first and whose caption, if any, is reused."""
    return with_error_columns(
        {
            "clip": pickle.dumps(clip),
            "clip_id": clip.clip_id,
            "source_uri": clip.source_uri,
            "start": clip.start,
            "caption": (committed[0]["caption"] if committed else clip.caption) or "",
            "caption_model": (committed[0]["caption_model"] if committed else None) or "",
            "existing": [r["prompt"] for r in committed],
            "prompts": [],
            "writer": "",
        }
    )


def written_prompt_rows(row: Mapping[str, Any], run_id: str, created_at: Any) -> list[dict[str, Any]]:
    """A healthy row of the prompt pass -> its new prompts as rows of PROMPTS_SCHEMA (not the existing)."""
    return [
        {
            "clip_id": row["clip_id"],
            "source_uri": row["source_uri"],
            "caption": row["caption"],
            "caption_model": row["caption_model"] or None,
            "prompt_index": i,
            "prompt": p,
            "writer": row["writer"],
            "run_id": run_id,
            "created_at": created_at,
            "schema_version": EDIT_SCHEMA_VERSION,
        }
        for i, p in enumerate(row["prompts"])
        if i >= len(row["existing"] or [])
    ]


METRIC_COLUMNS = (
    "frame_consistency",
    "frame_consistency_all_pairs",
    "prompt_consistency",
    "flow_warp_error",
    "depth_fidelity",
)


def _clip(row: Mapping[str, Any]) -> EditClip:
    return pickle.loads(row["clip"])


class CaptionStage:
    """Caption each clip's middle frame with BLIP (`gen1.captions.Captioner`), one batched call per batch.

    Rows that already have a caption pass through; a clip that fails alone becomes an error row of stage
    ``caption``. ``timeout_s`` limits each BLIP call and ``decode_timeout_s`` each middle-frame decode: a
    clip past either fails alone with error_type ``timeout``, and retires the stage
    (`pipelines.timeouts.Retirement`: in a Ray actor its next call ends the process first). Frames are read
    with the job's fsspec ``storage_options``.
    batch: PROMPT_PLAN_SCHEMA rows -> pyarrow Table of PROMPT_PLAN_SCHEMA.
    """

    def __init__(
        self,
        spec: str,
        device: str | None = None,
        captioner: Any = None,
        timeout_s: float | None = None,
        decode_timeout_s: float | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        if captioner is None:
            from gen1.captions import Captioner

            captioner = Captioner(spec, device=device)
        self.spec = spec
        self.captioner = captioner
        self.timeout_s, self.decode_timeout_s = timeout_s, decode_timeout_s
        self.storage_options = dict(storage_options or {})
        self.retirement = Retirement()

    def middle_frame(self, row: Mapping[str, Any]) -> np.ndarray:
        clip = _clip(row)
        return call_with_timeout(
            clip.middle_frame,
            self.decode_timeout_s,
            self.storage_options,
            what=f"decode of clip {clip.clip_id}",
            retirement=self.retirement,
        )

    def __call__(self, batch: Batch) -> pa.Table:
        self.retirement.check()
        rows = stage_rows(batch)
        todo = [r for r in rows if not r["caption"]]

        def store(row: dict[str, Any], caption: str) -> None:
            row["caption"], row["caption_model"] = caption, self.spec

        apply_per_clip(
            todo, "caption", self.captioner, self.middle_frame, store, self.timeout_s, self.retirement
        )
        return pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)


class PromptStage:
    """Write ``n`` prompts per clip from its caption (template or chat writer, `gen1.prompts`), keeping the
    clip's ``existing`` prompts first. A failure becomes an error row of stage ``prompts``.

    With a chat endpoint, once the chat writer gives it up (`ChatEndpointDown`: ``max_consecutive_failures``
    failed requests in a row) the stage writes this clip and every later one with the template writer,
    says so in a warning, and sets ``fell_back``; those rows' ``writer`` is ``template``. The breaker lives
    as long as the stage: the edit job runs it in actors for that (`EditRun._prompt_pass`)."""

    def __init__(self, n: int, llm: ChatConfig | None = None, seed: int = 0):
        self.n, self.llm, self.seed = n, llm, seed
        self._writer = None  # made where the stage runs (a chat writer holds an HTTP session)
        self.fell_back = False

    @property
    def writer(self):
        if self._writer is None:
            self._writer = (
                make_prompt_writer(self.llm) if self.llm is not None else TemplateWriter(seed=self.seed)
            )
        return self._writer

    def _write(self, caption: str) -> tuple[list[str], str]:
        """``n`` prompts for ``caption`` and the name of the writer that wrote them."""
        writer = self.writer
        try:
            return list(writer.write(caption, self.n)), writer.name
        except ChatEndpointDown as e:
            logger.warning("%s; the template writer (seed %d) writes the rest of the prompts", e, self.seed)
            self._writer, self.fell_back = TemplateWriter(seed=self.seed), True
            return self._writer.write(caption, self.n), self._writer.name

    def __call__(self, batch: Batch) -> pa.Table:
        rows = stage_rows(batch)
        for row in rows:
            if not healthy(row):
                continue
            try:
                existing = list(row.get("existing") or [])
                written, name = self._write(row["caption"])
                merged = list(dict.fromkeys(existing + written))[: self.n]
                if len(merged) < self.n:
                    raise PromptWriterError(
                        f"{name} writer gave {len(written)} prompts, {len(merged)} distinct with the "
                        f"{len(existing)} already committed; {self.n} needed"
                    )
                row["prompts"], row["writer"] = merged, name
            except Exception as e:
                mark_failed(row, "prompts", e)
        return pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)


class EditStage:
    """Edit tasks -> outputs: per task, load the clip (cached), edit it with the task's ``editor``
    (`gen1.editors`; Gen-1: `gen1.sampling.edit_video`), compute its metrics, write the mp4 and preview
    atomically under DST, and return its manifest row. Every read (frames, mask, reference image) and write
    goes through the job's fsspec ``storage_options``.

    One `Gen1Models` per actor when ``editors`` (the job's) has Gen-1, else the preset's DPT and CLIP alone
    (the depth every other editor follows and the metrics' models); each other editor is loaded once, at its
    first task. A task that raises becomes an error row naming its stage (``decode``,
    ``content``, ``edit``, ``metrics``, ``write``); the other tasks of the batch go on. A clip decode past
    ``decode_timeout_s``, or a whole task past ``edit_timeout_s``, fails that task alone with error_type
    ``timeout`` and the stage it was in. Its thread is abandoned (`pipelines.timeouts`): it is cancelled
    before it writes or moves anything (a task past its limit while moving its files is let finish
    instead), and the stage retires: in a Ray actor its next call ends the process first, so the next
    task runs in a fresh one.
    batch: task rows (`pipelines.edit.keys.plan_tasks`) -> pyarrow Table of RESULT_SCHEMA.
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
        editors: tuple[str, ...] = ("gen1",),
    ):
        if models is None and "gen1" in editors:
            from gen1.models import Gen1Models

            models = Gen1Models.load(specs, device=device)
        self.specs, self.models, self.device = specs, models, device
        if models is not None:
            self.depth, self.clip = models.structure.depth, models.content.clip
        else:
            from gen1.clip import ClipEmbedder
            from gen1.depth import DepthEstimator

            self.depth = DepthEstimator(specs.depth, device=device)
            self.clip = ClipEmbedder(specs.clip, device=device, convention=specs.content)
        self._editors: dict[str, Any] = {}
        self.storage_options = dict(storage_options or {})
        self.store = TableStore(dst, self.storage_options)
        self.run_id = run_id
        self.previews, self.metrics = previews, metrics
        self._clips: LRUCache[tuple[np.ndarray, np.ndarray | None]] = LRUCache(cache_clips)
        self._images: LRUCache[np.ndarray] = LRUCache(16)
        self.decode_timeout_s, self.edit_timeout_s = decode_timeout_s, edit_timeout_s
        self.retirement = Retirement()

    def __call__(self, batch: Batch) -> pa.Table:
        self.retirement.check()
        out = []
        for task in batch_rows(batch):
            stage = ["decode"]
            what = f"edit {task['edit_key']}"
            cancel = Cancellation(what)
            try:
                row = call_with_timeout(
                    self.edit,
                    self.edit_timeout_s,
                    task,
                    stage,
                    cancel,
                    what=what,
                    cancel=cancel,
                    retirement=self.retirement,
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
        return self._clips.get(clip.clip_id, lambda: clip.load(self.storage_options))

    def _load_image(self, uri: str) -> np.ndarray:
        from gen1.video import read_image

        return self._images.get(uri, lambda: read_image(uri, storage_options=self.storage_options))

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

    def measure(self, frames: np.ndarray, depth_in: np.ndarray, content: Any) -> dict[str, float | None]:
        """The manifest's metric columns (`gen1.metrics.video_metrics`) for output ``frames`` uint8
        (f, h, w, 3) of an input with depth ``depth_in`` (f, h, w); prompt consistency against the text, or
        the reference image for image content."""
        from gen1.metrics import video_metrics

        clip_model = self.clip
        emb = clip_model.embed_images(frames).float().cpu()  # (f, d)
        if content.text is not None:
            target = clip_model.embed_texts([content.text])[0]
        else:
            target = clip_model.embed_images(content.image[None])[0]
        depth_out = self.depth(frames).float().cpu().numpy()
        return video_metrics(frames, emb, target.float().cpu(), depth_in, depth_out)

    def editor(self, name: str, weights: str | None) -> Any:
        """The loaded editor ``name`` (`gen1.editors`) with ``weights`` (JSON role -> spec), once per stage."""
        if name not in self._editors:
            from gen1.editors import Gen1Editor, editor_class

            if name == Gen1Editor.name:
                self._editors[name] = Gen1Editor(self.models)
            else:
                self._editors[name] = editor_class(name).load(json.loads(weights), device=self.device)
        return self._editors[name]

    def edit(
        self, task: Mapping[str, Any], stage: list[str], cancel: Cancellation | None = None
    ) -> dict[str, Any]:
        """One task -> its manifest row (without run_id/created_at); ``stage[0]`` tracks where it is.
        Nothing is written once ``cancel`` is cancelled; its outputs move into place past `Cancellation.publish`.
        """
        from gen1.editors import EditorSettings
        from gen1.preview import depth_to_rgb, side_by_side
        from gen1.sampling import Content
        from gen1.video import write_video

        cancel = cancel or Cancellation()
        t0 = time.perf_counter()
        clip = _clip(task)
        stage[0] = "decode"
        frames, mask = call_with_timeout(
            self._load_clip,
            self.decode_timeout_s,
            clip,
            what=f"decode of clip {clip.clip_id}",
            retirement=self.retirement,
        )
        stage[0] = "content"
        if task["image_uri"]:
            content = Content(image=self._load_image(task["image_uri"]), image_uri=task["image_uri"])
        else:
            content = Content(text=task["prompt"])
        stage[0] = "edit"
        name = task.get("editor") or "gen1"
        editor = self.editor(name, task.get("editor_models"))
        settings = EditorSettings(
            steps=int(task["steps"]),
            seed=int(task["seed"]),
            **{k: task.get(k) for k in ("w", "t_s", "w_t", "sampler", "strength", "controlnet_scale")},
        )
        # Gen-1 estimates depth inside edit_video (with this DPT); every other editor follows this DPT's depth
        depth = None if name == "gen1" else self.depth(frames).float().cpu().numpy()
        result = editor.edit(frames, depth, content, settings, mask=mask)
        cancel.check()
        stage[0] = "metrics"
        metrics = self.measure(result.frames, result.depth, content) if self.metrics else {}
        stage[0] = "write"
        paths = self._paths(clip.clip_id, task["edit_key"])
        cancel.check()
        write_video(result.frames, self.store.uri(paths["output"][0]), clip.fps, storage_options=self.storage_options)
        if "preview" in paths:
            preview = side_by_side(frames, depth_to_rgb(result.depth), result.frames)
            cancel.check()
            write_video(preview, self.store.uri(paths["preview"][0]), clip.fps, storage_options=self.storage_options)
        cancel.publish()  # the commit point: past it the task is let finish, before it nothing is moved
        for tmp, final in paths.values():  # outputs first, the manifest row (by the driver) after
            _move(self.store, tmp, final)
        f, h, w, _ = result.frames.shape
        made = {  # the columns this stage determines; the others come from the task as planned
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
            **{k: metrics.get(k) for k in METRIC_COLUMNS},
            "models": self.specs.name,
            **{f"{c}_model": spec for c, spec in model_key(self.specs).items()},
            **({} if name == "gen1" else {"vae_model": None, "unet_model": None, "prior_model": None}),
            "editor": name,
            "tiny_models": self.specs.is_tiny or "tiny:" in (task.get("editor_models") or ""),
            "seconds": float(result.seconds),
            "total_seconds": time.perf_counter() - t0,
            "unet_forwards": int(result.unet_forwards),
            "device": str(self.models.device if self.models is not None else self.depth.device),
        }
        return {k: made[k] if k in made else task.get(k) for k in OUTPUT_COLUMNS}


def _move(store: TableStore, tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` (replacing a leftover of an edit that was killed before its row)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(store.fs, LocalFileSystem):
        store.fs.makedirs(store.fs._parent(final), exist_ok=True)
        os.replace(tmp, final)
    else:
        store.fs.mv(tmp, final)
