"""Dataclass configs: model presets ("sd15" and "sdiv" full size, "tiny" for tests and the demo, "mini" for the
CPU-trainable miniature reproduction), every
component's architecture config (`COMPONENT_CONFIGS`), the content-embedding convention, sampler settings.

A *weight spec* names where a component's weights live (see `gen1.weights`):

- ``hf:<org>/<name>[@<revision>][/<subfolder>]``  the local Hugging Face cache only (never the network);
  ``@<revision>`` (a tag, branch or commit hash) pins the snapshot, else the cache's ``main``;
- a local directory;
- an fsspec URI (``s3://bucket/models/dpt-large``), downloaded once to a local cache;
- ``tiny:<component>``  a tiny random-initialised model of the real class, built once with a fixed seed,
  saved with the library's own save function and loaded back through the same loader;
- ``mini:<component>``  the same for the ``mini`` scale's configs (``COMPONENT_CONFIGS["mini"]``): a VAE and a
  UNet small enough to train on a CPU (`jobs.benchmarks.mini_repro` trains them; a fresh one is random).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COMPONENTS = ("vae", "unet", "clip", "depth", "caption", "prior")
# Weight-spec prefixes of random-initialised models (`gen1.tiny`): outputs of a preset using one are labelled.
RANDOM_PREFIXES = ("tiny:", "mini:")


class ConfigError(ValueError):
    """A config file or preset name is wrong; the message says what was expected and what was found."""


@dataclass(frozen=True)
class TemporalConfig:
    """How the image UNet is inflated to video (`gen1.temporal`, `gen1.unet`)."""

    max_frames: int = 32  # size of the learned frame-index position table
    conv_kernel_size: int = 3  # 1D temporal convolution kernel over frames
    attention_head_dim: int = 64  # per-head width of temporal self-attention (capped at the channels)


@dataclass(frozen=True)
class ContentConvention:
    """How a frame becomes the content embedding the UNet cross-attends to (`gen1.clip.ClipEmbedder`).

    ``resize``: ``"crop"`` = shortest side to the CLIP input size, then the central square (open_clip's
    eval transform); ``"squash"`` = straight to the square, aspect not kept. ``antialias``: low-pass the
    image when shrinking. ``unit_norm``: the embedding is L2-normalised; else it is the raw projected
    embedding (open_clip ``encode_image``, transformers ``CLIPVisionModelWithProjection.image_embeds``) and
    prior samples are rescaled to the prior's typical norm (`gen1.content.prior_to_convention`).
    """

    resize: str = "crop"
    antialias: bool = True
    unit_norm: bool = True

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "squash"):
            raise ConfigError(f"content convention: resize must be 'crop' or 'squash', found {self.resize!r}")

    def label(self) -> str:
        """e.g. ``crop, antialias, unit-norm``: how `gen1 models` and logs name it."""
        return ", ".join([self.resize, "antialias" if self.antialias else "no antialias",
                          "unit-norm" if self.unit_norm else "raw norm"])

    def model_id(self, clip_spec: str) -> str:
        """The CLIP model id outputs record: the spec, plus this label unless it is the default convention
        (so feature shards made for one convention are told apart from another's)."""
        return clip_spec if self == ContentConvention() else f"{clip_spec} ({self.label()})"


# Ours (sd15): open_clip's eval transform, unit-normalised embeddings.
UNIT_CONTENT = ContentConvention()
# What lambdalabs/sd-image-variations-diffusers' UNet was trained on (justinpinkney/stable-diffusion,
# ldm/modules/encoders/modules.py FrozenCLIPImageEmbedder): OpenAI CLIP ViT-L/14 ``encode_image`` of the
# image resized to 224x224 (no crop) with bicubic interpolation, align_corners=True and no antialias, CLIP
# mean/std, not normalised, one token. The model card's inference transform is the same squash without
# antialias (torchvision, align_corners=False); diffusers' pipeline given a PIL image would instead apply the
# feature_extractor's antialiased resize + centre crop, which the card warns against.
SDIV_CONTENT = ContentConvention(resize="squash", antialias=False, unit_norm=False)


@dataclass(frozen=True)
class ModelSpecs:
    """The weight spec of every component of a preset, plus the shapes the model works at.

    ``clip_dim`` is the CLIP embedding width; it must equal the UNet's ``cross_attention_dim``
    (768 for SD 1.5 with ViT-L/14). ``content`` is the convention the UNet's content embedding follows. ``width`` x ``height`` is the video clips' size; ``image_buckets`` the
    (width, height) sizes image steps are cut to (their transposes are added, see `gen1.training`).
    """

    name: str
    vae: str
    unet: str
    clip: str
    depth: str
    caption: str
    prior: str
    clip_dim: int
    frames: int = 8  # frames the video model sees at once (8 in the paper)
    frame_stride: int = 4  # frames between samples (4 in the paper)
    width: int = 448
    height: int = 256
    # the paper's image sizes (§3.4: 320x320, 384x320, 448x256 "and flipped"); image and video areas alike
    image_buckets: tuple[tuple[int, int], ...] = ((320, 320), (384, 320), (448, 256))
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    content: ContentConvention = UNIT_CONTENT  # how the UNet's content embedding is made (must match its training)

    @property
    def is_tiny(self) -> bool:
        """True when any component is a tiny random model: outputs must be labelled as such."""
        return any(getattr(self, c).startswith(RANDOM_PREFIXES) for c in COMPONENTS)

    def label(self) -> str:
        """A short label for outputs and logs; tiny models say so."""
        return f"{self.name} (TINY RANDOM MODELS - not real results)" if self.is_tiny else self.name

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SD15 = ModelSpecs(
    name="sd15",
    vae="hf:stable-diffusion-v1-5/stable-diffusion-v1-5/vae",
    unet="hf:stable-diffusion-v1-5/stable-diffusion-v1-5/unet",
    clip="hf:timm/vit_large_patch14_clip_224.openai",  # open_clip ViT-L-14-quickgelu, openai weights
    depth="hf:Intel/dpt-large",
    caption="hf:Salesforce/blip-image-captioning-base",
    prior="hf:kakaobrain/karlo-v1-alpha/prior",
    clip_dim=768,
)

TINY = ModelSpecs(
    name="tiny",
    vae="tiny:vae",
    unet="tiny:unet",
    clip="tiny:clip",
    depth="tiny:depth",
    caption="tiny:caption",
    prior="tiny:prior",
    clip_dim=32,
    frames=4,
    frame_stride=2,
    width=64,
    height=64,
    # the paper's buckets at 1/5 scale in multiples of 16 (8 for the VAE x 2 for the tiny UNet's one
    # downsampling), so image steps keep about the area of the 64x64 clips, as the paper's keep 448x256's
    image_buckets=((64, 64), (80, 64), (96, 48)),
    temporal=TemporalConfig(max_frames=16, attention_head_dim=8),
)

# Stage 1 already done: SD fine-tuned on CLIP ViT-L/14 image embeddings (lambdalabs/sd-image-variations-
# diffusers, v2: from SD 1.4, 46k steps cross-attention only + 50k steps whole UNet, model card). Train from
# stage 2 (jobs/train/stage2-from-sdiv.yaml). Its UNet keeps SD 1.4's architecture, which is SD 1.5's
# (COMPONENT_CONFIGS["sd15"]["unet"]; the fine-tune changed weights, not the config; its unet/config.json was
# not at hand offline to compare); its conditioning follows SDIV_CONTENT. The CLIP encoder is ours (open_clip, OpenAI ViT-L/14): the
# same weights the UNet was trained with (OpenAI's `clip.load("ViT-L/14")`), whose unnormalised
# ``encode_image`` equals the checkpoint's ``image_encoder`` (transformers CLIPVisionModelWithProjection)
# ``image_embeds`` (tests/test_content_prior.py converts one into the other on the tiny models).
# Revision: the model card's tag "v2.0" (the diffusers layout: unet/, vae/, image_encoder/); its commit hash
# could not be verified offline, so the tag is pinned, not a hash.
SDIV_REPO = "hf:lambdalabs/sd-image-variations-diffusers@v2.0"
SDIV = dataclasses.replace(
    SD15,
    name="sdiv",
    vae=f"{SDIV_REPO}/vae",
    unet=f"{SDIV_REPO}/unet",
    content=SDIV_CONTENT,
)

# The miniature Gen-1 of `jobs.benchmarks.mini_repro`: the real classes at a scale a CPU trains in minutes.
# 128x128 clips of 8 frames 4 apart (the paper's sampling), a VAE and a UNet of the "mini" configs (random
# until trained: `mini:` specs; the benchmark points ``vae`` / ``unet`` at what it trained), the tiny CLIP
# and a DPT of tiny's size with a wider init (``mini:depth``, see its config), random but fixed, so structure
# and content are still functions of the frames.
# Image buckets keep 128x128's area in multiples of 32 (8 for the VAE x 4 for the UNet's two downsamplings).
MINI = ModelSpecs(
    name="mini",
    vae="mini:vae",
    unet="mini:unet",
    clip="tiny:clip",
    depth="mini:depth",
    caption="tiny:caption",
    prior="tiny:prior",
    clip_dim=TINY.clip_dim,
    frames=8,
    frame_stride=4,
    width=128,
    height=128,
    image_buckets=((128, 128), (160, 96)),
    temporal=TemporalConfig(max_frames=16, attention_head_dim=16),
)

PRESETS: dict[str, ModelSpecs] = {"sd15": SD15, "sdiv": SDIV, "tiny": TINY, "mini": MINI}

# Every component's constructor config, full size ("sd15") and tiny, in one table: `gen1.architectures`
# builds the full-size ones on ``meta``, `gen1.tiny` builds and saves the tiny ones. Full-size configs are
# hard-coded copies of the released ones, so nothing is downloaded. Keys: the `COMPONENTS`; each value is
# the keyword arguments of the model's class (diffusers) or of its config class (transformers DPTConfig,
# BlipConfig; open_clip CLIP).
COMPONENT_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
        "unet": dict(
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
        ),
        # stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json
        "vae": dict(
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
        ),
        # open_clip's ViT-L-14-quickgelu, the architecture of the OpenAI ViT-L/14 weights
        # (hf:timm/vit_large_patch14_clip_224.openai).
        "clip": dict(
            embed_dim=768,
            quick_gelu=True,
            vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
            text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12),
        ),
        # Intel/dpt-large, config.json (ViT-L/16 backbone at 384 px, MiDaS 3.0 head).
        "depth": dict(
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
        ),
        # Salesforce/blip-image-captioning-base, config.json (ViT-B/16 at 384 px + BERT-base decoder).
        "caption": dict(
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
        ),
        # kakaobrain/karlo-v1-alpha, prior/config.json (diffusers' conversion uses PriorTransformer's defaults).
        "prior": dict(
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
        ),
    },
    # The same classes, small; TINY.clip_dim is the width CLIP, the UNet's cross-attention and the prior share.
    "tiny": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY.clip_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks, 3 downsamplings: 8x like SD's VAE
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "clip": dict(
            embed_dim=TINY.clip_dim,
            quick_gelu=True,
            vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
        ),
        "depth": dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            is_hybrid=False,
        ),
        # vocab_size and the token ids come from the tiny vocabulary `gen1.tiny` writes.
        "caption": dict(
            text_config=dict(
                hidden_size=32,
                encoder_hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=64,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
            projection_dim=32,
            image_text_hidden_size=32,
        ),
        "prior": dict(
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            embedding_dim=TINY.clip_dim,  # == tiny CLIP text width and embedding width
            num_embeddings=77,  # CLIP's context length
            additional_embeddings=4,
        ),
    },
}
# "mini": a VAE and a UNet to train on a CPU (the UNet about 6M parameters), and tiny's DPT with a wider
# random init; every other component is tiny's. The depth init was changed after the first 10-minute run
# (measured on opencv-doc frames at 128x128): tiny's DPT (transformers' init, std 0.02) predicts nearly the
# same map for any input (0.997 correlation between Megamind and tree frames, 0.998 against uniform noise),
# so neither the structure input nor depth_corr could carry the frames' structure; with std 0.2 the maps of
# those frames correlate at 0.54 and two frames of one clip at 0.83.
COMPONENT_CONFIGS["mini"] = {
    **COMPONENT_CONFIGS["tiny"],
    "depth": {**COMPONENT_CONFIGS["tiny"]["depth"], "initializer_range": 0.2},
    "unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=MINI.clip_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: 8x like SD's VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=128,
        scaling_factor=0.18215,
    ),
}
assert all(set(configs) == set(COMPONENTS) for configs in COMPONENT_CONFIGS.values())
# The tiny DPT's image processor (gen1.tiny saves it beside the model; gen1.tiny_editors into SD 2 depth's).
TINY_DPT_PROCESSOR = dict(
    size={"height": 64, "width": 64},
    keep_aspect_ratio=True,  # MiDaS-style: keep the aspect ratio, sides a multiple of 32
    ensure_multiple_of=32,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty file: {}); `ConfigError` for anything else.
    ``what`` names its contents in the message, e.g. "edit settings"."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, found {type(data).__name__}")
    return data


