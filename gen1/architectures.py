"""Full-size architectures of every component, buildable on the ``meta`` device (no memory, no weights).

`gen1 models` uses them to report each component's class and parameter count before any weights exist,
and tests pin the counts to the published ones (SD 1.5's UNet: 859,520,964 parameters). Configs are
hard-coded copies of the released ones (diffusers / transformers / open_clip), so nothing is downloaded.
Tiny specs (``tiny:<component>``) are built through `gen1.weights` instead: tiny models are cheap and the
tiny configs live with their builder (`gen1.tiny`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from gen1.config import ModelSpecs

log = logging.getLogger(__name__)

# Components `build_component` knows: the preset's six weight specs plus the inflated video UNet.
COMPONENTS = ("vae", "unet", "video_unet", "clip", "depth", "caption", "prior")
# Which weight spec a component is built from (the video UNet inflates the image UNet's weights).
SPEC_FIELD = {"video_unet": "unet"}

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# kakaobrain/karlo-v1-alpha, prior/config.json (diffusers' conversion uses PriorTransformer's defaults).
KARLO_PRIOR_CONFIG: dict[str, Any] = dict(
    num_attention_heads=32,
    attention_head_dim=64,
    num_layers=20,
    embedding_dim=768,
    num_embeddings=77,
    additional_embeddings=4,
    dropout=0.0,
    time_embed_act_fn="silu",
    norm_in_type=None,
    embedding_proj_norm_type=None,
    encoder_hid_proj_type="linear",
    added_emb_type="prd",
    time_embed_dim=None,
    embedding_proj_dim=None,
    clip_embed_dim=None,
)

# Intel/dpt-large, config.json (ViT-L/16 backbone at 384 px, MiDaS 3.0 head).
DPT_LARGE_CONFIG: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12,
    image_size=384,
    patch_size=16,
    num_channels=3,
    is_hybrid=False,
    qkv_bias=True,
    backbone_out_indices=[5, 11, 17, 23],
    readout_type="project",
    reassemble_factors=[4, 2, 1, 0.5],
    neck_hidden_sizes=[256, 512, 1024, 1024],
    fusion_hidden_size=256,
    head_in_index=-1,
    use_batch_norm_in_fusion_residual=False,
)

# Salesforce/blip-image-captioning-base, config.json (ViT-B/16 at 384 px + BERT-base decoder).
BLIP_BASE_CONFIG: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        bos_token_id=30522,
        eos_token_id=2,
        pad_token_id=0,
        sep_token_id=102,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=512,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=384,
        patch_size=16,
        layer_norm_eps=1e-5,
    ),
    projection_dim=512,
    image_text_hidden_size=256,
)

# open_clip architecture of the OpenAI ViT-L/14 weights (hf:timm/vit_large_patch14_clip_224.openai).
CLIP_MODEL_NAME = "ViT-L-14-quickgelu"


def parameter_count(module: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once); works on meta modules."""
    return sum(p.numel() for p in module.parameters())


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def build_full_size(component: str, specs: ModelSpecs, device: str | torch.device = "meta") -> nn.Module:
    """A randomly initialised (on ``meta``: unallocated) full-size ``component`` of the sd15 architecture."""
    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
        if component == "video_unet":
            from gen1.unet import VideoUNet

            return VideoUNet.from_image_unet(build_full_size("unet", specs, device), specs.temporal)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(SD_VAE_CONFIG)
        if component == "prior":
            from diffusers import PriorTransformer

            return PriorTransformer.from_config(KARLO_PRIOR_CONFIG)
        if component == "clip":
            import open_clip
            from open_clip.model import CLIP

            # The class create_model builds for this config; called directly so no "no pretrained weights"
            # warning is logged for what is meant to be weightless.
            return CLIP(**open_clip.get_model_config(CLIP_MODEL_NAME))
        if component == "depth":
            from transformers import DPTConfig, DPTForDepthEstimation

            return DPTForDepthEstimation(DPTConfig(**DPT_LARGE_CONFIG))
        if component == "caption":
            from transformers import BlipConfig, BlipForConditionalGeneration

            return BlipForConditionalGeneration(BlipConfig(**BLIP_BASE_CONFIG))
    raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")


def build_tiny(component: str, specs: ModelSpecs) -> nn.Module:
    """The tiny random model of ``component`` through the regular loaders (built once and cached)."""
    from gen1 import weights

    if component == "video_unet":
        from gen1.unet import VideoUNet

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
    (default ``meta``: nothing allocated), or, for a ``tiny:`` spec, the tiny model (moved to ``device``).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if spec_of(component, specs).startswith("tiny:"):
        return build_tiny(component, specs).to(device)
    return build_full_size(component, specs, device)
