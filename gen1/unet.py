"""The spatio-temporal UNet: Stable Diffusion's image UNet inflated to video (Gen-1, §3.2).

`VideoUNet` wraps a diffusers ``UNet2DConditionModel`` *in place*: every ResNet block's conv1/conv2 becomes
a `gen1.temporal.TemporalConv` (the spatial conv, then a 1D conv over frames), every ``Transformer2DModel``
in an ``attentions`` list a `gen1.temporal.TemporalTransformer` (the spatial transformer, then a temporal
transformer block laid out like it: GroupNorm, proj_in, self-attention over frames, GEGLU feed-forward,
proj_out), and ``conv_in`` is widened from 4 to 4 + ``extra_in_channels`` (depth latent + t_s channels)
with zero weights for the new inputs. All other weights are the image model's own tensors, so image mode
and video mode share them. The temporal layers and their placement are the paper's; how they are
initialised, like the new conv_in inputs, is ours (the paper prescribes none).

Because the temporal output layers and the new conv_in inputs start at zero, a freshly inflated model
equals the image UNet applied to each frame. Video mode runs the temporal layers on the samples whose
``video_mask`` is 1; image mode (``temporal=False``) skips them for all samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from gen1.config import TemporalConfig
from gen1.temporal import FrameContext, FrameState, TemporalConv, TemporalTransformer
from gen1.weights import load_image_unet, resolve_spec

log = logging.getLogger(__name__)

CONFIG_NAME = "gen1_unet_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FORMAT = "gen1.VideoUNet"
FORMAT_VERSION = 2  # 2: temporal transformer laid out like the spatial one (1: LayerNorm/attention/MLP)
DEFAULT_EXTRA_IN_CHANNELS = 8  # depth latent (4) + t_s sinusoid (4)
DEFAULT_TEMPORAL = TemporalConfig()


def widen_conv_in(conv: nn.Conv2d, extra_in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``extra_in_channels`` more inputs, with zero weights for them.

    The bias Parameter is shared with ``conv`` (not copied); the weight is new (its shape changes).
    """
    if extra_in_channels < 0:
        raise ValueError(f"extra_in_channels must be >= 0, found {extra_in_channels}")
    wide = nn.Conv2d(
        conv.in_channels + extra_in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=False,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : conv.in_channels].copy_(conv.weight)
    wide.bias = conv.bias
    return wide


def inflate(unet: UNet2DConditionModel, context: FrameContext, temporal: TemporalConfig) -> tuple[int, int]:
    """Wrap the ResNet convs and spatial transformers of ``unet`` in place -> (convs, transformers) wrapped."""
    resnets = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, ResnetBlockCondNorm2D))]
    owners = [m for m in unet.modules() if isinstance(getattr(m, "attentions", None), nn.ModuleList)]
    for block in resnets:
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(
                    f"expected {type(block).__name__}.{name} to be a Conv2d, found {type(conv).__name__}"
                )
            setattr(block, name, TemporalConv(conv, context, temporal.conv_kernel_size))
    transformers = 0
    for owner in owners:
        for i, attn in enumerate(owner.attentions):
            if isinstance(attn, Transformer2DModel):
                owner.attentions[i] = TemporalTransformer(attn, context, temporal)
                transformers += 1
            else:
                log.warning(
                    "not inflating %s in %s: no temporal layer after it",
                    type(attn).__name__,
                    type(owner).__name__,
                )
    return 2 * len(resnets), transformers


def _unet_config(unet: UNet2DConditionModel) -> dict[str, Any]:
    """The JSON-serialisable diffusers config of ``unet`` (what ``from_config`` rebuilds it from)."""
    return json.loads(unet.to_json_string())


