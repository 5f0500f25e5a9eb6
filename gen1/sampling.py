"""Editing a video: DDIM (or DPM-Solver++) with v-prediction, eq. 8 guidance, t_s control and masks.

One public entry point, `edit_video`, over a `Gen1Models` bundle. Per edit:

1. structure: depth of every frame -> t_s blur pyramid -> VAE latent, computed once (not per step);
2. content: a CLIP image embedding, from a reference image or from a text prompt through the prior;
3. sampling from noise, each step evaluating the UNet branches that eq. 8 needs (image-uncond,
   video-uncond, video-cond) as ONE batched forward with a per-sample temporal mask;
4. masked edits replace the latent outside the mask, at every step, by the input's latent noised to that
   step; the decoded output keeps the input's VAE reconstruction outside the mask;
5. videos longer than the model's window are denoised in overlapping windows whose predictions are
   blended at every step, so any length works.

`gen1.baselines` builds the paper's comparisons from the same parts (`BranchPredictor`, `window_plan`,
`predict_windows`, `encode_frames`, `decode_latents`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from gen1.guidance import GuidanceScales, guide
from gen1.masks import latent_mask
from gen1.models import Gen1Models
from gen1.schedule import SAMPLERS, make_sampler
from gen1.structure import conditioning_input
from gen1.video import frames_to_tensor, tensor_to_frames

log = logging.getLogger(__name__)

MAX_STRUCTURE_STRENGTH = 7


@dataclass(frozen=True)
class Content:
    """What sets the content of an edit: a text prompt (through the prior) or a reference image."""

    text: str | None = None
    image: np.ndarray | None = None  # uint8 (h, w, 3)
    image_uri: str | None = None  # for the manifest; the pixels are in `image`

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ValueError("content needs exactly one of text= or image=")

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image"


@dataclass(frozen=True)
class EditSettings:
    """Test-time controls of one edit (names as in the paper in comments)."""

    structure_strength: int = 3  # t_s in 0..7: higher keeps less structure
    guidance: float = 7.5  # w, content guidance
    temporal_guidance: float = 1.0  # w_t, eq. 8; 1 = plain classifier-free guidance
    steps: int = 50
    seed: int = 0
    sampler: str = "ddim"
    window_overlap: int = 2  # frames shared by consecutive windows of a long video
    batch_branches: bool = True  # the guidance branches as one batched UNet forward

    def __post_init__(self) -> None:
        if not 0 <= self.structure_strength <= MAX_STRUCTURE_STRENGTH:
            raise ValueError(f"structure_strength (t_s) must be in 0..7, got {self.structure_strength}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def scales(self) -> GuidanceScales:
        return GuidanceScales(content=self.guidance, temporal=self.temporal_guidance)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EditResult:
    frames: np.ndarray  # uint8 (f, h, w, 3): the edited video
    depth: np.ndarray | None  # float32 (f, h, w) in [-1, 1]: the input's depth (before the t_s pyramid); None
    # for the methods without structure (gen1.baselines' SDEdit-style ones)
    latents: torch.Tensor  # (4, f, h/8, w/8) final latents
    settings: Any  # EditSettings (edit_video, per_frame_video) or gen1.baselines.SDEditSettings
    content_kind: str
    seconds: float
    unet_forwards: int  # UNet forward calls made (a batched call counts once)
    stats: dict = field(default_factory=dict)


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """Start frames of overlapping windows covering ``num_frames``; the last window ends at the end."""
    if num_frames <= window:
        return [0]
    if not 0 <= overlap < window:
        raise ValueError(f"window_overlap must be in [0, {window}), got {overlap}")
    hop = window - overlap
    starts = list(range(0, num_frames - window + 1, hop))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def window_weights(window: int, overlap: int) -> torch.Tensor:
    """(window,) blending weights: linear ramps over the overlaps, 1 in the middle, never 0."""
    w = torch.ones(window)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = ramp
        w[window - overlap :] = ramp.flip(0)
    return w


def window_plan(num_frames: int, window: int, overlap: int) -> tuple[list[int], torch.Tensor]:
    """The windows over ``num_frames`` frames of a model that takes ``window``: their starts
    (`window_starts`) and blending weights (min(window, num_frames),) (`window_weights`)."""
    starts = window_starts(num_frames, window, overlap)
    return starts, window_weights(min(window, num_frames), overlap if len(starts) > 1 else 0)


def check_inputs(video: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The checks of every editor's inputs: ``video`` uint8 (f, h, w, 3) with h and w multiples of 8 (the
    VAE's factor), ``mask`` None or (f, h, w). Returns ``video`` as an array."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (f, h, w, 3), got {video.dtype} {video.shape}")
    f, h, w, _ = video.shape
    if h % 8 or w % 8:
        raise ValueError(f"frame size must be a multiple of 8, got {w}x{h}")
    if mask is not None and np.asarray(mask).shape != (f, h, w):
        raise ValueError(f"mask must have shape {(f, h, w)}, got {np.asarray(mask).shape}")
    return video


@torch.no_grad()
def encode_frames(models: Gen1Models, frames: np.ndarray, chunk: int = 8) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> scaled VAE latents (4, f, h/8, w/8), deterministic (posterior mean)."""
    x = frames_to_tensor(frames).to(models.device, models.dtype)
    parts = [models.vae.encode(x[i : i + chunk]).latent_dist.mean for i in range(0, len(x), chunk)]
    z = torch.cat(parts) * models.vae.config.scaling_factor
    return z.float().permute(1, 0, 2, 3)


