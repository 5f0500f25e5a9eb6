"""Train a VAE (diffusers ``AutoencoderKL``) on frames: the stand-in for Stable Diffusion's frozen VAE at a
scale that has none (the ``mini`` preset, `jobs.benchmarks.mini_repro`).

Gen-1 keeps SD's VAE frozen and never trains one; this module only gives the miniature an autoencoder of
its own corpus. The objective is SD's first-stage one without the perceptual and adversarial terms: the L1
reconstruction error plus a small KL term towards the unit Gaussian (`vae_loss`). Frames are mirrored with
probability 1/2. Training stops at ``max_steps`` or after ``max_seconds`` of steps, whichever comes first,
and the model is saved with diffusers' ``save_pretrained``, so `gen1.weights.load_vae` loads it like any VAE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gen1.training.state import seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeTrainConfig:
    """One VAE training run."""

    lr: float = 1e-3
    batch_size: int = 16  # frames per step
    kl_weight: float = 1e-6  # SD's first stage: 1e-6
    max_steps: int = 100_000
    max_seconds: float | None = None  # wall-clock budget of the steps; None = only max_steps
    max_grad_norm: float = 1.0
    log_every: int = 50
    seed: int = 0


@dataclass
class VaeTrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float32 (n, 3, h, w) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float) -> torch.Tensor:
    """L1 reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)), both per element (means).

    x, recon: (n, 3, h, w); mean, logvar: (n, c, h/8, w/8) of the posterior -> scalar.
    """
    rec = (recon - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl


def train_vae(vae: torch.nn.Module, frames: np.ndarray, cfg: VaeTrainConfig,
              device: str | torch.device = "cpu") -> VaeTrainResult:
    """Train ``vae`` in place on ``frames`` uint8 (n, h, w, 3), batches drawn at random (seeded)."""
    if len(frames) == 0:
        raise ValueError("train_vae: no frames to train on")
    seed_everything(cfg.seed)
    generator = np.random.default_rng(cfg.seed)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    started = time.perf_counter()
    result = VaeTrainResult(steps=0, seconds=0.0)
    while result.steps < cfg.max_steps:
        idx = generator.integers(0, len(frames), size=min(cfg.batch_size, len(frames)))
        batch = frames[idx]
        flip = generator.random(len(batch)) < 0.5
        batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        x = frames_to_tensor(batch).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = vae_loss(x, recon, posterior.mean, posterior.logvar, cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
        optimizer.step()
        result.steps += 1
        result.losses.append(float(loss.item()))
        elapsed = time.perf_counter() - started
        if result.steps % cfg.log_every == 0:
            log.info("vae step %d: loss %.4f, %.2f steps/s", result.steps, result.losses[-1], result.steps / elapsed)
        if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
            break
    result.seconds = time.perf_counter() - started
    vae.eval()
    log.info("trained the VAE: %d steps in %.1fs, last loss %.4f", result.steps, result.seconds, result.losses[-1])
    return result


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, frames: np.ndarray, batch_size: int = 16,
                device: str | torch.device = "cpu") -> np.ndarray:
    """The VAE's reconstructions (posterior mean, decoded) of ``frames`` uint8 (n, h, w, 3) -> uint8 (n, h, w, 3)."""
    vae.to(device).eval()
    out = []
    for i in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[i : i + batch_size]).to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((recon.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)
