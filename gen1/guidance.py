"""Classifier-free and temporal guidance (Gen-1 eq. 8) as pure functions over model predictions.

All predictions have the same shape, e.g. ``(b, c, f, h, w)``; they are what the UNet returns for one
denoising step (v-predictions here, but the algebra does not care).

Notation of the paper:
    mu_pi(z, t, 0, s)  the image model applied to each frame independently, content dropped ("image-uncond")
    mu(z, t, 0, s)     the video model, content dropped ("video-uncond")
    mu(z, t, c, s)     the video model with content c ("video-cond")
    mu_pi(z, t, c, s)  the image model per frame with content c ("image-cond"; the per-frame baseline only)

Eq. 8:  mu~ = mu_pi(0) + w_t * (mu(0) - mu_pi(0)) + w * (mu(c) - mu(0)).

Eq. 8 at ``w_t = 0`` is NOT the image model alone: its ``w`` term still comes from the video model. The
per-frame baseline (``GuidanceScales(image_model=True)``) is classifier-free guidance of the image model,
``mu_pi(0) + w * (mu_pi(c) - mu_pi(0))``, with no video branch at all.

``w_t = 1`` removes the image branch and gives plain classifier-free guidance; ``w = 1`` on top of that
gives the conditional video model alone. Those two cases are returned by the *same expressions* the
reduced samplers use (not by a numerically equal re-association), so they agree bit for bit and the
unneeded UNet evaluations can be skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceScales:
    """Content guidance ``w`` and temporal guidance ``w_t`` of eq. 8."""

    content: float = 7.5  # w
    temporal: float = 1.0  # w_t
    image_model: bool = False  # the per-frame baseline: the image model in every branch (w_t unused)

    @property
    def needs_image_branch(self) -> bool:
        """Eq. 8's per-frame image model is only evaluated when ``w_t != 1``."""
        return not self.image_model and self.temporal != 1.0

    @property
    def needs_uncond_branch(self) -> bool:
        """The unconditional branch is needed unless ``w = 1`` (and, for eq. 8, ``w_t = 1``)."""
        if self.image_model:
            return self.content != 1.0
        return self.content != 1.0 or self.temporal != 1.0

    def branches(self) -> tuple[str, ...]:
        """Names of the UNet evaluations one step needs, in the order they are batched."""
        if self.image_model:
            return ("image_uncond", "image_cond") if self.needs_uncond_branch else ("image_cond",)
        names = []
        if self.needs_image_branch:
            names.append("image_uncond")
        if self.needs_uncond_branch:
            names.append("video_uncond")
        names.append("video_cond")
        return tuple(names)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Plain classifier-free guidance: ``uncond + w * (cond - uncond)``.

    uncond, cond: (b, ...) predictions with content dropped / with content. Returns (b, ...).
    """
    return uncond + w * (cond - uncond)


def temporal_guidance(
    image_uncond: torch.Tensor,
    video_uncond: torch.Tensor,
    video_cond: torch.Tensor,
    w: float,
    w_t: float,
) -> torch.Tensor:
    """Eq. 8: ``image_uncond + w_t * (video_uncond - image_uncond) + w * (video_cond - video_uncond)``.

    image_uncond: (b, ...) the image model per frame, content dropped.
    video_uncond: (b, ...) the video model, content dropped.
    video_cond:   (b, ...) the video model with content.
    w_t > 1 smooths over time, w_t < 1 adds per-frame ("hand-drawn") variation.
    """
    return image_uncond + w_t * (video_uncond - image_uncond) + w * (video_cond - video_uncond)


def guide(predictions: dict[str, torch.Tensor], scales: GuidanceScales) -> torch.Tensor:
    """Combine the branch predictions named by ``scales.branches()`` into one guided prediction."""
    if scales.image_model:
        if scales.needs_uncond_branch:
            return classifier_free_guidance(predictions["image_uncond"], predictions["image_cond"], scales.content)
        return predictions["image_cond"]
    if scales.needs_image_branch:
        return temporal_guidance(
            predictions["image_uncond"],
            predictions["video_uncond"],
            predictions["video_cond"],
            scales.content,
            scales.temporal,
        )
    if scales.needs_uncond_branch:
        return classifier_free_guidance(predictions["video_uncond"], predictions["video_cond"], scales.content)
    return predictions["video_cond"]