class VideoUNet(nn.Module):
    """Gen-1's video UNet: z (b, 4 + extra, f, h, w), timestep, CLIP image content -> (b, 4, f, h, w).

    Build with `from_image_unet` (inflates that UNet in place) or `from_config`; ``image_unet`` is the
    wrapped diffusers model (its ``conv_in`` widened).
    """

    def __init__(
        self,
        image_unet: UNet2DConditionModel,
        temporal: TemporalConfig = DEFAULT_TEMPORAL,
        extra_in_channels: int = DEFAULT_EXTRA_IN_CHANNELS,
    ):
        super().__init__()
        if not isinstance(image_unet, UNet2DConditionModel):
            raise TypeError(f"expected a diffusers UNet2DConditionModel, found {type(image_unet).__name__}")
        if any(isinstance(m, (TemporalConv, TemporalTransformer)) for m in image_unet.modules()):
            raise ValueError("this UNet2DConditionModel is already inflated (it holds temporal layers)")
        self.base_config = _unet_config(image_unet)
        self.temporal_config = temporal
        self.extra_in_channels = extra_in_channels
        self.context = FrameContext()
        convs, transformers = inflate(image_unet, self.context, temporal)
        image_unet.conv_in = widen_conv_in(image_unet.conv_in, extra_in_channels)
        self.image_unet = image_unet
        log.info(
            "inflated UNet: %d temporal convs, %d temporal transformers, %.1fM temporal parameters, in_channels %d",
            convs,
            transformers,
            sum(p.numel() for p in self.temporal_parameters()) / 1e6,
            self.in_channels,
        )

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_image_unet(
        cls,
        unet: UNet2DConditionModel,
        temporal: TemporalConfig = DEFAULT_TEMPORAL,
        extra_in_channels: int = DEFAULT_EXTRA_IN_CHANNELS,
    ) -> VideoUNet:
        """Inflate ``unet`` in place (its parameters become this model's spatial parameters)."""
        return cls(unet, temporal, extra_in_channels)

    @classmethod
    def from_config(
        cls,
        unet_config: dict[str, Any],
        temporal: TemporalConfig = DEFAULT_TEMPORAL,
        extra_in_channels: int = DEFAULT_EXTRA_IN_CHANNELS,
    ) -> VideoUNet:
        """A randomly initialised image UNet of ``unet_config`` (diffusers keys), inflated."""
        return cls(UNet2DConditionModel.from_config(unet_config), temporal, extra_in_channels)

    @classmethod
    def from_pretrained_image_unet(
        cls,
        spec: str,
        temporal: TemporalConfig = DEFAULT_TEMPORAL,
        extra_in_channels: int = DEFAULT_EXTRA_IN_CHANNELS,
    ) -> VideoUNet:
        """Load image UNet weights (e.g. SD 1.5) by weight spec and inflate them."""
        return cls.from_image_unet(load_image_unet(spec), temporal, extra_in_channels)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``gen1_unet_config.json`` and ``diffusion_pytorch_model.safetensors`` into ``path``.

        The weights are written first, the config last (each via a temporary name), so a directory holding
        the config holds complete weights.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "unet": self.base_config,
            "temporal": dataclasses.asdict(self.temporal_config),
            "extra_in_channels": self.extra_in_channels,
        }
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / WEIGHTS_NAME)
        tmp = path / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        tmp.replace(path / CONFIG_NAME)
        log.info("saved video UNet to %s", path)
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> VideoUNet:
        """Rebuild from ``gen1_unet_config.json`` and load the weights strictly (no random init pass)."""
        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"video UNet directory {path}: expected {f.name}, not found")
        config = json.loads(config_file.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_file}: expected format {FORMAT!r}, found {config.get('format')!r}")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_file}: expected format_version {FORMAT_VERSION}, found {config.get('format_version')!r} "
                "(saved by another version of gen1, whose temporal layers have other weights)"
            )
        temporal = TemporalConfig(**config["temporal"])
        with torch.device("meta"):
            model = cls.from_config(config["unet"], temporal, int(config["extra_in_channels"]))
        state = safetensors.torch.load_file(str(weights_file), device=str(device))
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{weights_file} does not match the model of {config_file}: {err}") from err
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{weights_file}: no weights for {left[:5]} ({len(left)} tensors)")
        if dtype is not None:
            model.to(dtype=dtype)
        log.info("loaded video UNet from %s", path)
        return model

    # -- properties ----------------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.image_unet.conv_in.in_channels

    @property
    def out_channels(self) -> int:
        return self.image_unet.conv_out.out_channels

    @property
    def cross_attention_dim(self) -> int:
        dim = self.base_config["cross_attention_dim"]
        if isinstance(dim, (list, tuple)):
            if len(set(dim)) != 1:
                raise ValueError(f"per-block cross_attention_dim {dim} has no single width")
            dim = dim[0]
        return int(dim)

    @property
    def device(self) -> torch.device:
        return self.image_unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_unet.conv_in.weight.dtype

    def temporal_modules(self) -> list[nn.Module]:
        """The temporal parts of the wrappers (their spatial modules excluded)."""
        return [m.temporal for m in self.modules() if isinstance(m, (TemporalConv, TemporalTransformer))]

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The Parameters of the temporal layers (those only video inputs use)."""
        return [p for m in self.temporal_modules() for p in m.parameters()]

    def spatial_parameters(self) -> list[nn.Parameter]:
        """Every other Parameter: the image model's, shared by image and video mode."""
        temporal = {id(p) for p in self.temporal_parameters()}
        return [p for p in self.parameters() if id(p) not in temporal]

    # -- gradient checkpointing ----------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's blocks; recomputation sees the frame state of the original forward."""
        self.image_unet.enable_gradient_checkpointing(self._checkpoint)

    def disable_gradient_checkpointing(self) -> None:
        self.image_unet.disable_gradient_checkpointing()

    def _checkpoint(self, module: nn.Module, *args: Any) -> Any:
        state = self.context.state

        def run(*inputs: Any) -> Any:
            with self.context.use(state):
                return module(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        z: torch.Tensor,
        timestep: torch.Tensor | float | int,
        content: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        temporal: bool = True,
    ) -> torch.Tensor:
        """z: (b, c_in, f, h, w), timestep: (b,) or scalar, content: (b, d) or (b, seq, d) -> (b, c_out, f, h, w).

        ``video_mask`` (b,) bool/float: 1 = temporal layers on for that sample, 0 = image model per frame;
        ``temporal=False``: image mode, temporal layers skipped for every sample.
        """
        if z.ndim != 5:
            raise ValueError(f"z: expected (b, c, f, h, w), found shape {tuple(z.shape)}")
        b, c, f, h, w = z.shape
        if c != self.in_channels:
            raise ValueError(f"z: expected {self.in_channels} channels, found {c}")
        t = torch.as_tensor(timestep, device=z.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"timestep: expected a scalar or shape ({b},), found {tuple(t.shape)}")
        if content.ndim == 2:
            content = content[:, None]
        if content.ndim != 3 or content.shape[0] != b or content.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"content: expected ({b}, {self.cross_attention_dim}) or ({b}, seq, {self.cross_attention_dim}), "
                f"found {tuple(content.shape)}"
            )
        mask = None
        if temporal:
            if f > self.temporal_config.max_frames:
                raise ValueError(
                    f"{f} frames; this model's temporal layers take at most {self.temporal_config.max_frames}"
                )
            if video_mask is not None:
                mask = torch.as_tensor(video_mask, device=z.device).to(z.dtype)
                if mask.shape != (b,):
                    raise ValueError(f"video_mask: expected shape ({b},), found {tuple(mask.shape)}")
        x = z.transpose(1, 2).reshape(b * f, c, h, w)
        state = FrameState(num_frames=f, video_mask=mask, temporal=temporal)
        with self.context.use(state):
            out = self.image_unet(
                x,
                t.repeat_interleave(f),
                encoder_hidden_states=content.to(z.dtype).repeat_interleave(f, dim=0),
                return_dict=False,
            )[0]
        return out.unflatten(0, (b, f)).transpose(1, 2).contiguous()


def load_video_unet(spec: str, temporal: TemporalConfig = DEFAULT_TEMPORAL) -> VideoUNet:
    """A saved gen1 video UNet if ``spec`` resolves to one, else the image UNet of ``spec`` inflated.

    A saved model keeps its own temporal config (its weights depend on it); a different ``temporal`` is
    reported and ignored.
    """
    directory = resolve_spec(spec)
    if (directory / CONFIG_NAME).is_file():
        model = VideoUNet.from_pretrained(directory)
        if model.temporal_config != temporal:
            log.warning(
                "%s was saved with %s; using it instead of the requested %s",
                spec,
                model.temporal_config,
                temporal,
            )
        return model
    return VideoUNet.from_pretrained_image_unet(spec, temporal)
