"""SD-Depth, the paper's baseline: Stable Diffusion 2's depth-conditioned image model
(diffusers `StableDiffusionDepth2ImgPipeline`) applied to each frame, with our DPT's depth."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from gen1.editors.base import DiffusersEditor, EditorOutput, EditorSettings
from gen1.editors.frames import counted_forwards, generator, to_images, to_uint8


class SDDepthEditor(DiffusersEditor):
    """Per frame, independently: SDEdit from the frame at ``strength`` with depth conditioning. Takes w and
    strength; text prompts only (no reference image), no mask."""

    name = "sd-depth"
    takes = frozenset({"w", "strength"})
    weights = {"pipeline": "hf:stabilityai/stable-diffusion-2-depth"}
    tiny_weights = {"pipeline": "tiny:sd-depth"}

    @classmethod
    def load(cls, weights: Mapping[str, str], device: str | None = None) -> SDDepthEditor:
        from diffusers import StableDiffusionDepth2ImgPipeline

        from gen1.devices import default_device
        from gen1.weights import resolve_spec

        device = device or default_device()
        path = resolve_spec(weights["pipeline"], component="sd-depth")
        return cls.ready(cls.from_local(StableDiffusionDepth2ImgPipeline, path, device), device)

    def edit(self, frames: np.ndarray, depth: np.ndarray | None, content: Any, settings: EditorSettings,
             mask: np.ndarray | None = None) -> EditorOutput:
        t0 = time.perf_counter()
        f = len(frames)
        with counted_forwards(self.pipe.unet) as calls:
            out = self.pipe(
                prompt=[content.text] * f,
                image=to_images(frames),
                depth_map=torch.as_tensor(np.asarray(depth, np.float32)),
                strength=float(settings.strength),
                num_inference_steps=int(settings.steps),
                guidance_scale=float(settings.w),
                generator=generator(settings.seed, self.device),
                output_type="np",
            )
        return EditorOutput(to_uint8(out.images), np.asarray(depth, np.float32), time.perf_counter() - t0, calls[0])
