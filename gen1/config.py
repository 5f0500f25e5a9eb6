"""Dataclass configs: model presets ("sd15" full size, "tiny" for tests and the demo), sampler settings.

A *weight spec* names where a component's weights live (see `gen1.weights`):

- ``hf:<org>/<name>[/<subfolder>]``  the local Hugging Face cache only (never the network);
- a local directory;
- an fsspec URI (``s3://bucket/models/dpt-large``), downloaded once to a local cache;
- ``tiny:<component>``  a tiny random-initialised model of the real class, built once with a fixed seed,
  saved with the library's own save function and loaded back through the same loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COMPONENTS = ("vae", "unet", "clip", "depth", "caption", "prior")


@dataclass(frozen=True)
class TemporalConfig:
    """How the image UNet is inflated to video (`gen1.temporal`, `gen1.unet`)."""

    max_frames: int = 32  # size of the learned frame-index position table
    conv_kernel_size: int = 3  # 1D temporal convolution kernel over frames
    attention_head_dim: int = 64  # per-head width of temporal self-attention (capped at the channels)


@dataclass(frozen=True)
class ModelSpecs:
    """The weight spec of every component of a preset, plus the shapes the model works at.

    ``clip_dim`` is the CLIP embedding width; it must equal the UNet's ``cross_attention_dim``
    (768 for SD 1.5 with ViT-L/14).
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
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

    @property
    def is_tiny(self) -> bool:
        """True when any component is a tiny random model: outputs must be labelled as such."""
        return any(getattr(self, c).startswith("tiny:") for c in COMPONENTS)

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
    temporal=TemporalConfig(max_frames=16, attention_head_dim=8),
)

PRESETS: dict[str, ModelSpecs] = {"sd15": SD15, "tiny": TINY}


class ConfigError(ValueError):
    """A config file or preset name is wrong; the message says what was expected and what was found."""


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

    A YAML file may name ``base: sd15|tiny`` and override any field of it, e.g.
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
    data.setdefault("name", path.stem)
    return dataclasses.replace(base, **data)
