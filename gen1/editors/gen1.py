"""Gen-1, ours: `gen1.sampling.edit_video` on one preset's `gen1.models.Gen1Models` (exactly the edit the
pipeline made before editors were pluggable)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gen1.config import SD15
from gen1.editors.base import Editor, EditorOutput, EditorSettings


class Gen1Editor(Editor):
    """Takes t_s, w, w_t, the sampler, a reference image and a mask. Its weights are the preset's
    components (`gen1.config.ModelSpecs`); depth comes from the preset's DPT inside `edit_video`."""

    name = "gen1"
    takes = frozenset({"t_s", "w", "w_t", "sampler", "reference_image", "mask"})
    weights = {c: getattr(SD15, c) for c in ("vae", "unet", "clip", "depth", "prior")}
    tiny_weights = {c: f"tiny:{c}" for c in weights}

    def __init__(self, models: Any):
        self.models = models

    @classmethod
    def load(cls, weights: Mapping[str, str] | Any, device: str | None = None) -> Gen1Editor:
        """``weights``: the preset's `ModelSpecs`."""
        from gen1.models import Gen1Models

        return cls(Gen1Models.load(weights, device=device))

    def edit(self, frames: np.ndarray, depth: np.ndarray | None, content: Any, settings: EditorSettings,
             mask: np.ndarray | None = None) -> EditorOutput:
        """``depth`` is not used: `edit_video` estimates it with the same DPT (before its t_s pyramid)."""
        from gen1.sampling import EditSettings, edit_video

        result = edit_video(
            self.models,
            frames,
            content,
            EditSettings(
                structure_strength=int(settings.t_s),
                guidance=float(settings.w),
                temporal_guidance=float(settings.w_t),
                steps=int(settings.steps),
                seed=int(settings.seed),
                sampler=settings.sampler,
            ),
            mask=mask,
        )
        return EditorOutput(result.frames, result.depth, float(result.seconds), int(result.unet_forwards))
