"""Captions of video clips with BLIP (transformers ``BlipForConditionalGeneration``), as in the paper's
evaluation: caption the input video, then rewrite the caption into edit prompts (`gen1.prompts`).

A clip is captioned from one frame, its middle one (the edit pipeline decodes only that frame): the frame
most representative of a short clip, and one frame keeps captioning a small fraction of an edit's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from gen1.devices import default_device, encoder_dtype
from gen1.weights import load_caption_model

log = logging.getLogger(__name__)


class Captioner:
    """BLIP image captioning. ``__call__(images uint8 (n, h, w, 3)) -> n captions``.

    Decoding is deterministic (beam search, no sampling), so the same frame always gets the same caption.
    """

    def __init__(
        self,
        spec: str,
        device: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        prefix: str | None = None,
    ):
        device = device or default_device()
        model, processor = load_caption_model(spec, device=device, dtype=encoder_dtype(device))
        self._init(model, processor, device, max_new_tokens, num_beams, prefix)
        self.spec = spec

    @classmethod
    def from_model(
        cls,
        model,
        processor,
        device: str = "cpu",
        max_new_tokens: int = 30,
        num_beams: int = 3,
        prefix: str | None = None,
    ) -> Captioner:
        self = cls.__new__(cls)
        self._init(model, processor, device, max_new_tokens, num_beams, prefix)
        self.spec = getattr(model, "name_or_path", "") or type(model).__name__
        return self

    def _init(self, model, processor, device, max_new_tokens, num_beams, prefix) -> None:
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(
                f"expected max_new_tokens >= 1 and num_beams >= 1, got {max_new_tokens}, {num_beams}"
            )
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.prefix = prefix  # conditional captioning ("a video of"): BLIP continues this text

    @torch.no_grad()
    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> list[str]:
        """images: uint8 (n, h, w, 3) (or a list of (h, w, 3)) -> n captions, whitespace-normalised."""
        images = [np.asarray(i) for i in images]
        for i, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {i}: expected uint8 (h, w, 3), got {image.dtype} {image.shape}")
        if not images:
            return []
        if self.prefix:
            inputs = self.processor(images=images, text=[self.prefix] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        ids = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )
        captions = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(c.split()) for c in captions]
