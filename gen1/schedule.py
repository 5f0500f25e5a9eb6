"""The noise schedule shared by training and sampling, and the samplers built on it (diffusers schedulers).

Gen-1 trains with v-prediction and samples with DDIM; both must use the same betas, so both are made
here from one `NoiseSchedule`. The default is Stable Diffusion 1.5's schedule, which the UNet starts from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS = ("ddim", "dpmpp")


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"


def make_train_scheduler(schedule: NoiseSchedule = NoiseSchedule()) -> DDPMScheduler:
    """The forward process for training: ``add_noise`` and ``get_velocity`` (the v target)."""
    return DDPMScheduler(**asdict(schedule), clip_sample=False)


def make_sampler(name: str, steps: int, schedule: NoiseSchedule = NoiseSchedule()) -> SchedulerMixin:
    """A deterministic sampler with its timesteps set: ``ddim`` (eta = 0) or ``dpmpp`` (DPM-Solver++ 2M)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    common = dict(asdict(schedule), timestep_spacing="leading", steps_offset=1)
    if name == "ddim":
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    elif name == "dpmpp":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler
