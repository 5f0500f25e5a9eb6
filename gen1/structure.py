"""Structure conditioning: depth -> t_s blur pyramid -> VAE latent, plus the t_s sinusoid channels.

Gen-1 conditions on the depth of every frame with its detail removed to a degree the user picks:
``t_s`` iterations of (Gaussian blur + 2x downsample), resampled back to frame size and encoded with the
image VAE. The latent is concatenated to the noisy latent z_t, with 4 more channels holding a sinusoidal
embedding of t_s, so the UNet sees 4 + 4 + 4 = 12 input channels.
Without structure (training stages 1-2, and the SDEdit-style baselines of `gen1.baselines`) those 8 channels
are zeros: `unstructured_input`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_TS = 7  # t_s ~ U{0..7} in training (paper, stage 4)
TS_CHANNELS = 4
# Frequencies of the t_s sinusoid run from 1 to 1/TS_MAX_PERIOD rad per step: the fast pair separates
# neighbouring integers, the slow pair (0..1.75 rad over t_s 0..7) keeps its cosine monotonic in t_s.
TS_MAX_PERIOD = 4.0

# 5-tap binomial kernel (Burt & Adelson's Gaussian pyramid, sigma ~ 1 px), applied separably.
_BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """Blur every image with the 5-tap binomial kernel. x: (n, 1, h, w) -> (n, 1, h, w).

    Reflect padding where a side has at least 3 px, replicate padding below that (a 1 px side is left
    as is), so any size down to 1x1 works.
    """
    k = _BINOMIAL_5.to(device=x.device, dtype=x.dtype)
    h, w = x.shape[-2:]
    x = F.pad(x, (2, 2, 0, 0), mode="reflect" if w > 2 else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5))
    x = F.pad(x, (0, 0, 2, 2), mode="reflect" if h > 2 else "replicate")
    return F.conv2d(x, k.view(1, 1, 5, 1))


def blur_downsample_pyramid(depth: torch.Tensor, ts: int) -> torch.Tensor:
    """Remove detail from depth maps: ``ts`` x (blur + 2x downsample), then bilinear back to full size.

    depth: (n, 1, h, w) -> (n, 1, h, w), same dtype. ``ts = 0`` returns the input unchanged (a copy).
    A side that reaches 1 px stays at 1 px (``ceil(n / 2)``) while the blur keeps acting on the other side.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (n, 1, h, w), found shape {tuple(depth.shape)}")
    ts = int(ts)
    if ts < 0:
        raise ValueError(f"t_s must be >= 0, found {ts}")
    if ts == 0:
        return depth.clone()
    h, w = depth.shape[-2:]
    x = depth.float()
    for _ in range(ts):
        x = gaussian_blur(x)[..., ::2, ::2]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.to(depth.dtype)


