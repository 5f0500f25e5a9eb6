"""The evaluation's stages: plain classes, ``__call__(batch) -> pandas.DataFrame``, callable without Ray.

- `BaselineStage` (actor pool): the baselines of `gen1.baselines` on task rows, dispatched on each row's
  ``method`` (``per_frame``, ``sdedit``, ``no_structure``; `run_baseline`);
- `MetricsStage` (actor pool): `gen1.metrics.video_metrics` of written output videos, batched.

Failures follow `pipelines.failures`: a row that fails gets ``status`` ``error`` and the error columns
(stage: the baseline's method, ``read_output`` or ``metrics``), and later stages pass it through. Every
read and write of a stage (input frames, masks, reference images, output videos) takes the job's fsspec
``storage_options``.
"""

from __future__ import annotations

import pickle
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gen1.config import ModelSpecs
from gen1.video import read_image
from pipelines.cache import LRUCache
from pipelines.edit import EditClip
from pipelines.evaluate.config import BASELINES, METRICS
from pipelines.failures import healthy, mark_failed, stage_rows


def read_video(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Every frame of a written video (read with ``storage_options``): uint8 (f, h, w, 3)."""
    from gen1.decoding import probe, read_frames

    return read_frames(uri, list(range(probe(uri, storage_options).num_frames)), storage_options)


def input_clip(row: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> EditClip:
    """Rebuild the input clip of a manifest row (no pickled clip at hand): a folder of frames or a video
    (told apart, and the folder listed, with ``storage_options``)."""
    import fsspec

    from pipelines.datasets import DAVIS_FPS, SequenceClip, VideoSequence, _list_files

    common = dict(
        clip_id=row["clip_id"], source_uri=row["source_uri"], start=int(row["start"]), stride=int(row["stride"]),
        frame_indices=tuple(int(i) for i in row["frame_indices"]), fps=float(row["fps"]),
        width=int(row["width"]), height=int(row["height"]),
    )
    fs, path = fsspec.core.url_to_fs(row["source_uri"], **dict(storage_options or {}))
    if fs.isdir(path):
        names = _list_files(row["source_uri"], (".jpg", ".jpeg", ".png"), storage_options)
        seq = VideoSequence(
            name=posixpath.basename(row["source_uri"].rstrip("/")), dataset="frames", frames_uri=row["source_uri"],
            frame_uris=tuple(posixpath.join(row["source_uri"], n) for n in names), fps=DAVIS_FPS,
        )
        return SequenceClip(**common, sequence=seq)
    return EditClip(**common)


def text_prompt(row: Mapping[str, Any]) -> str | None:
    """A row's text prompt, or None for image content (also when a pandas batch made the missing prompt NaN)."""
    prompt = row.get("prompt")
    return prompt if isinstance(prompt, str) and prompt else None


def run_baseline(models: Any, row: Mapping[str, Any], frames: np.ndarray, mask: np.ndarray | None,
                 storage_options: Mapping[str, Any] | None = None) -> Any:
    """The `gen1.baselines` method of task ``row`` (its ``method`` and settings) on ``frames`` uint8 (f, h, w, 3)
    -> its `gen1.sampling.EditResult`; a reference image is read with ``storage_options``."""
    from gen1 import baselines
    from gen1.sampling import Content, EditSettings

    method = row["method"]
    content = (Content(text=text_prompt(row)) if text_prompt(row)
               else Content(image=read_image(row["image_uri"], storage_options=storage_options)))
    common = dict(guidance=float(row["w"]), steps=int(row["steps"]), seed=int(row["seed"]), sampler=row["sampler"])
    if method == "per_frame":
        settings = EditSettings(structure_strength=int(row["t_s"]), **common)
        return baselines.per_frame_video(models, frames, content, settings, mask=mask)
    sdedit_style = {"sdedit": baselines.sdedit_video, "no_structure": baselines.no_structure_video}
    if method not in sdedit_style:
        raise ValueError(f"baseline method: expected one of {BASELINES}, found {method!r}")
    settings = baselines.SDEditSettings(strength=float(row["sdedit_strength"]), **common)
    return sdedit_style[method](models, frames, content, settings, mask=mask)


class BaselineStage:
    """The baselines (`run_baseline`) of task rows, whatever their method; one `Gen1Models` per actor.

    A task row carries the pickled clip (``clip``), its ``method``, prompt and settings; the output video is
    written to ``OUT/outputs/<clip_id>/<key>.mp4``. A task that fails becomes an error row whose stage is
    its method.
    """

    def __init__(self, specs: ModelSpecs, out: str, device: str | None = None, models: Any = None,
                 storage_options: Mapping[str, Any] | None = None):
        if models is None:
            from gen1.models import Gen1Models

            models = Gen1Models.load(specs, device=device)
        self.specs, self.models, self.out = specs, models, out
        self.storage_options = dict(storage_options or {})
        self._clips: LRUCache[tuple[np.ndarray, np.ndarray | None]] = LRUCache(4)

    def __call__(self, batch) -> pd.DataFrame:
        rows = stage_rows(batch)
        for row in rows:
            if healthy(row):
                try:
                    row.update(self.edit(row))
                except Exception as e:  # failures are data: the row says why, the job goes on
                    mark_failed(row, str(row.get("method")), e)
                    row.update(output_uri=None, seconds=None)
            row.pop("clip", None)
        return pd.DataFrame(rows)

    def edit(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One task -> its output's ``output_uri`` and ``seconds``."""
        from gen1.video import write_video

        clip = pickle.loads(row["clip"])
        frames, mask = self._clips.get(row["clip_id"], lambda: clip.load(self.storage_options))
        result = run_baseline(self.models, row, frames, mask, self.storage_options)
        uri = posixpath.join(self.out, "outputs", row["clip_id"], f"{row['edit_key']}.mp4")
        write_video(result.frames, uri, clip.fps, storage_options=self.storage_options)
        return {"output_uri": uri, "seconds": float(result.seconds)}


class MetricsStage:
    """`gen1.metrics.video_metrics` of output videos, batched: one CLIP image call for every frame of the
    batch, one CLIP text call for its prompts, depth per video. Rows need ``output_uri``, ``prompt`` (or
    ``image_uri``) and the input clip (``clip`` pickled, or manifest columns to rebuild it). An output that
    cannot be read fails its row at stage ``read_output``, a measurement that raises at ``metrics``."""

    def __init__(self, specs: ModelSpecs, device: str | None = None, clip: Any = None, depth: Any = None,
                 storage_options: Mapping[str, Any] | None = None):
        if clip is None:
            from gen1.clip import ClipEmbedder

            clip = ClipEmbedder(specs.clip, device=device)
        if depth is None:
            from gen1.depth import DepthEstimator

            depth = DepthEstimator(specs.depth, device=device)
        self.clip, self.depth = clip, depth
        self.storage_options = dict(storage_options or {})
        self._inputs: LRUCache[np.ndarray] = LRUCache(8)

    def _input(self, row: Mapping[str, Any]) -> np.ndarray:
        def load() -> np.ndarray:
            clip = pickle.loads(row["clip"]) if row.get("clip") else input_clip(row, self.storage_options)
            return clip.load_frames(self.storage_options)

        return self._inputs.get(row["clip_id"], load)

    def __call__(self, batch) -> pd.DataFrame:
        rows = stage_rows(batch)
        videos: dict[int, np.ndarray] = {}
        for i, row in enumerate(rows):
            if healthy(row):
                try:
                    videos[i] = read_video(row["output_uri"], self.storage_options)
                except Exception as e:
                    mark_failed(row, "read_output", e)
        if videos:
            emb = self.clip.embed_images(np.concatenate(list(videos.values()))).float().cpu().numpy()
            splits = np.cumsum([len(v) for v in videos.values()])[:-1]
            per_video = dict(zip(videos, np.split(emb, splits), strict=True))
            texts = [text_prompt(rows[i]) for i in videos if text_prompt(rows[i])]
            text_emb = dict(zip(texts, self.clip.embed_texts(texts).float().cpu().numpy(), strict=True)) if texts else {}
        for i, frames in videos.items():
            try:
                rows[i].update(self.measure(rows[i], frames, per_video[i], text_emb))
            except Exception as e:
                mark_failed(rows[i], "metrics", e)
        for row in rows:
            for m in METRICS:
                row.setdefault(m, None)
            row.pop("clip", None)
        return pd.DataFrame(rows)

    def measure(self, row: Mapping[str, Any], frames: np.ndarray, emb: np.ndarray,
                text_emb: Mapping[str, np.ndarray]) -> dict[str, float | None]:
        """METRICS of output ``frames`` uint8 (f, h, w, 3) with CLIP embeddings ``emb`` (f, d); the prompt's
        embedding from ``text_emb``, or the reference image's."""
        from gen1.metrics import flow_warp_error, video_metrics

        source = self._input(row)
        if text_prompt(row):
            target = text_emb[text_prompt(row)]
        else:
            image = read_image(row["image_uri"], storage_options=self.storage_options)
            target = self.clip.embed_images(image[None]).float().cpu().numpy()[0]
        depth_in = self.depth(source).float().cpu().numpy()
        depth_out = self.depth(frames).float().cpu().numpy()
        return {
            **video_metrics(frames, emb, target, depth_in, depth_out),
            "input_flow_warp_error": flow_warp_error(source) if len(source) >= 2 else None,
        }
