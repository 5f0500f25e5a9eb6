"""What the diffusers editors share: our arrays to the PIL frames their pipelines take, their outputs back
to uint8 frames, seeded generators, and the count of their denoiser's forward calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


def to_images(frames: np.ndarray) -> list[Image.Image]:
    """uint8 (f, h, w, 3) -> f RGB images."""
    return [Image.fromarray(np.ascontiguousarray(f)) for f in frames]


def depth_images(depth: np.ndarray) -> list[Image.Image]:
    """Depth (f, h, w) in [-1, 1] (near bright) -> f RGB images, grey levels 0..255 (what ControlNet depth and
    VACE take as their depth video)."""
    grey = np.clip((np.asarray(depth, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(g).convert("RGB") for g in grey]


def mask_images(mask: np.ndarray) -> list[Image.Image]:
    """bool (f, h, w), True = edit -> f L-mode images, white where the pipeline regenerates."""
    return [Image.fromarray(np.asarray(m, bool).astype(np.uint8) * 255, mode="L") for m in mask]


def to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """A pipeline's ``output_type="np"`` frames, float (f, h, w, 3) in [0, 1] -> uint8 (f, h, w, 3)."""
    x = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generator(seed: int, device: str) -> torch.Generator:
    """A seeded generator on ``device`` (what makes an edit repeat)."""
    return torch.Generator(device=device).manual_seed(int(seed))


@contextmanager
def counted_forwards(module: torch.nn.Module) -> Iterator[list[int]]:
    """``[n]``: the forward calls of ``module`` (a pipeline's denoiser) while the block runs (a batched call
    counts once, as `gen1.sampling` counts its UNet's)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    handle = module.register_forward_hook(count)
    try:
        yield calls
    finally:
        handle.remove()
