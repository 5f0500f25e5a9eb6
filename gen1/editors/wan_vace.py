"""Wan 2.1 VACE (diffusers `WanVACEPipeline`): a video generated from our DPT's depth video as its control,
optionally with a reference image (image content) and an inpainting mask."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from gen1.editors.base import DiffusersEditor, EditorOutput, EditorSettings
from gen1.editors.frames import counted_forwards, depth_images, generator, mask_images, to_uint8


class WanVACEEditor(DiffusersEditor):
    """The whole clip generated under the depth control at ``controlnet_scale`` (VACE's conditioning scale);
    not SDEdit from the input, so no strength. Takes w, controlnet_scale, a reference image and a mask (where
    the mask is False the input frames are kept as VACE's context). VACE works on 4k + 1 frames: a clip is
    padded with its last frame and the output cut back to the clip's length."""

    name = "wan-vace"
    takes = frozenset({"w", "controlnet_scale", "reference_image", "mask"})
    weights = {"pipeline": "hf:Wan-AI/Wan2.1-VACE-1.3B-diffusers"}
    tiny_weights = {"pipeline": "tiny:wan-vace"}
    max_sequence_length = 226  # Wan's prompt length

    @classmethod
    def load(cls, weights: Mapping[str, str], device: str | None = None) -> WanVACEEditor:
        from diffusers import WanVACEPipeline

        from gen1.devices import default_device
        from gen1.weights import resolve_spec

        device = device or default_device()
        path = resolve_spec(weights["pipeline"], component="wan-vace")
        return cls.ready(cls.from_local(WanVACEPipeline, path, device), device)

    def edit(self, frames: np.ndarray, depth: np.ndarray | None, content: Any, settings: EditorSettings,
             mask: np.ndarray | None = None) -> EditorOutput:
        from PIL import Image

        t0 = time.perf_counter()
        f, h, w, _ = frames.shape
        step = self.pipe.vae_scale_factor_temporal
        n = (f - 1 + step - 1) // step * step + 1  # 4k + 1 >= f
        pad = np.concatenate([np.arange(f), np.full(n - f, f - 1)]).astype(int)
        control = np.asarray(depth, np.float32)[pad]
        video = depth_images(control)
        masks = None
        if mask is not None:  # keep the input where not masked; VACE regenerates the white pixels
            m = np.asarray(mask, bool)[pad]
            keep = frames[pad]
            video = [Image.fromarray(np.where(mi[..., None], np.asarray(v), k))
                     for v, k, mi in zip(video, keep, m, strict=True)]
            masks = mask_images(m)
        references = None if content.image is None else [Image.fromarray(content.image)]
        with counted_forwards(self.pipe.transformer) as calls:
            out = self.pipe(
                prompt=content.text or "",
                video=video,
                mask=masks,
                reference_images=references,
                conditioning_scale=float(settings.controlnet_scale),
                height=h,
                width=w,
                num_frames=n,
                num_inference_steps=int(settings.steps),
                guidance_scale=float(settings.w),
                generator=generator(settings.seed, self.device),
                output_type="np",
                max_sequence_length=self.max_sequence_length,
            )
        edited = to_uint8(np.asarray(out.frames)[0][:f])
        return EditorOutput(edited, np.asarray(depth, np.float32), time.perf_counter() - t0, calls[0])
