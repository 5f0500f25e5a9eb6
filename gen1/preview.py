"""Side-by-side previews (input | depth | output) of an edit."""

from __future__ import annotations

import numpy as np


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """depth: (f, h, w) in [-1, 1] (near = 1) -> uint8 (f, h, w, 3) grey image, near bright."""
    grey = np.clip((np.asarray(depth, dtype=np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def side_by_side(*panels: np.ndarray) -> np.ndarray:
    """Concatenate uint8 (f, h, w_i, 3) videos of equal f and h along the width: (f, h, sum w_i, 3)."""
    frames = {p.shape[0] for p in panels}
    heights = {p.shape[1] for p in panels}
    if len(frames) != 1 or len(heights) != 1:
        raise ValueError(f"panels must share frame count and height, got shapes {[p.shape for p in panels]}")
    return np.concatenate(panels, axis=2)
