"""The training objective as pure functions: the v-prediction loss (eq. 6) and the random draws it needs.

Every draw takes a ``torch.Generator`` on the CPU, so a run's draws are the same on any device and a
resumed run continues them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen1.structure import conditioning_input, unstructured_input


def draw_image_step(image_batch_prob: float, generator: torch.Generator) -> bool:
    """Whether the next optimizer step is an image step. Workers drawing from generators seeded alike agree."""
    return bool(torch.rand((), generator=generator) < image_batch_prob)


def draw_image_size(sizes: Sequence[tuple[int, int]], generator: torch.Generator) -> tuple[int, int]:
    """The (width, height) of an image step, uniform over ``sizes``; drawn once per step from the generator
    every worker shares (as `draw_image_step`), so all micro-batches of all workers use the same size."""
    if not sizes:
        raise ValueError("draw_image_size needs at least one size")
    return tuple(sizes[int(torch.randint(len(sizes), (), generator=generator))])


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Diffusion timesteps t ~ U{0..T-1}: (n,) long."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator)


def sample_structure_strength(n: int, ts_range: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """t_s ~ U{lo..hi} per example: (n,) long."""
    lo, hi = ts_range
    return torch.randint(int(lo), int(hi) + 1, (n,), generator=generator)


def pick_content_frame(clip_embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The CLIP embedding of one random frame per clip. clip_embedding: (b, f, d) -> (b, d)."""
    b, f, _ = clip_embedding.shape
    index = torch.randint(0, f, (b,), generator=generator).to(clip_embedding.device)
    return clip_embedding[torch.arange(b, device=clip_embedding.device), index]


def drop_content(content: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row by the null content (zeros) with probability ``p``. content: (b, d) -> (b, d)."""
    keep = (torch.rand(content.shape[0], generator=generator) >= p).to(content.device, content.dtype)
    return content * keep[:, None]


def frame_window(
    num_frames: int, frames: int, stride: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Random windows of ``frames`` frames ``stride`` apart inside clips of ``num_frames``: (batch, frames) long."""
    span = (frames - 1) * stride + 1
    if span > num_frames:
        raise ValueError(
            f"a window of {frames} frames with stride {stride} needs clips of >= {span} frames; the data has {num_frames}"
        )
    start = torch.randint(0, num_frames - span + 1, (batch, 1), generator=generator)
    return start + torch.arange(frames)[None] * stride


@dataclass
class UNetInputs:
    """One micro-batch for the video UNet.

    latents: (b, 4, f, h, w) scaled VAE latents; structure: (b, 4, f, h, w) depth latents, or None for
    zeros in every extra input channel; ts: (b,) long; content: (b, d); temporal: False for image steps.
    """

    latents: torch.Tensor
    structure: torch.Tensor | None
    ts: torch.Tensor
    content: torch.Tensor
    temporal: bool
    extra_channels: int = 8

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_frames(self) -> int:
        return self.latents.shape[2]

    def model_input(self, z_t: torch.Tensor) -> torch.Tensor:
        """z_t (b, 4, f, h, w) -> the UNet input (b, 4 + extra, f, h, w)."""

        if self.structure is None:
            return unstructured_input(z_t, self.extra_channels)
        return conditioning_input(z_t, self.structure, self.ts)


def v_prediction_loss(
    model: nn.Module, scheduler: Any, inputs: UNetInputs, generator: torch.Generator
) -> torch.Tensor:
    """Eq. 6 with v targets: mean of (v_theta(z_t, t, s, c) - v)^2 over every element. Returns a float32 scalar.

    z0 = ``inputs.latents``: (b, 4, f, h, w); noise: (b, 4, f, h, w); t: (b,); ``model`` maps the UNet input
    (b, 4 + extra, f, h, w) to v: (b, 4, f, h, w). ``scheduler`` is `gen1.schedule.make_train_scheduler()` (``add_noise``, ``get_velocity``); noise and
    timesteps are drawn on the CPU from ``generator``, so runs are reproducible on any device.
    """
    z0 = inputs.latents.float()
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = sample_timesteps(len(inputs), scheduler.config.num_train_timesteps, generator).to(z0.device)
    z_t = scheduler.add_noise(z0, noise, t)
    target = scheduler.get_velocity(z0, noise, t)
    pred = model(inputs.model_input(z_t), t, inputs.content, temporal=inputs.temporal)
    return F.mse_loss(pred.float(), target.float())
