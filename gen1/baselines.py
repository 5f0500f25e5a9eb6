"""The baselines the paper compares against (Sec. 4) and the ~s ablation, from the same `Gen1Models` bundle
and the same parts as `gen1.sampling.edit_video` (`BranchPredictor`, one guidance formula in
`gen1.guidance`, the same windows).

- **Per-frame editing**, `per_frame_video`: the image model alone on every frame with classifier-free
  guidance on content, ``mu_pi(z, t, 0, s) + w * (mu_pi(z, t, c, s) - mu_pi(z, t, 0, s))``: temporal layers
  off in every branch (the UNet runs in image mode, so the temporal weights cannot matter), depth structure
  kept at the settings' t_s, masks and windows as `edit_video` does them. This is NOT eq. 8 with w_t = 0,
  whose ``w`` term comes from the video model; that is a point of our method's w_t sweep (`edit_video` with
  ``temporal_guidance=0``).
- **SDEdit per frame** (Meng et al. 2022), `sdedit_video`: encode each input frame, noise its latent to
  strength ``s`` (a fraction of the schedule), then denoise each frame on its own with the image model
  (temporal layers off) under classifier-free content guidance. No structure conditioning: the 8 structure
  channels (4 depth latent + 4 t_s embedding) hold zeros, as in training stages 1-2 before structure was
  added (`gen1.structure.unstructured_input`); the structure comes only from the noised input.
- **Without structure** (the paper's ~s ablation), `no_structure_video`: the same SDEdit-style denoising,
  of the whole clip with the *video* model (temporal layers on), structure channels empty as above, CFG on
  content. The paper's ablation model is trained without structure; a UNet trained with structure (stages
  3-4) sees here the empty channels of its stages 1-2, so for the ablation proper give it a stage-2 UNet.

Masks of the SDEdit-style methods blend the output with the input frames (1 = edit); `per_frame_video`'s
are `edit_video`'s (latents outside the mask replaced at every step).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from gen1.guidance import GuidanceScales
from gen1.models import Gen1Models
from gen1.sampling import (
    BranchPredictor,
    Content,
    EditResult,
    EditSettings,
    check_inputs,
    decode_latents,
    edit_video,
    embed_content,
    encode_frames,
    predict_windows,
    window_plan,
)
from gen1.schedule import SAMPLERS, make_sampler
from gen1.structure import unstructured_input
from gen1.video import tensor_to_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDEditSettings:
    """Test-time controls of the SDEdit-style methods (`sdedit_video`, `no_structure_video`)."""

    strength: float = 0.6  # s in (0, 1]: the fraction of the schedule the input is noised to (1 = from noise)
    guidance: float = 7.5  # w, classifier-free content guidance
    steps: int = 50  # steps of the full schedule; about strength * steps are run
    seed: int = 0
    sampler: str = "ddim"
    window_overlap: int = 2  # frames shared by consecutive windows of a long clip (as in EditSettings)
    batch_branches: bool = True  # the two guidance branches as one batched UNet forward

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"SDEdit strength must be in (0, 1], got {self.strength}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")


def start_index(steps: int, strength: float) -> int:
    """Index into the sampler's timesteps where SDEdit starts: the last ``round(strength * steps)`` steps run."""
    run = min(steps, max(1, round(strength * steps)))
    return steps - run


def per_frame_video(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: EditSettings,
    mask: np.ndarray | None = None,
) -> EditResult:
    """The image model alone on every frame of ``video`` (uint8 (f, h, w, 3), h and w multiples of 8):
    ``mu_pi(0) + w (mu_pi(c) - mu_pi(0))`` with w = ``settings.guidance``, t_s = ``settings.structure_strength``.

    mask: optional (f, h, w), 1 = edit, 0 = keep, as in `edit_video`. ``settings.temporal_guidance`` is not
    used: no branch is the video model.
    """
    scales = GuidanceScales(content=settings.guidance, image_model=True)
    result = edit_video(models, video, content, settings, mask, scales=scales)
    return dataclasses.replace(result, stats={**result.stats, "method": "per_frame"})


def sdedit_video(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: SDEditSettings = SDEditSettings(),
    mask: np.ndarray | None = None,
) -> EditResult:
    """SDEdit every frame of ``video`` (uint8 (f, h, w, 3), h and w multiples of 8) independently with the
    image model, structure channels empty.

    mask: optional (f, h, w), 1 = edit: outside it the output keeps the input frames.
    """
    return _sdedit(models, video, content, settings, mask, temporal=False)


def no_structure_video(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: SDEditSettings = SDEditSettings(),
    mask: np.ndarray | None = None,
) -> EditResult:
    """SDEdit-style denoising of the whole ``video`` (uint8 (f, h, w, 3)) with the video model (temporal
    layers on), structure channels empty: the ~s ablation.

    mask: optional (f, h, w), 1 = edit: outside it the output keeps the input frames.
    """
    return _sdedit(models, video, content, settings, mask, temporal=True)


@torch.no_grad()
def _sdedit(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: SDEditSettings,
    mask: np.ndarray | None,
    temporal: bool,
) -> EditResult:
    """Noise the input's latents to ``settings.strength``, then denoise them under classifier-free content
    guidance of the video model (``temporal``) or of the image model on each frame, structure channels empty."""
    method = "no_structure" if temporal else "sdedit"
    start = time.perf_counter()
    video = check_inputs(video, mask)
    f, h, w, _ = video.shape
    device = models.device

    c = embed_content(models, content, settings.seed)
    # w_t = 1: no image branch; plain classifier-free guidance of the video model, or of the image model
    predictor = BranchPredictor(models, c, GuidanceScales(settings.guidance, 1.0, image_model=not temporal),
                                settings.batch_branches)
    window = models.specs.frames
    starts, weights = window_plan(f, window, settings.window_overlap)
    weights = weights.to(device)

    scheduler = make_sampler(settings.sampler, settings.steps)
    timesteps = scheduler.timesteps[start_index(settings.steps, settings.strength) :]
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    z0 = encode_frames(models, video)[None].to(device)  # (1, 4, f, h/8, w/8)
    noise = torch.randn(z0.shape, generator=gen).to(device)
    z = scheduler.add_noise(z0, noise, timesteps[:1])
    extra = models.unet.in_channels - z0.shape[1]

    for t in timesteps:
        x = unstructured_input(scheduler.scale_model_input(z, t), extra)  # (1, 12, f, h/8, w/8)
        v = predict_windows(predictor, x, t.to(device), starts, window, weights)
        z = scheduler.step(v, t, z, generator=gen).prev_sample

    frames = decode_latents(models, z[0])
    result = tensor_to_frames(frames.cpu())
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)[..., None]
        result = np.clip(m * result + (1.0 - m) * video, 0, 255).round().astype(np.uint8)
    seconds = time.perf_counter() - start
    log.info("%s: %d frames %dx%d, strength %.2f, %d steps in %.1fs", method, f, w, h, settings.strength,
             len(timesteps), seconds)
    return EditResult(
        frames=result,
        depth=None,
        latents=z[0].cpu(),
        settings=settings,
        content_kind=content.kind if isinstance(content, Content) else "embedding",
        seconds=seconds,
        unet_forwards=predictor.forwards,
        stats={"method": method, "strength": settings.strength, "steps_run": len(timesteps)},
    )
