"""AnimateDiff depth: SD 1.5 + an AnimateDiff motion module + ControlNet depth, video to video
(diffusers `AnimateDiffVideoToVideoControlNetPipeline`), conditioned on our DPT's depth video."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from gen1.editors.base import DiffusersEditor, EditorOutput, EditorSettings
from gen1.editors.frames import counted_forwards, depth_images, generator, to_images, to_uint8


class AnimateDiffDepthEditor(DiffusersEditor):
    """The whole clip at once (temporal attention of the motion module), SDEdit from the input at ``strength``,
    ControlNet depth at ``controlnet_scale``. Takes w, strength, controlnet_scale; text prompts only, no mask."""

    name = "animatediff-depth"
    takes = frozenset({"w", "strength", "controlnet_scale"})
    weights = {
        "base": "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
        "motion_adapter": "hf:guoyww/animatediff-motion-adapter-v1-5-2",
        "controlnet": "hf:lllyasviel/control_v11f1p_sd15_depth",
    }
    tiny_weights = {
        "base": "tiny:animatediff-base",
        "motion_adapter": "tiny:motion-adapter",
        "controlnet": "tiny:controlnet-depth",
    }

    @classmethod
    def load(cls, weights: Mapping[str, str], device: str | None = None) -> AnimateDiffDepthEditor:
        from diffusers import AnimateDiffVideoToVideoControlNetPipeline, ControlNetModel, MotionAdapter

        from gen1.devices import default_device
        from gen1.weights import resolve_spec

        device = device or default_device()
        paths = {role: resolve_spec(spec, component=role) for role, spec in weights.items()}
        pipe = cls.from_local(
            AnimateDiffVideoToVideoControlNetPipeline, paths["base"], device,
            motion_adapter=cls.from_local(MotionAdapter, paths["motion_adapter"], device),
            controlnet=cls.from_local(ControlNetModel, paths["controlnet"], device),
            safety_checker=None, feature_extractor=None, image_encoder=None,
        )
        return cls.ready(pipe, device)

    def edit(self, frames: np.ndarray, depth: np.ndarray | None, content: Any, settings: EditorSettings,
             mask: np.ndarray | None = None) -> EditorOutput:
        t0 = time.perf_counter()
        _, h, w, _ = frames.shape
        with counted_forwards(self.pipe.unet) as calls:
            out = self.pipe(
                prompt=content.text,
                video=to_images(frames),
                conditioning_frames=depth_images(depth),
                height=h,
                width=w,
                strength=float(settings.strength),
                num_inference_steps=int(settings.steps),
                guidance_scale=float(settings.w),
                controlnet_conditioning_scale=float(settings.controlnet_scale),
                generator=generator(settings.seed, self.device),
                output_type="np",
            )
        return EditorOutput(to_uint8(np.asarray(out.frames)[0]), np.asarray(depth, np.float32),
                            time.perf_counter() - t0, calls[0])
