"""What the edit pipeline edits: `EditClip` (which frames of which video, at which size, with its own
prompts or mask; masks are read by `gen1.masks.read_mask`) and a source manifest's per-video prompts (`read_source_table`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gen1.masks import read_mask
from gen1.prompts import PromptSpec
from pipelines.sources import read_manifest_rows


@dataclass(frozen=True)
class EditClip:
    """One clip to edit: which frames of which video, at which size, with its own prompts or mask if any.

    ``width x height`` is the edit size (multiples of 8, in the source's orientation); ``fps`` is the
    output's (source fps / stride). ``prompts`` (e.g. a column of a source manifest, TGVE's prompts)
    replace the job's prompts for this clip; ``caption`` skips captioning. ``mask_uri``: an image (one
    mask for every frame) or a video aligned with the source; white = edit, black = keep.
    Subclasses override `load_frames` / `middle_frame` / `load_mask` for other storage
    (`pipelines.datasets.SequenceClip`). A clip holds no credentials: each reader takes the job's fsspec
    ``storage_options`` from the stage that calls it.
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

    def load_frames(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        """uint8 (f, height, width, 3)."""
        from gen1.decoding import read_frames
        from gen1.video import resize_center_crop

        frames = resize_center_crop(read_frames(self.source_uri, self.frame_indices, storage_options),
                                    self.width, self.height)
        if len(frames) != self.num_frames:
            raise RuntimeError(
                f"clip {self.clip_id}: expected {self.num_frames} frames, decoded {len(frames)}"
            )
        return frames

    def middle_frame(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        """uint8 (height, width, 3): the frame captions are made from (only that frame is decoded)."""
        from gen1.decoding import read_frames
        from gen1.video import resize_center_crop

        index = self.frame_indices[len(self.frame_indices) // 2]
        return resize_center_crop(read_frames(self.source_uri, [index], storage_options), self.width, self.height)[0]

    def load_mask(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray | None:
        """float32 (f, height, width) in {0, 1}, 1 = edit; None without a mask."""
        if self.mask_uri is None:
            return None
        return read_mask(self.mask_uri, self.frame_indices, self.width, self.height, storage_options)

    def load(self, storage_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(`load_frames`, `load_mask`), read with fsspec's ``storage_options``."""
        return self.load_frames(storage_options), self.load_mask(storage_options)

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any], **extra: Any) -> EditClip:
        """From a `pipelines.sources.PlanStage` row (or a `pipelines.sources.ClipPlan` dict)."""
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


def read_source_table(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A source manifest (CSV or Parquet) -> {normalised video URI: {prompts, caption, mask_uri}}.

    Columns: ``uri`` (required), and optionally ``prompt`` (a text prompt), ``image`` (a reference image
    URI), ``mask`` (a mask image/video URI), ``caption``. Several rows may name one video, one prompt
    each. Relative URIs resolve against the manifest's directory.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in read_manifest_rows(uri, ("uri", "image", "mask"), storage_options, verbatim_urls=("image",)):
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
