"""Temporal layers that inflate Stable Diffusion's image UNet to video (Gen-1, §3.2).

Two wrappers, each around an unchanged spatial module of the image UNet:

- `TemporalConv`: the spatial ``Conv2d`` of a ResNet block, then a residual 1D convolution over frames;
- `TemporalTransformer`: a diffusers ``Transformer2DModel``, then a pre-norm self-attention over frames at
  every spatial position plus a feed-forward, with a learned frame-index position embedding.

Both temporal residuals have zero-initialised output layers, so a freshly inflated model equals the image
model applied to each frame. The UNet runs on frames flattened into the batch, ``(b*f, c, h, w)`` with the
frames of one sample adjacent (b-major). The layers learn the frame count and the per-sample video mask
from a `FrameContext` that the owning `gen1.unet.VideoUNet` sets around each forward call; with no state
set (the default) they are skipped, i.e. the wrapped UNet is the image model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from gen1.config import TemporalConfig

log = logging.getLogger(__name__)

# CUDA attention kernels put the batch (and heads) on a launch-grid axis limited to 65535 blocks; temporal
# attention has one sequence per pixel, so large latents exceed it. Batches above this are chunked.
_MAX_ATTENTION_BATCH = 65535


@dataclass(frozen=True)
class FrameState:
    """What the temporal layers need to know about the current UNet call.

    ``video_mask``: (b,) in the UNet's dtype, 1 = temporal layers on for that sample, 0 = image model per
    frame; None = on for all. ``temporal=False`` skips the temporal layers entirely (image mode).
    """

    num_frames: int = 1
    video_mask: torch.Tensor | None = None
    temporal: bool = False


class FrameContext:
    """Shared by one VideoUNet and all its temporal layers (not global: one per model)."""

    def __init__(self) -> None:
        self.state = FrameState()

    @contextmanager
    def use(self, state: FrameState) -> Iterator[FrameState]:
        """Set ``state`` for the duration of a call; the previous state is restored afterwards."""
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous


def masked_residual(delta: torch.Tensor, video_mask: torch.Tensor | None) -> torch.Tensor:
    """delta: (b, ...) temporal residual; video_mask: (b,) or None -> delta scaled per sample."""
    if video_mask is None:
        return delta
    return delta * video_mask.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))


def _frames_per_sample(batch_frames: int, num_frames: int) -> int:
    if num_frames < 1 or batch_frames % num_frames:
        raise ValueError(
            f"temporal layer got a batch of {batch_frames} frames, expected a multiple of num_frames={num_frames}"
        )
    return batch_frames // num_frames


class TemporalConv(nn.Module):
    """A spatial Conv2d followed by a residual 1D convolution over frames (zero-initialised: identity).

    x: (b*f, c_in, h, w) -> (b*f, c_out, h, w). The temporal kernel is stored as a Conv3d of shape
    (k, 1, 1), i.e. it mixes frames only, never pixels.
    """

    def __init__(self, spatial: nn.Conv2d, context: FrameContext, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"temporal conv kernel size must be odd and positive, found {kernel_size}")
        self.spatial = spatial
        self.context = context
        channels = spatial.out_channels
        self.temporal = nn.Conv3d(
            channels,
            channels,
            (kernel_size, 1, 1),
            padding=(kernel_size // 2, 0, 0),
            device=spatial.weight.device,
            dtype=spatial.weight.dtype,
        )
        nn.init.zeros_(self.temporal.weight)
        nn.init.zeros_(self.temporal.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(x)
        state = self.context.state
        if not state.temporal:
            return y
        bf, c, h, w = y.shape
        b = _frames_per_sample(bf, state.num_frames)
        video = y.unflatten(0, (b, state.num_frames)).transpose(1, 2)  # (b, c, f, h, w)
        delta = masked_residual(self.temporal(video), state.video_mask)
        return y + delta.transpose(1, 2).reshape(bf, c, h, w)


class TemporalAttention(nn.Module):
    """Pre-norm self-attention over frames at each spatial position, then a feed-forward; residual.

    The learned frame-index embedding is added to the attention input (not to the residual stream), and
    the attention and feed-forward output layers are zero-initialised, so the block starts as identity.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        max_frames: int,
        ff_mult: int = 4,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        head_dim = min(head_dim, channels)
        if channels % head_dim:
            raise ValueError(
                f"temporal attention: {channels} channels are not divisible by the head width {head_dim}"
            )
        self.heads = channels // head_dim
        self.max_frames = max_frames
        factory = {"device": device, "dtype": dtype}
        self.position = nn.Embedding(max_frames, channels, **factory)
        self.norm1 = nn.LayerNorm(channels, **factory)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False, **factory)
        self.to_out = nn.Linear(channels, channels, **factory)
        self.norm2 = nn.LayerNorm(channels, **factory)
        self.ff = nn.Sequential(
            nn.Linear(channels, ff_mult * channels, **factory),
            nn.GELU(),
            nn.Linear(ff_mult * channels, channels, **factory),
        )
        nn.init.normal_(self.position.weight, std=0.02)
        for layer in (self.to_out, self.ff[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, num_frames: int, video_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (b*f, c, h, w), video_mask: (b,) or None -> (b*f, c, h, w)."""
        bf, c, h, w = x.shape
        f = num_frames
        b = _frames_per_sample(bf, f)
        if f > self.max_frames:
            raise ValueError(
                f"temporal attention: {f} frames, but the position table holds {self.max_frames}"
            )
        seq = x.unflatten(0, (b, f)).permute(0, 3, 4, 1, 2).reshape(b * h * w, f, c)
        frames = torch.arange(f, device=x.device)
        qkv = self.to_qkv(self.norm1(seq) + self.position(frames))
        q, k, v = qkv.unflatten(-1, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)
        attended = _attention(q, k, v).transpose(1, 2).reshape(b * h * w, f, c)
        attended = self.to_out(attended)
        delta = attended + self.ff(self.norm2(seq + attended))  # (b*h*w, f, c)
        delta = masked_residual(delta.reshape(b, h, w, f, c), video_mask)
        return x + delta.permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (n, heads, f, d) -> (n, heads, f, d); SDPA, chunked over n when n*heads is huge."""
    chunk = max(1, _MAX_ATTENTION_BATCH // q.shape[1])
    if q.shape[0] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk])
            for i in range(0, q.shape[0], chunk)
        ]
    )


