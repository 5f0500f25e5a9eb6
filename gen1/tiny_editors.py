"""Tiny random components of the public editors' pipelines (`gen1.editors`), for tests: the same diffusers
and transformers classes the full-size weight specs hold, small, saved with each library's own
``save_pretrained`` so they load back through the editors' loaders exactly like downloaded weights.

`gen1.tiny` registers these builders beside its own (``tiny:sd-depth``, ``tiny:animatediff-base``,
``tiny:motion-adapter``, ``tiny:controlnet-depth``, ``tiny:wan-vace``); the configs follow diffusers' own
tests of each pipeline (tests/pipelines/stable_diffusion_2/test_stable_diffusion_depth.py,
animatediff/test_animatediff_video2video_controlnet.py, wan/test_wan_vace.py), sized to the tiny preset's
64x64 clips. Tokenizers are built here from a byte-level vocabulary (CLIP) or with `tokenizers` (Wan's
UMT5), so nothing is downloaded. Each builder takes ``(out, configs)`` like `gen1.tiny`'s own; ``configs``
(a scale's ``COMPONENT_CONFIGS``) is unused here: the editors' components exist at the tiny scale only, with
the configs of `EDITOR_TINY_CONFIGS`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from gen1.config import COMPONENT_CONFIGS, TINY_DPT_PROCESSOR

TEXT_DIM = 32  # the tiny text encoders' width == the tiny UNets' / transformer's cross-attention width

# Constructor configs of the tiny editor components (the full-size ones are in the weight specs' repos).
EDITOR_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "clip_text": dict(
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
    ),
    # SD 2 depth: the UNet takes 4 latent channels + 1 depth channel
    "depth_unet": dict(
        sample_size=8,
        in_channels=5,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    "sd15_unet": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "motion_adapter": dict(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    ),
    "controlnet": dict(
        in_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        conditioning_embedding_out_channels=(8, 16, 32, 32),  # 3 downsamplings: pixels -> 8x latents
        norm_num_groups=8,
    ),
    "wan_vae": dict(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 4x in time, as the full VAE: clips of 4k + 1 frames
    ),
    "wan_transformer": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        vace_layers=[0, 2],
        vace_in_channels=96,  # 16 latent + 16 reactive + 64 (8x8 mask pixels per latent pixel)
    ),
    "umt5": dict(d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
}


def _clip_tokenizer():
    """A CLIPTokenizer over single bytes (no merges): every text tokenizes, characters as tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def _clip_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            **EDITOR_TINY_CONFIGS["clip_text"],
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def _sd_parts(unet_config: str) -> dict[str, Any]:
    """The components of an SD-layout pipeline: tokenizer, the UNet of ``EDITOR_TINY_CONFIGS[unet_config]``,
    tiny's VAE, a text encoder and a DDIM scheduler (built in that order: the seed's draws)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(**EDITOR_TINY_CONFIGS[unet_config])
    vae = AutoencoderKL(**COMPONENT_CONFIGS["tiny"]["vae"])
    return dict(vae=vae, text_encoder=_clip_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                scheduler=_ddim())


def build_sd_depth(out: Path, configs: dict | None = None) -> torch.nn.Module:
    """`StableDiffusionDepth2ImgPipeline` (what ``hf:stabilityai/stable-diffusion-2-depth`` holds)."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    parts = _sd_parts("depth_unet")
    pipe = StableDiffusionDepth2ImgPipeline(
        **parts,
        # the pipeline's own estimator is never called (depth comes from our DPT stage) but is part of it
        depth_estimator=DPTForDepthEstimation(DPTConfig(**COMPONENT_CONFIGS["tiny"]["depth"])),
        feature_extractor=DPTImageProcessor(**TINY_DPT_PROCESSOR),
    )
    pipe.save_pretrained(out)
    return parts["unet"]


def build_animatediff_base(out: Path, configs: dict | None = None) -> torch.nn.Module:
    """An SD 1.5-layout pipeline directory (vae, text_encoder, tokenizer, unet, scheduler)."""
    from diffusers import StableDiffusionPipeline

    parts = _sd_parts("sd15_unet")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return parts["unet"]


def build_motion_adapter(out: Path, configs: dict | None = None) -> torch.nn.Module:
    """`MotionAdapter` (what ``hf:guoyww/animatediff-motion-adapter-v1-5-2`` holds)."""
    from diffusers import MotionAdapter

    model = MotionAdapter(**EDITOR_TINY_CONFIGS["motion_adapter"])
    model.save_pretrained(out)
    return model


def build_controlnet_depth(out: Path, configs: dict | None = None) -> torch.nn.Module:
    """`ControlNetModel` (what ``hf:lllyasviel/control_v11f1p_sd15_depth`` holds)."""
    from diffusers import ControlNetModel

    model = ControlNetModel(**EDITOR_TINY_CONFIGS["controlnet"])
    model.save_pretrained(out)
    return model


def _umt5_tokenizer():
    """A PreTrainedTokenizerFast over characters (the UMT5 tokenizer's interface: pad, eos, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_wan_vace(out: Path, configs: dict | None = None) -> torch.nn.Module:
    """`WanVACEPipeline` (what ``hf:Wan-AI/Wan2.1-VACE-1.3B-diffusers`` holds)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _umt5_tokenizer()
    transformer = WanVACETransformer3DModel(**EDITOR_TINY_CONFIGS["wan_transformer"])
    pipe = WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(**EDITOR_TINY_CONFIGS["umt5"], vocab_size=len(tokenizer))),
        vae=AutoencoderKLWan(**EDITOR_TINY_CONFIGS["wan_vae"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    return transformer


EDITOR_BUILDERS = {
    "sd-depth": build_sd_depth,
    "animatediff-base": build_animatediff_base,
    "motion-adapter": build_motion_adapter,
    "controlnet-depth": build_controlnet_depth,
    "wan-vace": build_wan_vace,
}
