"""Monocular depth of video frames with DPT (MiDaS DPT-Large in the paper), normalised per clip.

Preprocessing is MiDaS-style through the model's own ``DPTImageProcessor``: keep the aspect ratio and
resize so the sides are multiples of 32 (and of twice the patch size), scaling as little as possible
towards the processor's ``size``. The prediction is relative inverse depth (larger = nearer), resized back
(bicubic) to the input resolution. ``__call__`` maps a whole clip to [-1, 1] with ONE min/max over all its
frames, so depth does not flicker from frame to frame.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from gen1.devices import default_device, encoder_dtype, to_device
from gen1.structure import normalise_per_clip
from gen1.weights import load_depth_model

log = logging.getLogger(__name__)

MIDAS_MULTIPLE = 32


def as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (f, h, w, 3) numpy or torch -> uint8 torch (f, h, w, 3); a clear error for anything else."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        found = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"frames must be uint8 (f, h, w, 3), found {found}")
    if x.shape[0] == 0:
        raise ValueError("frames must hold at least one frame, found 0")
    return x


def dpt_predict(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """DPT depth for inputs of any aspect ratio: pixel_values (b, 3, H, W) -> (b, H', W').

    ``DPTForDepthEstimation.forward`` passes the patch grid to its neck only for backbone-based configs and
    otherwise assumes a square grid; this runs the same modules (ViT, neck, head) with the real grid, so
    ViT-based DPT (dpt-large) keeps the aspect ratio as MiDaS does. Equal to ``model(pixel_values)`` on
    square inputs. Hybrid and backbone-based configs go through ``model`` itself.
    """
    cfg = model.config
    if cfg.is_hybrid or getattr(model, "backbone", None) is not None:
        return model(pixel_values=pixel_values).predicted_depth
    patch = cfg.patch_size
    h, w = pixel_values.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"DPT input {h}x{w} is not a multiple of the patch size {patch}")
    out = model.dpt(pixel_values, output_hidden_states=True)
    features = [f for i, f in enumerate(out.hidden_states[1:]) if i in cfg.backbone_out_indices]
    features = model.neck(features, h // patch, w // patch)
    return model.head(features)


class DepthEstimator:
    """uint8 frames (f, h, w, 3) -> relative inverse depth (f, h, w), normalised to [-1, 1] per clip.

    Runs on CUDA when present (fp16 there), else CPU (fp32); ``batch_size`` frames per forward pass.
    Outputs are float32 on the CPU.
    """

    def __init__(
        self,
        spec: str,
        device: str | None = None,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ):
        device = device or default_device()
        dtype = dtype or encoder_dtype(device)
        model, processor = load_depth_model(spec, device=device, dtype=dtype)
        self._init(model, processor, device, batch_size)
        self.spec = spec

    @classmethod
    def from_model(cls, model, processor, device: str | None = None, batch_size: int = 8) -> DepthEstimator:
        """Wrap an already loaded ``DPTForDepthEstimation`` and its ``DPTImageProcessor``."""
        self = cls.__new__(cls)
        self._init(model, processor, device or default_device(), batch_size)
        self.spec = getattr(model, "name_or_path", "") or type(model).__name__
        return self

    def _init(self, model, processor, device: str, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = str(device)
        self.batch_size = batch_size
        # Sides a multiple of 32 (MiDaS), of the processor's own multiple, and of 2 patches (DPT's
        # reassemble stage halves the patch grid once).
        self.multiple = math.lcm(
            MIDAS_MULTIPLE, int(getattr(processor, "ensure_multiple_of", 1) or 1), 2 * int(model.config.patch_size)
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, h, w, 3) -> pixel_values (n, 3, H, W) on the model's device and dtype."""
        images = list(to_device(frames, self.device).permute(0, 3, 1, 2))
        pixel_values = self.processor(
            images=images, keep_aspect_ratio=True, ensure_multiple_of=self.multiple, return_tensors="pt"
        )["pixel_values"]
        return pixel_values.to(self.device, self.dtype)

    @torch.no_grad()
    def predict_raw(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (f, h, w, 3) -> float32 (f, h, w) relative inverse depth, un-normalised, on the CPU."""
        x = as_frames(frames)
        h, w = x.shape[1:3]
        out = []
        for chunk in x.split(self.batch_size):
            depth = dpt_predict(self.model, self.preprocess(chunk)).float()
            depth = F.interpolate(depth[:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
            out.append(depth.cpu())
        return torch.cat(out)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (f, h, w, 3) -> float32 (f, h, w) in [-1, 1], one min/max over the whole clip."""
        depth = self.predict_raw(frames)
        if float(depth.max() - depth.min()) < 1e-6:
            log.warning("depth of a %d-frame clip is constant; returning zeros", depth.shape[0])
        return normalise_per_clip(depth)
