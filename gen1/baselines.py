"""Per-frame baselines the paper compares against (Sec. 4), built from the same `Gen1Models` bundle.

- **Per-frame editing**: `gen1.sampling.edit_video` with ``temporal_guidance=0``: eq. 8 with w_t = 0 is the
  image model applied to every frame independently (``mu_pi``), depth structure kept. No code here.
- **SDEdit per frame** (Meng et al. 2022), `sdedit_video`: encode each input frame, noise its latent to
  strength ``s`` (a fraction of the schedule), then denoise each frame on its own with the image model
  (temporal layers off) under classifier-free content guidance. The structure comes only from the noised
  input, as in SDEdit: the depth channels get the weakest structure conditioning the model was trained
  with (t_s = 7, the coarsest blur level) so depth adds as little structure as the trained model allows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from gen1.guidance import classifier_free_guidance
from gen1.models import Gen1Models
from gen1.sampling import (
    MAX_STRUCTURE_STRENGTH,
    Content,
    EditResult,
    EditSettings,
    check_inputs,
    decode_latents,
    embed_content,
    encode_frames,
)
from gen1.schedule import make_sampler
from gen1.structure import conditioning_input
from gen1.video import tensor_to_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDEditSettings:
    strength: float = 0.6  # s in (0, 1]: the fraction of the schedule the input is noised to (1 = from noise)
    guidance: float = 7.5  # w, classifier-free content guidance
    steps: int = 50  # steps of the full schedule; about strength * steps are run
    seed: int = 0
    sampler: str = "ddim"

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"SDEdit strength must be in (0, 1], got {self.strength}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def as_edit_settings(self) -> EditSettings:
        """The `EditSettings` this run corresponds to (for manifests): image model, weakest structure."""
        return EditSettings(
            structure_strength=MAX_STRUCTURE_STRENGTH,
            guidance=self.guidance,
            temporal_guidance=0.0,
            steps=self.steps,
            seed=self.seed,
            sampler=self.sampler,
        )


def start_index(steps: int, strength: float) -> int:
    """Index into the sampler's timesteps where SDEdit starts: the last ``round(strength * steps)`` steps run."""
    run = min(steps, max(1, round(strength * steps)))
    return steps - run


@torch.no_grad()
def sdedit_video(
    models: Gen1Models,
    video: np.ndarray,
    content: Content | torch.Tensor,
    settings: SDEditSettings = SDEditSettings(),
    mask: np.ndarray | None = None,
) -> EditResult:
    """SDEdit every frame of ``video`` (uint8 (f, h, w, 3), h and w multiples of 8) independently.

    mask: optional (f, h, w), 1 = edit: outside it the output keeps the input frames.
    """
    start = time.perf_counter()
    video = check_inputs(video, mask)
    f, h, w, _ = video.shape
    device, dtype = models.device, models.dtype

    depth = models.structure.depth(video)
    structure = models.structure.encode(depth, MAX_STRUCTURE_STRENGTH)[None].to(device).float()
    ts = torch.tensor([MAX_STRUCTURE_STRENGTH], device=device)
    c = embed_content(models, content, settings.seed)
    null = models.content.null().to(c)
    cond = torch.stack([null, c]).to(dtype)  # (2, d): uncond, cond

    scheduler = make_sampler(settings.sampler, settings.steps)
    timesteps = scheduler.timesteps[start_index(settings.steps, settings.strength) :]
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    z0 = encode_frames(models, video)[None].to(device)  # (1, 4, f, h/8, w/8)
    noise = torch.randn(z0.shape, generator=gen).to(device)  # independent per frame
    z = scheduler.add_noise(z0, noise, timesteps[:1])

    forwards = 0
    for t in timesteps:
        x = conditioning_input(scheduler.scale_model_input(z, t), structure, ts)  # (1, 12, f, h/8, w/8)
        out = models.unet(x.expand(2, *x.shape[1:]).to(dtype), t.to(device).expand(2), cond, temporal=False)
        forwards += 1
        v_uncond, v_cond = out.float().chunk(2)
        v = classifier_free_guidance(v_uncond, v_cond, settings.guidance)
        z = scheduler.step(v, t, z, generator=gen).prev_sample

    frames = decode_latents(models, z[0])
    result = tensor_to_frames(frames.cpu())
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)[..., None]
        result = np.clip(m * result + (1.0 - m) * video, 0, 255).round().astype(np.uint8)
    seconds = time.perf_counter() - start
    log.info("SDEdit: %d frames %dx%d, strength %.2f, %d steps in %.1fs", f, w, h, settings.strength, len(timesteps), seconds)
    return EditResult(
        frames=result,
        depth=depth.cpu().numpy().astype(np.float32),
        latents=z[0].cpu(),
        settings=settings.as_edit_settings(),
        content_kind=content.kind if isinstance(content, Content) else "embedding",
        seconds=seconds,
        unet_forwards=forwards,
        stats={"method": "sdedit", "strength": settings.strength, "steps_run": len(timesteps)},
    )