class TemporalTransformer(nn.Module):
    """A diffusers Transformer2DModel, called unchanged, followed by a `TemporalAttention` block.

    Accepts the wrapped module's arguments and returns the same structure it returns (a tuple when called
    with ``return_dict=False``, as diffusers' UNet blocks do, else a Transformer2DModelOutput), with the
    sample replaced.
    """

    def __init__(self, spatial: Transformer2DModel, context: FrameContext, config: TemporalConfig):
        super().__init__()
        if not isinstance(spatial, Transformer2DModel):
            raise TypeError(f"TemporalTransformer wraps a Transformer2DModel, found {type(spatial).__name__}")
        if not spatial.is_input_continuous:
            raise ValueError(
                "TemporalTransformer supports continuous (latent image) Transformer2DModels only"
            )
        self.spatial = spatial
        self.context = context
        channels = spatial.out_channels
        param = next(spatial.parameters())
        self.temporal = TemporalAttention(
            channels, config.attention_head_dim, config.max_frames, device=param.device, dtype=param.dtype
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.spatial(*args, **kwargs)
        state = self.context.state
        if not state.temporal:
            return out
        sample = out[0] if isinstance(out, tuple) else out.sample
        sample = self.temporal(sample, state.num_frames, state.video_mask)
        if isinstance(out, tuple):
            return (sample, *out[1:])
        return dataclasses.replace(out, sample=sample)