def ts_embedding(ts: torch.Tensor | int, channels: int = TS_CHANNELS) -> torch.Tensor:
    """Sinusoidal embedding of the structure strength. ts: (b,) (or an int) -> (b, channels) float32.

    Layout ``[cos(ts * f_0..f_k), sin(ts * f_0..f_k)]`` with frequencies ``TS_MAX_PERIOD ** (-i / k)``.
    """
    if channels % 2:
        raise ValueError(f"t_s embedding needs an even number of channels, found {channels}")
    ts = torch.as_tensor(ts).reshape(-1).float()
    half = channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=ts.device) / max(half - 1, 1)
    freqs = torch.exp(-math.log(TS_MAX_PERIOD) * exponent)
    args = ts[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def ts_channels(ts: torch.Tensor | int, f: int, h: int, w: int) -> torch.Tensor:
    """The t_s embedding broadcast over frames and pixels. ts: (b,) -> (b, 4, f, h, w) (an expanded view)."""
    emb = ts_embedding(ts)
    return emb[:, :, None, None, None].expand(-1, -1, f, h, w)


def conditioning_input(
    z_t: torch.Tensor, structure_latent: torch.Tensor, ts: torch.Tensor | int
) -> torch.Tensor:
    """The video UNet's input: concat(z_t, structure latent, t_s channels) along channels.

    z_t: (b, 4, f, h, w); structure_latent: (b or 1, 4, f, h, w); ts: (b,), (1,) or an int
    -> (b, 12, f, h, w) in z_t's dtype and device.
    """
    if z_t.ndim != 5:
        raise ValueError(f"z_t must be (b, c, f, h, w), found shape {tuple(z_t.shape)}")
    b, _, f, h, w = z_t.shape
    if structure_latent.ndim != 5 or structure_latent.shape[2:] != z_t.shape[2:]:
        raise ValueError(
            f"structure latent must be (b, 4, {f}, {h}, {w}) to match z_t, found {tuple(structure_latent.shape)}"
        )
    if structure_latent.shape[0] not in (1, b):
        raise ValueError(f"structure latent batch must be 1 or {b}, found {structure_latent.shape[0]}")
    ts = torch.as_tensor(ts).reshape(-1)
    if ts.shape[0] not in (1, b):
        raise ValueError(f"t_s must hold 1 or {b} values, found {ts.shape[0]}")
    s = structure_latent.to(device=z_t.device, dtype=z_t.dtype).expand(b, -1, -1, -1, -1)
    c = ts_channels(ts.to(z_t.device), f, h, w).to(z_t.dtype).expand(b, -1, -1, -1, -1)
    return torch.cat([z_t, s, c], dim=1)


def unstructured_input(z_t: torch.Tensor, extra_channels: int = 4 + TS_CHANNELS) -> torch.Tensor:
    """The UNet input without structure, as training stages 1-2 build it (`gen1.training.objective.UNetInputs`
    with no structure): z_t, then zeros in every extra channel (the depth latent's and the t_s embedding's).

    z_t: (b, 4, f, h, w) -> (b, 4 + extra_channels, f, h, w) in z_t's dtype and device.
    """
    if z_t.ndim != 5:
        raise ValueError(f"z_t must be (b, c, f, h, w), found shape {tuple(z_t.shape)}")
    b, _, f, h, w = z_t.shape
    return torch.cat([z_t, z_t.new_zeros(b, extra_channels, f, h, w)], dim=1)


def normalise_per_clip(depth: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map a clip's depth to [-1, 1] with ONE min/max over all frames (so depth does not flicker).

    depth: (f, h, w) -> (f, h, w) float32; a constant clip maps to zeros.
    """
    d = depth.float()
    lo, hi = d.min(), d.max()
    if (hi - lo) < eps:
        return torch.zeros_like(d)
    return (d - lo) / (hi - lo) * 2.0 - 1.0


class StructureEncoder:
    """Frames -> per-clip depth -> t_s pyramid -> VAE latent scaled by ``vae.config.scaling_factor``.

    ``depth`` is a ``gen1.depth.DepthEstimator`` or any callable uint8 (f, h, w, 3) -> (f, h, w); it is
    called once per clip and its output renormalised to [-1, 1] over the whole clip.
    """

    def __init__(self, depth: Callable[[np.ndarray | torch.Tensor], torch.Tensor], vae, batch_size: int = 8):
        self.estimator = depth
        self.vae = vae
        self.batch_size = batch_size

    def depth(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (f, h, w, 3) -> float32 (f, h, w) in [-1, 1], normalised per clip."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (f, h, w, 3), found shape {tuple(frames.shape)}")
        d = torch.as_tensor(self.estimator(frames))
        if d.shape != tuple(frames.shape[:3]):
            raise ValueError(
                f"depth estimator returned shape {tuple(d.shape)}, expected (f, h, w) = {tuple(frames.shape[:3])}"
            )
        return normalise_per_clip(d)

    @torch.no_grad()
    def encode(self, depth: torch.Tensor, ts: int) -> torch.Tensor:
        """depth (f, h, w) in [-1, 1] -> structure latent (4, f, h/8, w/8) in the VAE's dtype and device."""
        if depth.ndim != 3:
            raise ValueError(f"depth must be (f, h, w), found shape {tuple(depth.shape)}")
        f, h, w = depth.shape
        if h % 8 or w % 8:
            raise ValueError(f"depth height and width must be multiples of 8, found {h}x{w}")
        param = next(self.vae.parameters())
        d = blur_downsample_pyramid(depth.to(param.device, torch.float32)[:, None], ts)
        x = d.expand(-1, 3, -1, -1).to(param.dtype)  # the VAE takes RGB: depth replicated to 3 channels
        scale = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = [
            (self.vae.encode(chunk).latent_dist.mode() - shift) * scale for chunk in x.split(self.batch_size)
        ]
        return torch.cat(latents).permute(1, 0, 2, 3).contiguous()

    def __call__(self, frames: np.ndarray | torch.Tensor, ts: int) -> torch.Tensor:
        """uint8 (f, h, w, 3) -> structure latent (4, f, h/8, w/8)."""
        return self.encode(self.depth(frames), ts)
