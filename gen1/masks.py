"""Edit masks: read from a mask image or video, and pooled from pixels to the latent grid.

A mask is float32 (f, h, w) in {0, 1} with 1 = edit and 0 = keep; in a mask file white is edit and black
is keep. Masks are resized and centre-cropped exactly like the frames they go with
(`gen1.video.resize_center_crop`), so mask and video stay aligned at any size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gen1.decoding import read_frames
from gen1.video import ImageDecodeError, VideoDecodeError, read_image, resize_center_crop


def mask_from_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 mask frames (f, h, w, 3) -> float32 (f, height, width) in {0, 1}, resized like the video's
    frames; white (>= 50% grey) = edit."""
    return (resize_center_crop(frames, width, height).mean(axis=-1) >= 127.5).astype(np.float32)


def read_mask(uri: str, indices: Sequence[int], width: int, height: int,
              storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """A mask video (frames ``indices``) or image (every frame) at any fsspec URI (read with
    ``storage_options``) -> float32 (f, height, width) in {0, 1}, resized like the frames; white (>= 50%
    grey) = edit."""
    try:
        frames = read_frames(uri, indices, storage_options)
    except VideoDecodeError as video_error:
        try:
            image = read_image(uri, storage_options=storage_options)
        except ImageDecodeError as image_error:
            raise ImageDecodeError(
                uri, f"mask: expected a video or an image, could read neither ({video_error.reason}; "
                f"{image_error.reason})"
            ) from image_error
        frames = np.repeat(image[None], len(indices), axis=0)
    return mask_from_frames(frames, width, height)


def latent_mask(mask: np.ndarray | torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (f, h, w) with 1 = edit -> latent mask (1, 1, f, h/8, w/8).

    A latent cell is edited if any pixel of its footprint is (max pooling), so pixels marked keep are
    never touched by an edited latent cell's own content.
    """
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if m.ndim != 3:
        raise ValueError(f"mask must be (f, h, w), got shape {tuple(m.shape)}")
    pooled = F.adaptive_max_pool2d(m[:, None], latent_hw)  # (f, 1, h8, w8)
    return pooled.permute(1, 0, 2, 3)[None]  # (1, 1, f, h8, w8)
