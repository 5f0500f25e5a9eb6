"""The sampler checked against an independent reference: diffusers' own `DDIMScheduler` built from Stable
Diffusion 1.5's ``scheduler/scheduler_config.json`` (its values written out below, since no weights or
configs can be downloaded here) with ``prediction_type="v_prediction"``, Gen-1's parameterisation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from gen1.schedule import make_sampler, make_train_scheduler

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _reference(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_equals_diffusers_ddim_from_sd15s_config(steps):
    ours, ref = make_sampler("ddim", steps), _reference(steps)
    assert ref.config.prediction_type == ours.config.prediction_type == "v_prediction"
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps[0] == 1000 - 1000 // steps + 1  # "leading" spacing with steps_offset 1, as SD's
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.final_alpha_cumprod == ref.final_alpha_cumprod  # set_alpha_to_one=False
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 3, 8, 8, generator=gen)
    v = torch.randn(1, 4, 3, 8, 8, generator=gen)
    for t in (ours.timesteps[0], ours.timesteps[steps // 2], ours.timesteps[-1]):
        assert torch.equal(ours.step(v, t, z).prev_sample, ref.step(v, t, z).prev_sample)


def test_training_and_sampling_share_the_betas():
    train, sample, ref = make_train_scheduler(), make_sampler("ddim", 20), _reference(20)
    assert train.config.prediction_type == "v_prediction"
    assert torch.equal(train.betas, sample.betas) and torch.equal(train.betas, ref.betas)
    assert torch.equal(make_sampler("dpmpp", 20).betas, train.betas)