def config_from_mapping(cls: type, data: dict[str, Any], source: str | Path, overrides: dict[str, Any]) -> Any:
    """The dataclass ``cls`` from ``data`` with the non-None ``overrides`` on top; `ConfigError` naming
    ``source`` for keys that are not fields of ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def load_model_specs(preset_or_yaml: str) -> ModelSpecs:
    """Return the preset named ``preset_or_yaml`` or the specs in that YAML file.

    A YAML file may name ``base: sd15|sdiv|tiny`` and override any field of it, e.g.
    ``{base: sd15, depth: s3://models/dpt-large}``.
    """
    if preset_or_yaml in PRESETS:
        return PRESETS[preset_or_yaml]
    path = Path(preset_or_yaml)
    if not path.is_file():
        raise ConfigError(
            f"--models {preset_or_yaml!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of component -> weight spec, found {type(data).__name__}")
    base = PRESETS.get(data.pop("base", "sd15"))
    if base is None:
        raise ConfigError(f"{path}: 'base' must be one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelSpecs)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    if "temporal" in data:
        data["temporal"] = TemporalConfig(**data["temporal"])
    if "content" in data:
        data["content"] = ContentConvention(**data["content"])
    if "image_buckets" in data:
        data["image_buckets"] = tuple(tuple(int(x) for x in size) for size in data["image_buckets"])
    data.setdefault("name", path.stem)
    return dataclasses.replace(base, **data)
