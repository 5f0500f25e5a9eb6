"""The set of models one preset names, loaded once: what an edit, a training step or an actor holds.

Loading checks every weight spec *before* building anything, so a missing component fails at once with
every missing spec listed, not after minutes of loading the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from gen1.clip import ClipEmbedder
from gen1.config import ModelSpecs
from gen1.content import ContentEncoder
from gen1.depth import DepthEstimator
from gen1.devices import default_device, default_dtype
from gen1.prior import Prior
from gen1.structure import StructureEncoder
from gen1.unet import VideoUNet, load_video_unet
from gen1.weights import WeightsNotFoundError, load_vae, resolve_spec

log = logging.getLogger(__name__)


def check_weights(specs: ModelSpecs, components: tuple[str, ...]) -> None:
    """Resolve every named component's spec; raise one error listing all that are missing."""
    problems = []
    for component in components:
        try:
            resolve_spec(getattr(specs, component))
        except WeightsNotFoundError as err:
            problems.append(f"- {component}: {err}")
    if problems:
        raise WeightsNotFoundError(
            f"weights missing for preset {specs.name!r}:\n" + "\n".join(problems)
        )


def check_editor_weights(specs: ModelSpecs, editors: Sequence[str],
                         overrides: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Resolve the weight specs of every editor but Gen-1 (`gen1.editors.editor_weights`; Gen-1's are the
    preset's, `check_weights`); raise one error listing all that are missing."""
    from gen1.editors import editor_weights

    problems = []
    for name in editors:
        if name == "gen1":
            continue
        for role, spec in editor_weights(name, specs, overrides).items():
            try:
                resolve_spec(spec, component=f"{name}.{role}")
            except WeightsNotFoundError as err:
                problems.append(f"- editor {name} {role}: {err}")
    if problems:
        raise WeightsNotFoundError("weights missing for the editors:\n" + "\n".join(problems))


@dataclass
class Gen1Models:
    """VAE, video UNet, structure (depth -> latent) and content (CLIP, prior) encoders of one preset."""

    specs: ModelSpecs
    vae: AutoencoderKL
    unet: VideoUNet
    structure: StructureEncoder
    content: ContentEncoder
    device: str
    dtype: torch.dtype

    @classmethod
    def load(
        cls, specs: ModelSpecs, device: str | None = None, dtype: torch.dtype | None = None
    ) -> Gen1Models:
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        check_weights(specs, ("vae", "unet", "clip", "depth", "prior"))
        log.info("loading models %s on %s (%s)", specs.label(), device, dtype)
        vae = load_vae(specs.vae, device=device, dtype=dtype).eval()
        unet = load_video_unet(specs.unet, specs.temporal).to(device=device, dtype=dtype).eval()
        depth = DepthEstimator(specs.depth, device=device)
        clip = ClipEmbedder(specs.clip, device=device, convention=specs.content)
        prior = Prior.load(specs.prior, device=device)
        if clip.dim != unet.cross_attention_dim:
            raise ValueError(
                f"CLIP embedding width {clip.dim} ({specs.clip}) does not match the UNet's cross-attention "
                f"width {unet.cross_attention_dim} ({specs.unet})"
            )
        return cls(
            specs=specs,
            vae=vae,
            unet=unet,
            structure=StructureEncoder(depth, vae),
            content=ContentEncoder(clip, prior),
            device=device,
            dtype=dtype,
        )
