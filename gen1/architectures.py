"""Full-size architectures of every component, buildable on the ``meta`` device (no memory, no weights).

`gen1 models` uses them to report each component's class and parameter count before any weights exist,
and tests pin the counts to the published ones (SD 1.5's UNet: 859,520,964 parameters). The configs are
``COMPONENT_CONFIGS["sd15"]`` of `gen1.config`, hard-coded copies of the released ones, so nothing is
downloaded. Tiny specs (``tiny:<component>``) are built through `gen1.weights` instead: tiny models are
cheap, and `gen1.tiny` builds them from ``COMPONENT_CONFIGS["tiny"]``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gen1 import weights
from gen1.config import COMPONENT_CONFIGS, RANDOM_PREFIXES, ModelSpecs
from gen1.unet import VideoUNet

log = logging.getLogger(__name__)

# Components `build_component` knows: the preset's six weight specs plus the inflated video UNet.
COMPONENTS = ("vae", "unet", "video_unet", "clip", "depth", "caption", "prior")
# Which weight spec a component is built from (the video UNet inflates the image UNet's weights).
SPEC_FIELD = {"video_unet": "unet"}


def parameter_count(module: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once); works on meta modules."""
    return sum(p.numel() for p in module.parameters())


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def build_full_size(component: str, specs: ModelSpecs, device: str | torch.device = "meta") -> nn.Module:
    """A randomly initialised (on ``meta``: unallocated) full-size ``component`` of the sd15 architecture."""
    configs = COMPONENT_CONFIGS["sd15"]
    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(configs["unet"])
        if component == "video_unet":
            return VideoUNet.from_image_unet(build_full_size("unet", specs, device), specs.temporal)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(configs["vae"])
        if component == "prior":
            from diffusers import PriorTransformer

            return PriorTransformer.from_config(configs["prior"])
        if component == "clip":
            from open_clip.model import CLIP

            # The class open_clip's create_model builds for this config; called directly so no "no pretrained
            # weights" warning is logged for what is meant to be weightless.
            return CLIP(**configs["clip"])
        if component == "depth":
            from transformers import DPTConfig, DPTForDepthEstimation

            return DPTForDepthEstimation(DPTConfig(**configs["depth"]))
        if component == "caption":
            from transformers import BlipConfig, BlipForConditionalGeneration

            return BlipForConditionalGeneration(BlipConfig(**configs["caption"]))
    raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")


def build_tiny(component: str, specs: ModelSpecs) -> nn.Module:
    """The tiny (or mini) random model of ``component`` through the regular loaders (built once and cached)."""
    if component == "video_unet":
        return VideoUNet.from_image_unet(weights.load_image_unet(specs.unet), specs.temporal)
    spec = getattr(specs, component)
    loaders = {
        "vae": weights.load_vae,
        "unet": weights.load_image_unet,
        "prior": weights.load_prior,
        "clip": lambda s: weights.load_clip_model(s)[0],
        "depth": lambda s: weights.load_depth_model(s)[0],
        "caption": lambda s: weights.load_caption_model(s)[0],
    }
    return loaders[component](spec)


def spec_of(component: str, specs: ModelSpecs) -> str:
    return getattr(specs, SPEC_FIELD.get(component, component))


def build_component(component: str, specs: ModelSpecs, device: str | torch.device = "meta") -> nn.Module:
    """``component`` of ``specs`` without its trained weights: the full-size architecture on ``device``
    (default ``meta``: nothing allocated), or, for a ``tiny:`` / ``mini:`` spec, that random model (moved to
    ``device``).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if spec_of(component, specs).startswith(RANDOM_PREFIXES):
        return build_tiny(component, specs).to(device)
    return build_full_size(component, specs, device)
