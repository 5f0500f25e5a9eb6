"""CLIP image and text embeddings with open_clip (ViT-L/14, OpenAI weights, for SD 1.5-sized Gen-1).

Images are preprocessed on batched tensors on the model's device as a `gen1.config.ContentConvention`
says: by default as open_clip's eval transform (shortest side, bicubic, antialiased, centre crop; unit-norm
embeddings), for the ``sdiv`` preset as its UNet was trained (squashed to the square, bicubic without
antialias; raw projected embeddings). Size, mean/std and interpolation come from the model's preprocess
config. For the prior, ``text_tokens_and_pooled`` returns the
text tower's token states after the final LayerNorm and the projected (unnormalised) pooled embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from gen1.config import UNIT_CONTENT, ContentConvention
from gen1.depth import as_frames
from gen1.devices import default_device, encoder_dtype, to_device
from gen1.weights import load_clip_model

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                 "random": InterpolationMode.BICUBIC}  # "random" is a training augmentation; eval uses bicubic


class ClipEmbedder:
    """open_clip CLIP: uint8 images (n, h, w, 3) and texts -> (n, dim) float32 CPU tensors.

    Image embeddings follow ``convention`` (a preset's ``specs.content``; default: open_clip's eval
    transform, unit-norm, which the metrics need only up to scale); text embeddings are L2-normalised.
    Runs on CUDA when present (fp16 there), else CPU (fp32); ``batch_size`` items per forward pass.
    ``tokenizer`` is open_clip's (texts -> (n, context_length) int64, 0-padded).
    """

    def __init__(self, spec: str, device: str | None = None, batch_size: int = 64, dtype: torch.dtype | None = None,
                 convention: ContentConvention = UNIT_CONTENT):
        device = device or default_device()
        dtype = dtype or encoder_dtype(device)
        model, tokenizer = load_clip_model(spec, device=device, dtype=dtype)
        self._init(model, tokenizer, device, batch_size, convention)
        self.spec = spec

    @classmethod
    def from_model(cls, model, tokenizer, device: str | None = None, batch_size: int = 64,
                   convention: ContentConvention = UNIT_CONTENT) -> ClipEmbedder:
        """Wrap an already built open_clip ``CLIP`` and its tokenizer."""
        self = cls.__new__(cls)
        self._init(model, tokenizer, device or default_device(), batch_size, convention)
        self.spec = type(model).__name__
        return self

    def _init(self, model, tokenizer, device: str, batch_size: int, convention: ContentConvention) -> None:
        from open_clip.model import get_model_preprocess_cfg

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = str(device)
        self.batch_size = batch_size
        self.convention = convention
        self.dim = int(model.visual.output_dim)
        self.width = int(model.ln_final.normalized_shape[0]) if hasattr(model, "ln_final") else None
        self.context_length = int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77))
        cfg = get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(cfg.get("mean") or OPENAI_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std") or OPENAI_STD).view(1, 3, 1, 1)
        self.interpolation = INTERPOLATION.get(cfg.get("interpolation", "bicubic"), InterpolationMode.BICUBIC)
        if convention.resize == "crop" and self.image_size[0] != self.image_size[1]:
            raise ValueError(f"resize 'crop' needs a square CLIP input size, found {self.image_size}")

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's input dtype: its first conv's (open_clip's fp16/bf16 precision keeps some
        parameters, e.g. the class embedding, in fp32, so "the first parameter" would be wrong)."""
        for module in self.model.visual.modules():
            if isinstance(module, torch.nn.Conv2d):
                return module.weight.dtype
        return next(self.model.visual.parameters()).dtype

    # ---- images ------------------------------------------------------------------------------------------

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image is resized to before any crop: the square itself ("squash"), or the shortest
        side to the square's (aspect kept, as torchvision's ``resize(x, S)``) for "crop"."""
        if self.convention.resize == "squash":
            return self.image_size
        side = self.image_size[0]
        if height <= width:
            return side, int(side * width / height)
        return int(side * height / width), side

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, h, w, 3) -> (n, 3, S, S) normalised, on the model's device and dtype."""
        x = to_device(frames, self.device).permute(0, 3, 1, 2)
        size = list(self.resized_size(*x.shape[-2:]))
        if self.convention.antialias:  # on uint8, as open_clip's PIL-based eval transform rounds
            x = tvF.resize(x, size, interpolation=self.interpolation, antialias=True).float() / 255.0
        else:  # as sdiv's training code (kornia.geometry.resize): float, align_corners=True, no low-pass
            mode = "bicubic" if self.interpolation == InterpolationMode.BICUBIC else "bilinear"
            x = F.interpolate(x.float() / 255.0, size=size, mode=mode, align_corners=True)
        x = tvF.center_crop(x, list(self.image_size))  # a no-op after "squash"
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    @torch.no_grad()
    def embed_images(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (n, h, w, 3) -> float32 (n, dim) on the CPU: the projected embedding (``encode_image``),
        L2-normalised when the convention says so."""
        x = as_frames(frames)
        out = torch.cat(
            [self.model.encode_image(self.preprocess(chunk)).float().cpu() for chunk in x.split(self.batch_size)]
        )
        return F.normalize(out, dim=-1) if self.convention.unit_norm else out

    # ---- texts -------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> int64 (n, context_length) token ids (0 = padding after the end-of-text token)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string (wrap it in a list)")
        texts = list(texts)
        if not texts:
            raise ValueError("texts must hold at least one string, found 0")
        return torch.as_tensor(self.tokenizer(texts))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> float32 (n, dim), L2-normalised, on the CPU."""
        ids = self.tokenize(texts)
        out = [self.model.encode_text(chunk.to(self.device)).float().cpu() for chunk in ids.split(self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_tokens_and_pooled(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (token states (n, context_length, width) after the final LayerNorm, pooled projection
        (n, dim), unnormalised), float32 on the CPU: the prior's text inputs (as Karlo takes them)."""
        if not hasattr(self.model, "ln_final"):
            raise TypeError(
                f"text token states need open_clip's CLIP text tower (ln_final); {type(self.model).__name__} has none"
            )
        ids = self.tokenize(texts)
        tokens, pooled = [], []
        captured: list[torch.Tensor] = []
        # The same forward as encode_text: the hook keeps what ln_final produced for this call.
        hook = self.model.ln_final.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            for chunk in ids.split(self.batch_size):
                captured.clear()
                pooled.append(self.model.encode_text(chunk.to(self.device)).float().cpu())
                if len(captured) != 1:
                    raise RuntimeError(f"expected one ln_final call per encode_text, saw {len(captured)}")
                tokens.append(captured[0].float().cpu())
        finally:
            hook.remove()
        return torch.cat(tokens), torch.cat(pooled)
