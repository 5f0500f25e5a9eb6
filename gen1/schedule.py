"""The noise schedule shared by training and sampling, the samplers built on it, and the prior's scheduler
(diffusers schedulers).

Gen-1 trains with v-prediction and samples with DDIM; both must use the same betas, so both are made
here from one `NoiseSchedule`. The default is Stable Diffusion 1.5's schedule, which the UNet starts from.

The prior (`gen1.prior`) has a schedule of its own, Karlo's ``UnCLIPScheduler``; a saved prior keeps its
config in ``PRIOR_SCHEDULER_SUBFOLDER``, and `load_prior_scheduler` finds it (or Karlo's) next to a prior.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "dpmpp")

# As diffusers' conversion of kakaobrain/karlo-v1-alpha (scripts/convert_kakao_brain_unclip_to_diffusers.py).
KARLO_PRIOR_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    variance_type="fixed_small_log",
    clip_sample=True,
    clip_sample_range=5.0,
    prediction_type="sample",
    beta_schedule="squaredcos_cap_v2",
)
PRIOR_SCHEDULER_SUBFOLDER = "scheduler"  # a saved prior's scheduler config, below the prior's directory


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


def karlo_scheduler() -> UnCLIPScheduler:
    """The prior's reverse process as Karlo runs it (``prediction_type="sample"``, clip range 5)."""
    return UnCLIPScheduler(**KARLO_PRIOR_SCHEDULER_CONFIG)


def load_prior_scheduler(path: Path) -> UnCLIPScheduler:
    """The scheduler of the prior saved in ``path``: ``path/scheduler`` (ours), else Karlo's sibling
    ``../prior_scheduler``, else Karlo's config."""
    for candidate in (path / PRIOR_SCHEDULER_SUBFOLDER, path.parent / "prior_scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            return UnCLIPScheduler.from_pretrained(candidate)
    log.info("no scheduler config next to prior %s: using Karlo's prior scheduler", path)
    return karlo_scheduler()
