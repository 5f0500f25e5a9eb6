"""Content conditioning: the CLIP image embedding the video UNet cross-attends to.

In training it is the embedding of one frame of the clip (a random one); at inference it comes from a
reference image, or from a text prompt through the prior (CLIP text -> CLIP image embedding). ``null()``
is the all-zeros "no content" embedding used for classifier-free guidance (as diffusers' image-variation
pipeline's unconditional embedding too).

Both follow the preset's `gen1.config.ContentConvention` (the CLIP embedder's ``convention``): image
embeddings are made that way; prior samples are brought to it by `prior_to_convention`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gen1.prior import DEFAULT_GUIDANCE, Prior

log = logging.getLogger(__name__)


def prior_to_convention(embeds: torch.Tensor, unit_norm: bool, norm: float) -> torch.Tensor:
    """Prior samples (n, d) -> (n, d) in the UNet's convention, each row's direction kept: L2-normalised
    (``unit_norm``), else rescaled to ``norm``, the typical norm of raw image embeddings
    (`gen1.prior.Prior.typical_norm`): a sample's own norm is the diffusion's noise as much as the data's."""
    unit = F.normalize(embeds.float(), dim=-1)
    return unit if unit_norm else unit * float(norm)


class ContentEncoder:
    """CLIP image embedding (dim,) of a frame, a reference image or (via the prior) a text prompt.

    ``clip`` is a ``gen1.clip.ClipEmbedder`` (``dim``, ``convention``, ``embed_images``,
    ``text_tokens_and_pooled``); ``prior`` is needed only for ``from_text``.
    """

    def __init__(self, clip, prior: Prior | None = None, prior_steps: int = 25):
        self.clip = clip
        self.prior = prior
        self.prior_steps = prior_steps
        self.dim = int(clip.dim)
        self.convention = clip.convention
        if prior is not None and prior.dim != self.dim:
            raise ValueError(f"prior produces {prior.dim}-d embeddings but the CLIP model's are {self.dim}-d")

    def from_image(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (h, w, 3) -> (dim,) embedding in the convention."""
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be uint8 (h, w, 3), found shape {tuple(image.shape)}")
        return self.clip.embed_images(image[None])[0]

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prior's text inputs: pooled (n, d), token states (n, 77, d), mask (n, 77) bool."""
        out = self.clip.text_tokens_and_pooled(list(texts))
        if len(out) == 3:
            tokens, pooled, mask = out
        else:
            tokens, pooled = out
            mask = self._text_mask(texts, tokens.shape[1])
        return pooled, tokens, mask.bool()

    def _text_mask(self, texts: Sequence[str], length: int) -> torch.Tensor:
        tokenizer = getattr(self.clip, "tokenizer", None)
        if tokenizer is None:
            raise AttributeError(
                "the prior needs a text mask: the CLIP embedder must expose `tokenizer` (open_clip) or return "
                "(tokens, pooled, mask) from text_tokens_and_pooled"
            )
        ids = torch.as_tensor(tokenizer(list(texts)))
        if ids.shape[-1] != length:
            raise ValueError(f"tokenizer gives {ids.shape[-1]} positions but the text states have {length}")
        return ids != 0  # open_clip pads with 0 after EOT (Karlo's tokenizer pads with id 0 too)

    @torch.no_grad()
    def from_text(
        self,
        text: str,
        generator: torch.Generator | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        steps: int | None = None,
    ) -> torch.Tensor:
        """A prompt -> (dim,) CLIP image embedding sampled by the prior, in the convention of image embeddings."""
        if self.prior is None:
            raise ValueError("from_text needs a prior (ContentEncoder(clip, prior)); none was given")
        pooled, tokens, mask = self.text_inputs([text])
        uncond = self.text_inputs([""]) if guidance_scale > 1.0 else None
        emb = self.prior.sample(
            pooled,
            tokens,
            mask,
            generator=generator,
            steps=steps or self.prior_steps,
            guidance_scale=guidance_scale,
            uncond=uncond,
        )
        return prior_to_convention(emb, self.convention.unit_norm, self.prior.typical_norm())[0]

    def null(self) -> torch.Tensor:
        """(dim,) zeros: the unconditional content for classifier-free guidance."""
        return torch.zeros(self.dim)