@torch.no_grad()
def decode_latents(models: Gen1Models, z: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Scaled latents (4, f, h/8, w/8) -> float frames (f, 3, h, w) in [-1, 1]."""
    z = (z.permute(1, 0, 2, 3) / models.vae.config.scaling_factor).to(models.device, models.dtype)
    parts = [models.vae.decode(z[i : i + chunk]).sample for i in range(0, len(z), chunk)]
    return torch.cat(parts).float().clamp(-1, 1)


class BranchPredictor:
    """Evaluates the UNet branches of one denoising step that ``scales`` names, batched or one by one, and
    guides them (`gen1.guidance.guide`). When no branch needs the temporal layers (the image model in every
    branch: ``scales.image_model``) the UNet runs in image mode: its temporal layers are skipped, not masked."""

    def __init__(self, models: Gen1Models, content: torch.Tensor, scales: GuidanceScales, batched: bool = True):
        self.models = models
        self.scales = scales
        self.batched = batched
        null = models.content.null().to(content)
        # branch -> (content embedding, temporal layers on?)
        self.spec = {
            "image_uncond": (null, 0.0),
            "image_cond": (content, 0.0),
            "video_uncond": (null, 1.0),
            "video_cond": (content, 1.0),
        }
        self.names = scales.branches()
        self.temporal = any(self.spec[k][1] for k in self.names)
        self.forwards = 0

    def _mask(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor | None:
        if not self.temporal:
            return None
        return torch.tensor([self.spec[k][1] for k in names], device=x.device, dtype=self.models.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (1, 12, f, h, w) UNet input -> guided prediction (1, 4, f, h, w), float32."""
        names = self.names
        unet, dtype = self.models.unet, self.models.dtype
        if self.batched:
            n = len(names)
            content = torch.stack([self.spec[k][0] for k in names]).to(dtype)
            out = unet(x.expand(n, *x.shape[1:]).to(dtype), t.expand(n), content, video_mask=self._mask(names, x),
                       temporal=self.temporal)
            self.forwards += 1
            preds = {k: out[i : i + 1].float() for i, k in enumerate(names)}
        else:
            preds = {}
            for k in names:
                emb = self.spec[k][0]
                preds[k] = unet(x.to(dtype), t.expand(1), emb[None].to(dtype), video_mask=self._mask((k,), x),
                                temporal=self.temporal).float()
                self.forwards += 1
        return guide(preds, self.scales)


def embed_content(models: Gen1Models, content: Content | torch.Tensor, seed: int) -> torch.Tensor:
    """A CLIP image embedding (dim,) from text (via the prior), a reference image, or as given."""
    if isinstance(content, torch.Tensor):
        return content.to(models.device).float()
    if content.text is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return models.content.from_text(content.text, generator=gen).to(models.device).float()
    return models.content.from_image(content.image).to(models.device).float()


@torch.no_grad()
def predict_windows(
    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    starts: list[int],
    window: int,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The guided prediction for every frame of ``x`` (1, 12, f, h/8, w/8): one call when one window covers
    the clip, else ``predictor`` on each window from ``starts`` blended with ``weights`` (window,)."""
    if len(starts) == 1:
        return predictor(x, t)
    f = x.shape[2]
    v = torch.zeros((x.shape[0], 4, *x.shape[2:]), device=x.device, dtype=x.dtype)
    total = torch.zeros(f, device=x.device)
    for s in starts:
        v[:, :, s : s + window] += predictor(x[:, :, s : s + window], t) * weights.view(1, 1, -1, 1, 1)
        total[s : s + window] += weights
    return v / total.view(1, 1, -1, 1, 1)


def edit_video(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: EditSettings = EditSettings(),
    mask: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    scales: GuidanceScales | None = None,
) -> EditResult:
    """Edit ``video`` (uint8 (f, h, w, 3), h and w multiples of 8) toward ``content``.

    mask: optional (f, h, w), 1 = edit, 0 = keep. scales: the guidance of every step; None: eq. 8 with
    ``settings.scales`` (`gen1.baselines.per_frame_video` passes the image model's). Returns the edited
    frames and what produced them.
    """
    start = time.perf_counter()
    video = check_inputs(video, mask)
    f, h, w, _ = video.shape
    device = models.device

    depth = models.structure.depth(video)  # (f, h, w), normalised once per clip
    structure = models.structure.encode(depth, settings.structure_strength)  # (4, f, h/8, w/8)
    structure = structure[None].to(device).float()
    ts = torch.tensor([settings.structure_strength], device=device)
    c = embed_content(models, content, settings.seed)

    scheduler = make_sampler(settings.sampler, settings.steps)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    latent_shape = (1, 4, f, h // 8, w // 8)
    z = (torch.randn(latent_shape, generator=gen) * scheduler.init_noise_sigma).to(device)

    keep = known = noise = None
    if mask is not None:
        edit_region = latent_mask(mask, (h // 8, w // 8)).to(device)
        keep = 1.0 - edit_region
        known = encode_frames(models, video)[None].to(device)
        noise = torch.randn(latent_shape, generator=gen).to(device)

    predictor = BranchPredictor(models, c, scales or settings.scales, settings.batch_branches)
    window = models.specs.frames
    starts, weights = window_plan(f, window, settings.window_overlap)
    weights = weights.to(device)

    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        t_dev = t.to(device)
        z_in = scheduler.scale_model_input(z, t)
        x = conditioning_input(z_in, structure, ts)  # (1, 12, f, h/8, w/8)
        v = predict_windows(predictor, x, t_dev, starts, window, weights)
        z = scheduler.step(v, t, z, generator=gen).prev_sample
        if keep is not None:
            # the input's latent, noised to the next step (clean after the last): inpainting-style masks
            known_t = scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2]) if i + 1 < len(timesteps) else known
            z = keep * known_t + (1.0 - keep) * z
        if progress is not None:
            progress(i + 1, len(timesteps))

    frames = decode_latents(models, z[0])
    if mask is not None:
        reconstruction = decode_latents(models, known[0])
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=frames.device)[:, None]
        frames = m * frames + (1.0 - m) * reconstruction
    seconds = time.perf_counter() - start
    log.info(
        "edited %d frames %dx%d in %.1fs (%d steps, %s, %d UNet forwards)",
        f, w, h, seconds, settings.steps, settings.sampler, predictor.forwards,
    )
    return EditResult(
        frames=tensor_to_frames(frames.cpu()),
        depth=depth.cpu().numpy().astype(np.float32),
        latents=z[0].cpu(),
        settings=settings,
        content_kind=content.kind if isinstance(content, Content) else "embedding",
        seconds=seconds,
        unet_forwards=predictor.forwards,
    )
