"""Temporal layers that inflate Stable Diffusion's image UNet to video (Gen-1, §3.2).

Two wrappers, each around an unchanged spatial module of the image UNet, as the paper prescribes:

- `TemporalConv`: the spatial ``Conv2d`` of a ResNet block, then a residual 1D convolution over frames;
- `TemporalTransformer`: a diffusers ``Transformer2DModel``, then a `TemporalTransformerBlock`, which
  "mimics its spatial counterpart": GroupNorm, proj_in, a diffusers ``BasicTransformerBlock``
  (self-attention over the frames at each spatial position, GEGLU feed-forward), proj_out, with a learned
  frame-index position embedding.

Ours, not the paper's (it prescribes no initialisation): both temporal residuals have zero-initialised
output layers, so a freshly inflated model equals the image model applied to each frame. The UNet runs on
frames flattened into the batch, ``(b*f, c, h, w)`` with the frames of one sample adjacent (b-major). The
layers learn the frame count and the per-sample video mask from a `FrameContext` that the owning
`gen1.unet.VideoUNet` sets around each forward call; with no state set (the default) they are skipped,
i.e. the wrapped UNet is the image model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
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


class TemporalTransformerBlock(nn.Module):
    """Self-attention over frames at each spatial position, built like diffusers' ``Transformer2DModel``.

    Gen-1 §3.2: the temporal transformer "mimics its spatial counterpart", so this is the spatial block's
    layout with the sequence axis over frames instead of pixels: GroupNorm, ``proj_in``, the learned
    frame-index embedding, ``num_layers`` diffusers ``BasicTransformerBlock``s (LayerNorm -> self-attention,
    LayerNorm -> GEGLU feed-forward, each residual; no cross-attention), ``proj_out``, and a residual
    around the whole. Our choices where the paper is silent:

    - norm groups/eps, ``proj_in``/``proj_out`` type (1x1 Conv2d, or Linear when the spatial block uses a
      linear projection), layer count, dropout, attention bias and upcasting copy the spatial block;
    - the GroupNorm statistics span a clip's frames (as diffusers' ``TransformerTemporalModel`` and
      AnimateDiff do), not one frame;
    - no cross-attention: the paper's temporal block is self-attention over frames, and the content
      embedding already enters through every spatial block's cross-attention;
    - the frame embedding is added to the tokens after ``proj_in`` (std 0.02 init), the heads are
      ``channels / attention_head_dim`` wide;
    - ``proj_out`` is zero-initialised, so the block starts as identity (the paper prescribes no init).
    """

    def __init__(self, spatial: Transformer2DModel, head_dim: int, max_frames: int):
        super().__init__()
        channels = spatial.out_channels
        groups, eps = spatial.norm.num_groups, spatial.norm.eps
        if channels % groups:
            raise ValueError(
                f"temporal transformer: {channels} channels are not divisible by {groups} norm groups"
            )
        head_dim = min(head_dim, channels)
        if channels % head_dim:
            raise ValueError(
                f"temporal transformer: {channels} channels are not divisible by the head width {head_dim}"
            )
        self.heads = channels // head_dim
        self.max_frames = max_frames
        config = spatial.config
        param = next(spatial.parameters())
        linear = isinstance(spatial.proj_in, nn.Linear)
        with torch.device(param.device):
            self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
            self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
            self.position = nn.Embedding(max_frames, channels)
            self.transformer_blocks = nn.ModuleList(
                [
                    BasicTransformerBlock(
                        channels,
                        self.heads,
                        head_dim,
                        dropout=config.dropout,
                        cross_attention_dim=None,
                        activation_fn="geglu",
                        attention_bias=config.attention_bias,
                        only_cross_attention=False,
                        double_self_attention=False,
                        upcast_attention=config.upcast_attention,
                        norm_elementwise_affine=config.norm_elementwise_affine,
                        norm_eps=config.norm_eps,
                    )
                    for _ in range(config.num_layers)
                ]
            )
            self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.to(dtype=param.dtype)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, x: torch.Tensor, num_frames: int, video_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (b*f, c, h, w), video_mask: (b,) or None -> (b*f, c, h, w)."""
        bf, c, h, w = x.shape
        f = num_frames
        b = _frames_per_sample(bf, f)
        if f > self.max_frames:
            raise ValueError(
                f"temporal transformer: {f} frames, but the position table holds {self.max_frames}"
            )
        normed = self.norm(x.unflatten(0, (b, f)).transpose(1, 2)).transpose(1, 2).reshape(bf, c, h, w)
        if isinstance(self.proj_in, nn.Conv2d):
            seq = _frames_to_sequences(self.proj_in(normed), f)
        else:
            seq = self.proj_in(_frames_to_sequences(normed, f))
        seq = seq + self.position(torch.arange(f, device=x.device))
        for block in self.transformer_blocks:
            seq = _per_sequence_chunks(block, seq, self.heads)
        if isinstance(self.proj_out, nn.Conv2d):
            delta = self.proj_out(_sequences_to_frames(seq, b, h, w))
        else:
            delta = _sequences_to_frames(self.proj_out(seq), b, h, w)
        return x + masked_residual(delta.unflatten(0, (b, f)), video_mask).flatten(0, 1)


def _frames_to_sequences(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x: (b*f, c, h, w) -> (b*h*w, f, c): one sequence over frames per sample and pixel."""
    bf, c, h, w = x.shape
    return x.unflatten(0, (bf // num_frames, num_frames)).permute(0, 3, 4, 1, 2).reshape(-1, num_frames, c)


def _sequences_to_frames(seq: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """seq: (b*h*w, f, c) -> (b*f, c, h, w); the inverse of `_frames_to_sequences`."""
    _, f, c = seq.shape
    return seq.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w)


def _per_sequence_chunks(block: nn.Module, seq: torch.Tensor, heads: int) -> torch.Tensor:
    """seq: (n, f, c) -> block(seq), in chunks over n when n * heads exceeds the CUDA grid limit.

    Exact: a transformer block without cross-attention treats each sequence independently.
    """
    chunk = max(1, _MAX_ATTENTION_BATCH // heads)
    if seq.shape[0] <= chunk:
        return block(seq)
    return torch.cat([block(seq[i : i + chunk]) for i in range(0, seq.shape[0], chunk)])


class TemporalTransformer(nn.Module):
    """A diffusers Transformer2DModel, called unchanged, followed by a `TemporalTransformerBlock`.

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
        self.temporal = TemporalTransformerBlock(spatial, config.attention_head_dim, config.max_frames)

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
