"""The miniature's VAE training (`gen1.training.vae`): its loss by hand, and a short run that lowers it."""

import numpy as np
import pytest
import torch

from gen1.training.vae import VaeTrainConfig, frames_to_tensor, reconstruct, train_vae, vae_loss


def test_vae_loss_is_l1_plus_weighted_kl():
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.full((1, 3, 2, 2), 0.5)
    mean, logvar = torch.ones(1, 4, 1, 1), torch.zeros(1, 4, 1, 1)
    # L1 0.5; KL per element 0.5 * (1 + 1 - 1 - 0) = 0.5
    assert vae_loss(x, recon, mean, logvar, kl_weight=0.0).item() == pytest.approx(0.5)
    assert vae_loss(x, recon, mean, logvar, kl_weight=2.0).item() == pytest.approx(1.5)


def test_frames_to_tensor_maps_uint8_to_minus_one_one():
    frames = np.array([[[[0, 255, 0]]]], np.uint8)  # (1, 1, 1, 3)
    assert frames_to_tensor(frames).flatten().tolist() == [-1.0, 1.0, -1.0]


def test_a_short_vae_run_lowers_the_reconstruction_error_and_respects_its_time_budget():
    from diffusers import AutoencoderKL

    from gen1.config import COMPONENT_CONFIGS

    torch.manual_seed(0)
    vae = AutoencoderKL(**COMPONENT_CONFIGS["tiny"]["vae"])
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 32, dtype=np.float32)
    frames = np.stack([np.stack([np.broadcast_to(x[None, :] * a, (32, 32)) for a in rng.uniform(0.2, 1, 3)], -1)
                       for _ in range(8)]).astype(np.uint8)  # 8 smooth colour ramps, 32x32

    def error() -> float:
        return float(np.abs(reconstruct(vae, frames).astype(float) - frames).mean())

    before = error()
    result = train_vae(vae, frames, VaeTrainConfig(lr=3e-3, batch_size=8, max_steps=40, log_every=10))
    assert result.steps == 40 and len(result.losses) == 40
    assert error() < 0.7 * before
    timed = train_vae(vae, frames, VaeTrainConfig(batch_size=8, max_steps=10**6, max_seconds=0.5))
    assert 1 <= timed.steps < 10**6 and timed.seconds < 10
