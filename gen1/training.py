"""Training Gen-1 the way the paper does: v-prediction, joint image/video batches, four stages, customization.

Loss (eq. 6 with v targets). For scaled VAE latents ``z0: (b, c, f, h, w)``, noise ``eps`` and
``t ~ U{0..T-1}`` per example::

    z_t = alpha_t z0 + sigma_t eps,   v = alpha_t eps - sigma_t z0,   L = || v - v_theta(z_t, t, s, c) ||^2

with the betas of `gen1.schedule.make_train_scheduler` (the sampler's own). ``s`` is the structure input
(the depth latent after ``t_s`` blur/downsample steps plus the ``t_s`` sinusoid channels, or zeros where a
stage does not use structure), ``c`` the CLIP image embedding of one random frame of the clip, replaced by
the null (zero) embedding with probability ``content_dropout`` for classifier-free guidance.

A step is either a video step or, with probability ``image_batch_prob``, an image step: every image is a
one-frame video run in image mode (``temporal=False``), so the temporal layers get no gradient. The choice
is drawn once per optimizer step from a generator shared by all workers, so data-parallel workers always
run the same kind of step.

The paper's stages are `TrainConfig` files (``jobs/train/stage*.yaml``), not code paths: what is trainable
(``trainable``: parameter groups), whether images/videos/structure are used and the ``t_s`` range are
fields; each stage's ``init_from`` names the previous stage's exported weights.

A run writes under its output URI (any fsspec URI)::

    OUTPUT/config.yaml                          the config it ran with
    OUTPUT/checkpoints/step-00001000/model/     weights (the model's own save_pretrained)
    OUTPUT/checkpoints/step-00001000/state.pt   optimizer, LR schedule, EMA, data position, step
    OUTPUT/checkpoints/step-00001000/rng-<rank>.pt   every worker's RNG states
    OUTPUT/checkpoints/latest                   the name of the newest committed checkpoint
    OUTPUT/final/                               the exported weights (EMA weights when EMA is on)

A checkpoint is written under ``checkpoints/.tmp-<name>`` and committed by renaming it and then updating
``latest``; ``resume`` restores everything in it, so a run killed and resumed reaches the same weights as
one that ran through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from gen1.config import ConfigError, ModelSpecs
from gen1.ema import EMA
from gen1.schedule import make_train_scheduler
from gen1.train_data import BatchSource, ClipBatch, ImageSet, PriorBatch, concat_batches

log = logging.getLogger(__name__)

TASKS = ("unet", "prior")
TRAINABLE_GROUPS = ("all", "spatial", "temporal", "conv_in_structure")
MIXED_PRECISION = ("no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
FSDP_MIN_UNIT_PARAMS = 10_000_000  # FSDP shards units of at least this many parameters
LATENT_CHANNELS = 4
OUTPUT_PARENT = "{output_parent}"  # placeholder in init_from: the folder that holds this run's output

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
FINAL = "final"
MODEL_DIR = "model"
STATE_FILE = "state.pt"


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """One training run (a stage of the paper, a customization, or prior training)."""

    stage: str = "custom"
    task: str = "unet"  # unet: the video UNet | prior: the text -> image-embedding prior
    # weight spec or a previous run's exported weights; None = the preset's unet/prior.
    # "{output_parent}" stands for the folder that holds this run's output (stage chaining).
    init_from: str | None = None
    trainable: tuple[str, ...] = ("all",)  # parameter groups, see TRAINABLE_GROUPS
    use_structure: bool = True  # False: zeros in the depth-latent and t_s channels (stages 1-2)
    ts_range: tuple[int, int] = (0, 7)  # t_s ~ U{lo..hi} per example
    image_batch_prob: float = 0.125  # probability that a step is an image step
    content_dropout: float = 0.1  # probability of the null content (classifier-free guidance)
    batch_size: int = 1  # clips per worker per micro-batch (prior: pairs)
    image_batch_size: int | None = None  # images per worker per micro-batch; None = batch_size * frames
    grad_accum: int = 1  # micro-batches per optimizer step
    # clips per optimizer step over all workers (the paper: 1152); when set, grad_accum is derived from it
    global_batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    max_steps: int = 1000
    ema_decay: float | None = None
    mixed_precision: str = "bf16"  # on GPU; CPU always trains in float32
    gradient_checkpointing: bool = False
    strategy: str = "ddp"  # ddp | fsdp (several workers)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    frames: int | None = None  # frames per training clip (a random window); None = the clip's length
    frame_stride: int = 1  # step between the stored frames taken into a window
    width: int | None = None  # expected frame size of the data (checked), None = any
    height: int | None = None
    image_data: str | None = None  # folder or Parquet of images for image steps; None = frames of the clips
    subject_data: str | None = None  # customization: folder (or Parquet) of 15-30 subject images
    subject_fraction: float = 0.5  # share of every image batch drawn from the subject
    subject_flip: bool = True
    fit_clip_stats: bool = False  # prior: set the embedding normalisation from the data at the start

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainable", tuple(self.trainable))
        object.__setattr__(self, "ts_range", tuple(int(x) for x in self.ts_range))
        object.__setattr__(self, "adam_betas", tuple(float(x) for x in self.adam_betas))
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            object.__setattr__(self, "mixed_precision", "no")
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, found {self.task!r}")
        unknown = set(self.trainable) - set(TRAINABLE_GROUPS)
        if unknown or not self.trainable:
            problems.append(f"trainable must list some of {TRAINABLE_GROUPS}, found {list(self.trainable)}")
        lo, hi = self.ts_range if len(self.ts_range) == 2 else (-1, -1)
        if not 0 <= lo <= hi <= 7:
            problems.append(f"ts_range must be [lo, hi] with 0 <= lo <= hi <= 7, found {list(self.ts_range)}")
        if not self.use_structure and self.ts_range != (0, 0):
            problems.append(f"use_structure is false, so ts_range must be [0, 0]; found {list(self.ts_range)}")
        for name in ("image_batch_prob", "content_dropout", "subject_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], found {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                     "frame_stride"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < self.batch_size:
            problems.append(f"global_batch_size must be >= batch_size ({self.batch_size}), found {self.global_batch_size}")
        if self.image_batch_size is not None and self.image_batch_size < 1:
            problems.append(f"image_batch_size must be >= 1 or null, found {self.image_batch_size}")
        if self.frames is not None and self.frames < 1:
            problems.append(f"frames must be >= 1 or null, found {self.frames}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) or null, found {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, found {self.mixed_precision!r}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {STRATEGIES}, found {self.strategy!r}")
        if self.strategy == "fsdp" and self.ema_decay is not None:
            problems.append("ema_decay with strategy fsdp is not supported (EMA needs unsharded weights); use ddp")
        if self.task == "prior" and set(self.trainable) != {"all"}:
            problems.append(f"the prior trains as a whole: trainable must be [all], found {list(self.trainable)}")
        if self.subject_data is not None and self.image_batch_prob == 0.0:
            problems.append("subject_data is mixed into image steps, so image_batch_prob must be > 0")
        if problems:
            raise ConfigError(f"training config {self.stage!r}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{source}: unknown training config keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML file; ``overrides`` (e.g. from the command line) replace its values."""
        with fsspec.open(str(path), "r") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of training settings, found {type(data).__name__}")
        data.update(overrides)
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def as_params(self) -> dict[str, str]:
        """Flat string values for MLflow params."""
        return {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in self.as_dict().items()}

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step: ``grad_accum``, or what reaches ``global_batch_size``."""
        if self.global_batch_size is None:
            return self.grad_accum
        return max(1, math.ceil(self.global_batch_size / (self.batch_size * world_size)))

    def images_per_batch(self, frames: int) -> int:
        return self.image_batch_size or self.batch_size * frames


def output_parent(output: str) -> str:
    """The folder that holds ``output`` (``s3://b/runs/stage2`` -> ``s3://b/runs``)."""
    stripped = output.rstrip("/")
    if "/" not in stripped:
        return "."
    return stripped.rsplit("/", 1)[0]


def resolve_init(cfg: TrainConfig, specs: ModelSpecs, output: str) -> str:
    """The weight spec a fresh run starts from: ``init_from`` (placeholder filled) or the preset's."""
    if cfg.init_from is None:
        return specs.unet if cfg.task == "unet" else specs.prior
    return cfg.init_from.replace(OUTPUT_PARENT, output_parent(output))


# --------------------------------------------------------------------------------------------------- math


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Diffusion timesteps t ~ U{0..T-1}: (n,) long."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator)


def sample_structure_strength(n: int, ts_range: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """t_s ~ U{lo..hi} per example: (n,) long."""
    lo, hi = ts_range
    return torch.randint(int(lo), int(hi) + 1, (n,), generator=generator)


def pick_content_frame(clip_embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The CLIP embedding of one random frame per clip. clip_embedding: (b, f, d) -> (b, d)."""
    b, f, _ = clip_embedding.shape
    index = torch.randint(0, f, (b,), generator=generator).to(clip_embedding.device)
    return clip_embedding[torch.arange(b, device=clip_embedding.device), index]


def drop_content(content: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row by the null content (zeros) with probability ``p``. content: (b, d) -> (b, d)."""
    keep = (torch.rand(content.shape[0], generator=generator) >= p).to(content.device, content.dtype)
    return content * keep[:, None]


def frame_window(
    num_frames: int, frames: int, stride: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Random windows of ``frames`` frames ``stride`` apart inside clips of ``num_frames``: (batch, frames) long."""
    span = (frames - 1) * stride + 1
    if span > num_frames:
        raise ValueError(
            f"a window of {frames} frames with stride {stride} needs clips of >= {span} frames; the data has {num_frames}"
        )
    start = torch.randint(0, num_frames - span + 1, (batch, 1), generator=generator)
    return start + torch.arange(frames)[None] * stride


@dataclass
class UNetInputs:
    """One micro-batch for the video UNet.

    latents: (b, 4, f, h, w) scaled VAE latents; structure: (b, 4, f, h, w) depth latents, or None for
    zeros in every extra input channel; ts: (b,) long; content: (b, d); temporal: False for image steps.
    """

    latents: torch.Tensor
    structure: torch.Tensor | None
    ts: torch.Tensor
    content: torch.Tensor
    temporal: bool
    extra_channels: int = 8

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_frames(self) -> int:
        return self.latents.shape[2]

    def model_input(self, z_t: torch.Tensor) -> torch.Tensor:
        """z_t (b, 4, f, h, w) -> the UNet input (b, 4 + extra, f, h, w)."""
        if self.structure is None:
            b, _, f, h, w = z_t.shape
            return torch.cat([z_t, z_t.new_zeros(b, self.extra_channels, f, h, w)], dim=1)
        from gen1.structure import conditioning_input

        return conditioning_input(z_t, self.structure, self.ts)


def v_prediction_loss(
    model: nn.Module, scheduler: Any, inputs: UNetInputs, generator: torch.Generator
) -> torch.Tensor:
    """Eq. 6 with v targets: mean of (v_theta(z_t, t, s, c) - v)^2 over every element. Returns a float32 scalar.

    ``scheduler`` is `gen1.schedule.make_train_scheduler()` (``add_noise``, ``get_velocity``); noise and
    timesteps are drawn on the CPU from ``generator``, so runs are reproducible on any device.
    """
    z0 = inputs.latents.float()
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = sample_timesteps(len(inputs), scheduler.config.num_train_timesteps, generator).to(z0.device)
    z_t = scheduler.add_noise(z0, noise, t)
    target = scheduler.get_velocity(z0, noise, t)
    pred = model(inputs.model_input(z_t), t, inputs.content, temporal=inputs.temporal)
    return F.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------------------------------- trainable


@dataclass
class Trainable:
    """The parameters an optimizer updates; ``masks`` restrict some of them elementwise (1 = trainable)."""

    parameters: list[nn.Parameter]
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> mask of param's shape
    names: list[str] = field(default_factory=list)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups; a masked parameter gets no weight decay, so its frozen elements stay exact."""
        plain = [p for p in self.parameters if id(p) not in self.masks]
        masked = [p for p in self.parameters if id(p) in self.masks]
        groups = [{"params": plain, "weight_decay": weight_decay}] if plain else []
        if masked:
            groups.append({"params": masked, "weight_decay": 0.0})
        return groups


def _conv_in_weight(model: nn.Module) -> tuple[str, nn.Parameter]:
    found = [(n, p) for n, p in model.named_parameters() if n.endswith("conv_in.weight")]
    if len(found) != 1:
        raise ValueError(f"expected one conv_in.weight in the model, found {[n for n, _ in found]}")
    return found[0]


def select_trainable(model: nn.Module, groups: Sequence[str]) -> Trainable:
    """Freeze everything, then unfreeze exactly ``groups`` of a `gen1.unet.VideoUNet` (or "all" of any model).

    - ``all``: every parameter;
    - ``spatial``: the image model's parameters (shared by image and video mode), conv_in included;
    - ``temporal``: the temporal convolutions and transformers;
    - ``conv_in_structure``: the input channels of conv_in that read the depth latent and t_s channels
      (elementwise: a gradient mask keeps conv_in's latent channels fixed).
    """
    unknown = set(groups) - set(TRAINABLE_GROUPS)
    if unknown:
        raise ConfigError(f"unknown trainable groups {sorted(unknown)}; expected some of {TRAINABLE_GROUPS}")
    named = dict(model.named_parameters())
    names_of = {id(p): n for n, p in named.items()}
    chosen: dict[int, nn.Parameter] = {}
    masks: dict[int, torch.Tensor] = {}
    if "all" in groups:
        chosen.update({id(p): p for p in named.values()})
    if "spatial" in groups:
        chosen.update({id(p): p for p in model.spatial_parameters()})
    if "temporal" in groups:
        chosen.update({id(p): p for p in model.temporal_parameters()})
    if "conv_in_structure" in groups:
        _, w = _conv_in_weight(model)
        if id(w) not in chosen:
            if w.shape[1] <= LATENT_CHANNELS:
                raise ValueError(f"conv_in has {w.shape[1]} input channels: no structure channels to train")
            mask = torch.zeros_like(w)
            mask[:, LATENT_CHANNELS:] = 1.0
            masks[id(w)] = mask
            chosen[id(w)] = w
    for p in named.values():
        p.requires_grad_(id(p) in chosen)
    params = [p for p in named.values() if id(p) in chosen]  # model order: deterministic optimizer state
    for p in params:
        if id(p) in masks:
            mask = masks[id(p)]
            p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
    trainable = Trainable(parameters=params, masks=masks, names=[names_of[id(p)] for p in params])
    log.info(
        "trainable %s: %d tensors, %.2fM of %.2fM parameters%s",
        list(groups),
        len(params),
        sum(p.numel() for p in params) / 1e6,
        sum(p.numel() for p in named.values()) / 1e6,
        " (conv_in: structure channels only)" if masks else "",
    )
    return trainable


# ------------------------------------------------------------------------------------------------ runtime


@dataclass
class Runtime:
    """Where this process trains: its device and its place among data-parallel workers."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    report: Callable[[dict], None] | None = None  # e.g. ray.train.report, called by every worker

    @classmethod
    def current(cls, device: str | torch.device | None = None, report: Callable[[dict], None] | None = None) -> Runtime:
        """This process's runtime: rank and world size from torch.distributed when it is initialised."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        initialised = dist.is_available() and dist.is_initialized()
        return cls(
            device=torch.device(device),
            rank=dist.get_rank() if initialised else 0,
            world_size=dist.get_world_size() if initialised else 1,
            report=report,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over workers of each value."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_grads(self, parameters: Sequence[nn.Parameter]) -> None:
        """Average gradients over workers (for models not wrapped in DDP)."""
        if not self.distributed:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad if p.grad.device == self._comm_device() else p.grad.to(self._comm_device())
            dist.all_reduce(grad)
            grad /= self.world_size
            if grad is not p.grad:
                p.grad.copy_(grad)


# --------------------------------------------------------------------------------------------------- data


class Cursor:
    """An endless stream over a `BatchSource`, epoch after epoch, whose position can be saved and restored."""

    def __init__(self, source: BatchSource, name: str):
        self.source = source
        self.name = name
        self.epoch = 0
        self.index = 0
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                fresh = self.index == 0  # a whole epoch ahead: it must yield something
                self._it = self.source.batches(self.epoch, self.index)
            else:
                fresh = False
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                if fresh:
                    raise ValueError(f"{self.name} data yielded no batch in epoch {self.epoch}") from None
                self.epoch, self.index = self.epoch + 1, 0
                continue
            self.index += 1
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


class UNetTask:
    """The video UNet's training: data -> inputs (VAE, structure, content) -> loss; frozen helpers."""

    kind = "unet"

    def __init__(
        self,
        cfg: TrainConfig,
        specs: ModelSpecs,
        runtime: Runtime,
        model_spec: str,
        video: BatchSource,
        images: BatchSource | None = None,
        subject: ImageSet | None = None,
    ):
        from gen1.structure import StructureEncoder
        from gen1.unet import load_video_unet
        from gen1.weights import load_vae

        self.cfg, self.specs, self.runtime = cfg, specs, runtime
        device = runtime.device
        self.amp_dtype = _amp_dtype(cfg, device)
        self.model = load_video_unet(model_spec, specs.temporal).to(device=device, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.vae = load_vae(specs.vae, device=str(device), dtype=self.amp_dtype or torch.float32).eval()
        self.vae.requires_grad_(False)
        self.structure = StructureEncoder(None, self.vae)
        self.scheduler = make_train_scheduler()
        self.extra_channels = self.model.in_channels - LATENT_CHANNELS
        self.video = Cursor(video, "video")
        self.images = Cursor(images, "image") if images is not None else None
        self.subject = subject
        self.trainable = select_trainable(self.model, cfg.trainable)
        temporal_ids = {id(p) for p in self.model.temporal_parameters()}
        # image steps leave the temporal layers out of the graph; DDP must be told they may go unused
        self.find_unused_parameters = cfg.image_batch_prob > 0 and any(
            id(p) in temporal_ids for p in self.trainable.parameters
        )

    # -- data ---------------------------------------------------------------------------------------------

    def _check(self, batch: ClipBatch) -> None:
        d = batch.clip_embedding.shape[-1]
        if d != self.model.cross_attention_dim:
            raise ValueError(
                f"the data's CLIP embeddings are {d}-d; the UNet's cross-attention takes "
                f"{self.model.cross_attention_dim}-d (preprocess with the preset's CLIP model)"
            )
        size = None
        if batch.depth is not None:
            size = tuple(batch.depth.shape[-2:])
        elif batch.frames is not None:
            size = tuple(batch.frames.shape[2:4])
        expected = (self.cfg.height, self.cfg.width)
        if size is not None and None not in expected and size != expected:
            raise ValueError(f"the data's frames are {size[1]}x{size[0]}; the config expects {expected[1]}x{expected[0]}")

    @torch.no_grad()
    def encode_latents(self, batch: ClipBatch) -> ClipBatch:
        """Fill in VAE latents (posterior mean, scaled) for a batch that carries only frames."""
        if batch.latents is not None:
            return batch
        if batch.frames is None:
            raise ValueError("a batch without latents needs frames to encode")
        from gen1.video import frames_to_tensor

        b, f = len(batch), batch.num_frames
        frames = batch.frames.reshape(b * f, *batch.frames.shape[2:]).cpu().numpy()
        x = frames_to_tensor(frames).to(self.runtime.device, next(self.vae.parameters()).dtype)
        z = torch.cat([self.vae.encode(chunk).latent_dist.mean for chunk in x.split(16)])
        z = (z.float() * self.vae.config.scaling_factor).unflatten(0, (b, f)).transpose(1, 2)
        return dataclasses.replace(batch, latents=z.cpu())

    def _video_batch(self, gen: torch.Generator) -> ClipBatch:
        batch: ClipBatch = self.video.next()
        self._check(batch)
        if self.cfg.frames is not None and (self.cfg.frames != batch.num_frames or self.cfg.frame_stride != 1):
            batch = batch.take_frames(frame_window(batch.num_frames, self.cfg.frames, self.cfg.frame_stride, len(batch), gen))
        return batch

    def _regular_images(self, n: int, gen: torch.Generator) -> ClipBatch:
        """``n`` images from the image data, or from the frames of video clips when there is none."""
        parts, have = [], 0
        while have < n:
            if self.images is not None:
                part = self.images.next()
                self._check(part)
            else:
                part = self._video_batch(gen).as_images()
            part = self.encode_latents(part)
            parts.append(dataclasses.replace(part, frames=None))
            have += len(part)
        pool = concat_batches(parts)
        if len(pool) == n:
            return pool
        return pool.select(torch.randperm(len(pool), generator=gen)[:n].tolist())

    def _image_batch(self, gen: torch.Generator) -> ClipBatch:
        n = self.cfg.images_per_batch(self.cfg.frames or self.specs.frames)
        if self.subject is None:
            return self._regular_images(n, gen)
        n_subject = min(n, max(1, round(n * self.cfg.subject_fraction)))
        subject = self.encode_latents(self.subject.sample(n_subject, gen))
        parts = [dataclasses.replace(subject, frames=None)]
        if n > n_subject:
            parts.append(self._regular_images(n - n_subject, gen))
        return concat_batches(parts)

    def inputs(self, batch: ClipBatch, temporal: bool, gen: torch.Generator) -> UNetInputs:
        """A batch -> UNet inputs: latents, t_s and structure latents, one frame's content (maybe dropped)."""
        batch = self.encode_latents(batch)
        device = self.runtime.device
        b = len(batch)
        content = drop_content(pick_content_frame(batch.clip_embedding, gen), self.cfg.content_dropout, gen)
        ts = sample_structure_strength(b, self.cfg.ts_range, gen)
        structure = None
        if self.cfg.use_structure:
            if batch.depth is None:
                raise ValueError("use_structure is on but the data carries no depth")
            structure = self.structure_latents(batch.depth, ts)
            if structure.shape != batch.latents.shape:
                raise ValueError(
                    f"structure latents {tuple(structure.shape)} do not match the frame latents "
                    f"{tuple(batch.latents.shape)}: depth must be at frame resolution"
                )
        return UNetInputs(
            latents=batch.latents.to(device),
            structure=structure,
            ts=ts.to(device),
            content=content.to(device),
            temporal=temporal,
            extra_channels=self.extra_channels,
        )

    @torch.no_grad()
    def structure_latents(self, depth: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """depth (b, f, H, W), ts (b,) -> structure latents (b, 4, f, H/8, W/8), one VAE pass per t_s value."""
        b, f = depth.shape[:2]
        out: list[torch.Tensor | None] = [None] * b
        for value in sorted(set(ts.tolist())):
            rows = [i for i in range(b) if int(ts[i]) == value]
            z = self.structure.encode(depth[rows].reshape(len(rows) * f, *depth.shape[2:]), value)  # (4, n*f, h, w)
            for j, z_i in enumerate(z.float().unflatten(1, (len(rows), f)).unbind(1)):
                out[rows[j]] = z_i
        return torch.stack(out).to(self.runtime.device)

    # -- steps --------------------------------------------------------------------------------------------

    def micro_batch(self, image_step: bool, gen: torch.Generator) -> UNetInputs:
        if image_step:
            return self.inputs(self._image_batch(gen), temporal=False, gen=gen)
        return self.inputs(self._video_batch(gen), temporal=True, gen=gen)

    def loss(self, model: nn.Module, image_step: bool, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        inputs = self.micro_batch(image_step, gen)
        with _autocast(self.runtime.device, self.amp_dtype):
            loss = v_prediction_loss(model, self.scheduler, inputs, gen)
        return loss, {"samples": len(inputs), "frames": len(inputs) * inputs.num_frames}

    def data_state(self) -> dict:
        state = {"video": self.video.state_dict()}
        if self.images is not None:
            state["images"] = self.images.state_dict()
        return state

    def load_data_state(self, state: dict) -> None:
        self.video.load_state_dict(state["video"])
        if self.images is not None and "images" in state:
            self.images.load_state_dict(state["images"])

    def save_model(self, path: Path) -> None:
        self.model.save_pretrained(path)


class PriorTask:
    """The prior's training on (caption, CLIP image embedding) pairs; the CLIP text encoder is frozen."""

    kind = "prior"
    find_unused_parameters = False

    def __init__(self, cfg: TrainConfig, specs: ModelSpecs, runtime: Runtime, model_spec: str, pairs: BatchSource):
        from gen1.clip import ClipEmbedder
        from gen1.content import ContentEncoder
        from gen1.prior import Prior

        self.cfg, self.specs, self.runtime = cfg, specs, runtime
        device = runtime.device
        self.prior = Prior.load(model_spec, device=device)
        self.prior.prior.to(dtype=torch.float32)
        self.model = self.prior.prior
        self.text = ContentEncoder(ClipEmbedder(specs.clip, device=str(device)), None)
        self.pairs = Cursor(pairs, "prior pairs")
        self.amp_dtype = _amp_dtype(cfg, device)
        self.model.requires_grad_(False)
        params = self.prior.trainable_parameters()
        for p in params:
            p.requires_grad_(True)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.trainable = Trainable(parameters=params, names=[names[id(p)] for p in params])

    def fit_clip_stats(self, batches: int = 8) -> None:
        """Set the prior's embedding normalisation from the first ``batches`` batches of the data."""
        embeds = torch.cat([b.image_embeds for b in _take(self.pairs.source.batches(0, 0), batches)])
        self.prior.fit_clip_stats(embeds)
        log.info("prior clip stats fitted on %d embeddings", len(embeds))

    def loss(self, model: nn.Module, image_step: bool, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        batch: PriorBatch = self.pairs.next()
        drop = torch.rand(len(batch), generator=gen) < self.cfg.content_dropout
        texts = ["" if d else t for t, d in zip(batch.texts, drop.tolist(), strict=True)]
        with torch.no_grad():
            pooled, tokens, mask = self.text.text_inputs(texts)
        device = self.runtime.device
        with _autocast(device, self.amp_dtype):
            loss = self.prior.loss(
                pooled.to(device), tokens.to(device), mask.to(device), batch.image_embeds.to(device), generator=gen
            )
        return loss, {"samples": len(batch), "frames": len(batch)}

    def data_state(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def load_data_state(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])

    def save_model(self, path: Path) -> None:
        self.prior.save_pretrained(path)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on GPU when asked, None (float32) otherwise."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    """Checkpoints and exported weights under one output URI (local path or any fsspec URI)."""

    def __init__(self, output: str):
        self.output = output
        self.fs, root = fsspec.core.url_to_fs(output)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            root = self.fs._strip_protocol(root)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.local else self.path(*parts)

    # -- reading ------------------------------------------------------------------------------------------

    def latest(self) -> str | None:
        """Name of the newest committed checkpoint, or None."""
        pointer = self.path(CHECKPOINTS_DIR, LATEST)
        if not self.local:
            self.fs.invalidate_cache(self.root)  # another worker or run may have written since
        if not self.fs.exists(pointer):
            return None
        name = self.fs.cat_file(pointer).decode().strip()
        if not self.fs.exists(self.path(CHECKPOINTS_DIR, name, STATE_FILE)):
            raise FileNotFoundError(f"{self.uri(CHECKPOINTS_DIR, LATEST)} names {name!r}, which has no {STATE_FILE}")
        return name

    def checkpoints(self) -> list[str]:
        """Committed checkpoint names, oldest first."""
        try:
            entries = self.fs.ls(self.path(CHECKPOINTS_DIR), detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.startswith("step-"))

    def read_torch(self, *parts: str) -> Any:
        data = self.fs.cat_file(self.path(*parts))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    @contextlib.contextmanager
    def local_dir(self, *parts: str) -> Iterator[Path]:
        """A local directory holding ``parts`` (the directory itself when the output is local)."""
        if self.local:
            yield Path(self.path(*parts))
            return
        with tempfile.TemporaryDirectory(prefix="gen1-ckpt-") as tmp:
            remote = self.path(*parts)
            for src in self.fs.find(remote):
                dst = Path(tmp) / src[len(remote) :].lstrip("/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(src, str(dst))
            yield Path(tmp)

    # -- writing ------------------------------------------------------------------------------------------

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def write_torch(self, obj: Any, *parts: str) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(buf.getvalue(), *parts)

    def upload_dir(self, local: Path, *parts: str) -> None:
        for src in sorted(p for p in local.rglob("*") if p.is_file()):
            self.write_bytes(src.read_bytes(), *parts, *src.relative_to(local).parts)

    def remove(self, *parts: str) -> None:
        if self.fs.exists(self.path(*parts)):
            self.fs.rm(self.path(*parts), recursive=True)

    def commit_dir(self, tmp_parts: Sequence[str], final_parts: Sequence[str]) -> None:
        """Move a finished directory to its final name: a rename locally; on object stores a copy of every
        object then the removal of the temporary ones (the ``latest`` pointer, written after, commits)."""
        self.remove(*final_parts)
        src, dst = self.path(*tmp_parts), self.path(*final_parts)
        if self.local:
            self.fs.mv(src, dst, recursive=True)
            return
        self.fs.invalidate_cache(src)
        for path in self.fs.find(src):
            self.fs.copy(path, dst + path[len(src) :])
        self.fs.rm(src, recursive=True)
        self.fs.invalidate_cache(self.root)

    def set_latest(self, name: str) -> None:
        if not self.local:  # one object PUT is atomic
            self.write_bytes(name.encode(), CHECKPOINTS_DIR, LATEST)
            return
        tmp = f".{LATEST}.tmp"
        self.write_bytes(name.encode(), CHECKPOINTS_DIR, tmp)
        self.fs.mv(self.path(CHECKPOINTS_DIR, tmp), self.path(CHECKPOINTS_DIR, LATEST))

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints."""
        names = self.checkpoints()
        for name in names[: max(0, len(names) - keep)]:
            self.remove(CHECKPOINTS_DIR, name)


def check_output(output: str, resume: bool) -> None:
    """Refuse to start a fresh run over an output that already holds checkpoints (unless resuming)."""
    if resume:
        return
    latest = CheckpointStore(output).latest()
    if latest is not None:
        raise FileExistsError(
            f"{output} already holds checkpoint {latest}; pass --resume to continue it or choose a new output"
        )


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a step depends on."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


# ---------------------------------------------------------------------------------------------- tracking


@dataclass(frozen=True)
class Tracking:
    """Where metrics go: an MLflow tracking URI (None: no MLflow), experiment and run name."""

    uri: str | None = None
    experiment: str = "gen1-train"
    run_name: str | None = None


class MlflowTracker:
    """Loss, learning rate and throughput to an MLflow run (through a client: no global MLflow state)."""

    def __init__(self, tracking: Tracking, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking.uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(tracking.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(tracking.experiment)
            run_id = self.client.create_run(exp_id, run_name=tracking.run_name).info.run_id
            self.resumed = False
        else:
            self.resumed = True
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


# -------------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    output: str
    steps: int  # optimizer steps completed (global)
    losses: list[float]  # this worker's loss per optimizer step run in this call
    start_step: int  # step it started (or resumed) from
    final: str | None  # exported weights
    init_from: str  # what the model was loaded from: init spec, or the checkpoint resumed
    mlflow_run_id: str | None = None
    seconds: float = 0.0


StepCallback = Callable[[int, dict], None]


def build_task(
    cfg: TrainConfig,
    specs: ModelSpecs,
    runtime: Runtime,
    model_spec: str,
    data: BatchSource,
    image_source: Callable[[TrainConfig, ModelSpecs, Runtime], BatchSource] | None = None,
) -> UNetTask | PriorTask:
    """The task of ``cfg.task`` with its data: image steps read ``cfg.image_data`` and ``cfg.subject_data``."""
    if cfg.task == "prior":
        return PriorTask(cfg, specs, runtime, model_spec, data)
    images = subject = None
    if cfg.image_data is not None or cfg.subject_data is not None:
        featurize = image_featurizer(cfg, specs, runtime)
        if cfg.image_data is not None:
            from gen1.train_data import ImageFolderSource

            n = cfg.images_per_batch(cfg.frames or specs.frames)
            images = ImageFolderSource(cfg.image_data, featurize, n, seed=cfg.seed + runtime.rank)
        if cfg.subject_data is not None:
            subject = ImageSet.from_uri(cfg.subject_data, featurize, flip=cfg.subject_flip)
    return UNetTask(cfg, specs, runtime, model_spec, data, images, subject)


def image_featurizer(cfg: TrainConfig, specs: ModelSpecs, runtime: Runtime):
    """CLIP + depth on this worker's device for image folders (the image dataset, the subject set)."""
    from gen1.clip import ClipEmbedder
    from gen1.depth import DepthEstimator
    from gen1.structure import StructureEncoder
    from gen1.train_data import ImageFeaturizer

    clip = ClipEmbedder(specs.clip, device=str(runtime.device))
    depth = StructureEncoder(DepthEstimator(specs.depth, device=str(runtime.device)), None).depth
    return ImageFeaturizer(clip, depth if cfg.use_structure else None, cfg.width or specs.width, cfg.height or specs.height)


def train(
    cfg: TrainConfig,
    specs: ModelSpecs,
    data: BatchSource,
    output: str,
    *,
    resume: bool = False,
    runtime: Runtime | None = None,
    tracking: Tracking | None = None,
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train ``cfg`` on ``data`` (clip batches, or prior pairs for ``task: prior``), writing under ``output``.

    With ``resume`` the run continues from ``output``'s latest checkpoint (model, optimizer, LR schedule,
    EMA, data position, RNG states) when there is one. Every worker of a data-parallel run calls this with
    its own ``runtime`` and its own shard of the data.
    """
    started = time.perf_counter()
    runtime = runtime or Runtime.current()
    store = CheckpointStore(output)
    check_output(output, resume)
    ckpt = store.latest() if resume else None
    if resume and ckpt is None:
        log.info("--resume: no checkpoint under %s yet, starting fresh", output)
    log.info("training %s (%s) on %s, worker %d/%d:\n%s", cfg.stage, specs.label(), runtime.device,
             runtime.rank, runtime.world_size, cfg.to_yaml())

    torch.manual_seed(cfg.seed + runtime.rank)
    np.random.seed((cfg.seed + runtime.rank) % 2**32)
    random.seed(cfg.seed + runtime.rank)
    if ckpt is not None:
        init_from = store.uri(CHECKPOINTS_DIR, ckpt, MODEL_DIR)
        with store.local_dir(CHECKPOINTS_DIR, ckpt, MODEL_DIR) as model_dir:
            task = build_task(cfg, specs, runtime, str(model_dir), data)
    else:
        init_from = resolve_init(cfg, specs, output)
        log.info("initialising from %s", init_from)
        task = build_task(cfg, specs, runtime, init_from, data)
        if cfg.task == "prior" and cfg.fit_clip_stats:
            task.fit_clip_stats()

    gens = {
        "sample": torch.Generator().manual_seed(cfg.seed * 1_000_003 + runtime.rank),  # noise, t, t_s, dropout
        "kind": torch.Generator().manual_seed(cfg.seed),  # image or video step: the same on every worker
    }
    trainable = task.trainable
    optimizer = torch.optim.AdamW(
        trainable.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = max(cfg.warmup_steps, 0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=task.amp_dtype == torch.float16)
    ema = EMA(trainable.parameters, cfg.ema_decay) if cfg.ema_decay is not None else None
    step, run_id = 0, None
    if ckpt is not None:
        state = store.read_torch(CHECKPOINTS_DIR, ckpt, STATE_FILE)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"checkpoint {ckpt} has no EMA state but ema_decay is set")
            ema.load_state_dict(state["ema"])
        task.load_data_state(state["data"][runtime.rank] if runtime.rank in state["data"] else state["data"][0])
        step, run_id = int(state["step"]), state.get("mlflow_run_id")
        rng_file = f"rng-{runtime.rank}.pt"
        if store.exists(CHECKPOINTS_DIR, ckpt, rng_file):
            set_rng_state(store.read_torch(CHECKPOINTS_DIR, ckpt, rng_file), gens)
        else:
            log.warning("checkpoint %s has no %s (different worker count): random streams restart", ckpt, rng_file)
        log.info("resumed from %s at step %d", store.uri(CHECKPOINTS_DIR, ckpt), step)
    start_step = step

    model = wrap_model(task.model, cfg, runtime, task.find_unused_parameters)
    wrapped = model is not task.model
    tracker = None
    if runtime.is_main:
        if ckpt is None:
            store.write_bytes(cfg.to_yaml().encode(), "config.yaml")
        if tracking is not None and tracking.uri:
            tracker = MlflowTracker(tracking, run_id)
            if not tracker.resumed:
                tracker.log_params({**cfg.as_params(), "models": specs.name, "world_size": str(runtime.world_size)})

    accum = cfg.accumulation(runtime.world_size)
    log.info("batch: %d per worker x %d accumulation x %d workers = %d clips per step", cfg.batch_size, accum,
             runtime.world_size, cfg.batch_size * accum * runtime.world_size)
    losses: list[float] = []
    window = {"loss": 0.0, "steps": 0, "samples": 0, "frames": 0, "image_steps": 0, "t0": time.perf_counter()}
    status = "FAILED"
    try:
        while step < cfg.max_steps:
            task.model.train()
            image_step = bool(torch.rand((), generator=gens["kind"]) < cfg.image_batch_prob)
            step_loss, samples, frames = 0.0, 0, 0
            for micro in range(accum):
                last = micro == accum - 1
                sync = contextlib.nullcontext() if last or not wrapped else model.no_sync()
                with sync:
                    loss, info = task.loss(model, image_step, gens["sample"])
                    scaler.scale(loss / accum).backward()
                step_loss += loss.item() / accum
                samples += info["samples"]
                frames += info["frames"]
            if not wrapped:
                runtime.all_reduce_grads(trainable.parameters)
            scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.max_grad_norm is not None:
                if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over every shard
                    grad_norm = float(model.clip_grad_norm_(cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable.parameters, cfg.max_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
            if ema is not None:
                ema.update()
            step += 1
            losses.append(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}")
            window["loss"] += step_loss
            window["steps"] += 1
            window["samples"] += samples
            window["frames"] += frames
            window["image_steps"] += int(image_step)
            metrics = {"loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "image_step": float(image_step)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _log_window(step, window, optimizer, runtime, tracker)
            for callback in callbacks:
                callback(step, metrics)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(store, step, task, model, optimizer, lr_schedule, scaler, ema, gens, runtime,
                                cfg, tracker.run_id if tracker else None)
        final = export_final(store, task, model, ema, runtime)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(status)
    seconds = time.perf_counter() - started
    log.info("trained %s: steps %d -> %d in %.1fs; weights in %s", cfg.stage, start_step, step, seconds, final)
    return TrainResult(
        output=output, steps=step, losses=losses, start_step=start_step, final=final, init_from=init_from,
        mlflow_run_id=tracker.run_id if tracker else None, seconds=seconds,
    )


def _log_window(step: int, window: dict, optimizer, runtime: Runtime, tracker: MlflowTracker | None) -> None:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    loss, samples, frames = runtime.mean([window["loss"] / window["steps"], window["samples"], window["frames"]])
    metrics = {
        "loss": loss,
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_s": samples * runtime.world_size / elapsed,
        "frames_per_s": frames * runtime.world_size / elapsed,
        "image_step_fraction": window["image_steps"] / window["steps"],
    }
    log.info("step %d: loss %.5f, lr %.3g, %.1f samples/s, %.1f frames/s", step, metrics["loss"], metrics["lr"],
             metrics["samples_per_s"], metrics["frames_per_s"])
    if tracker is not None:
        tracker.log_metrics(metrics, step)
    if runtime.report is not None:
        runtime.report({**metrics, "step": step})
    window.update(loss=0.0, steps=0, samples=0, frames=0, image_steps=0, t0=time.perf_counter())


def wrap_model(model: nn.Module, cfg: TrainConfig, runtime: Runtime, find_unused: bool) -> nn.Module:
    """DDP (or FSDP) around ``model`` when several workers train; the model itself otherwise."""
    if not runtime.distributed:
        return model
    if cfg.strategy == "fsdp":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        if "conv_in_structure" in cfg.trainable and not {"all", "spatial"} & set(cfg.trainable):
            raise ConfigError("trainable conv_in_structure (a masked parameter) is not supported with fsdp; use ddp")
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=FSDP_MIN_UNIT_PARAMS)
        return FullyShardedDataParallel(  # sync_module_states: every worker starts from rank 0's weights, as DDP does
            model, use_orig_params=True, auto_wrap_policy=policy, device_id=runtime.device, sync_module_states=True
        )
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter requires a gradient")
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


@contextlib.contextmanager
def _full_weights(model: nn.Module, runtime: Runtime):
    """Inside: the unwrapped module holds full weights on the main worker (FSDP gathers them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True):
            yield
    else:
        yield


def _optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.optim_state_dict(model, optimizer)
    return optimizer.state_dict()


def save_checkpoint(
    store: CheckpointStore,
    step: int,
    task,
    model: nn.Module,
    optimizer,
    lr_schedule,
    scaler,
    ema: EMA | None,
    gens: dict[str, torch.Generator],
    runtime: Runtime,
    cfg: TrainConfig,
    mlflow_run_id: str | None,
) -> str:
    """Write checkpoint ``step`` (every worker its RNG and data position), commit it, move ``latest``."""
    name = checkpoint_name(step)
    tmp = f".tmp-{name}"
    if runtime.is_main:
        store.remove(CHECKPOINTS_DIR, tmp)
    runtime.barrier()
    data_states = _gather_objects(task.data_state(), runtime)
    optim_state = _optimizer_state(model, optimizer)  # collective under FSDP
    store.write_torch(rng_state(gens), CHECKPOINTS_DIR, tmp, f"rng-{runtime.rank}.pt")
    with _full_weights(model, runtime):
        if runtime.is_main:
            with tempfile.TemporaryDirectory(prefix="gen1-save-") as local:
                task.save_model(Path(local) / MODEL_DIR)
                store.upload_dir(Path(local), CHECKPOINTS_DIR, tmp)
            state = {
                "step": step,
                "optimizer": optim_state,
                "lr_schedule": lr_schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "data": dict(enumerate(data_states)),
                "world_size": runtime.world_size,
                "mlflow_run_id": mlflow_run_id,
                "config": cfg.as_dict(),
            }
            store.write_torch(state, CHECKPOINTS_DIR, tmp, STATE_FILE)
    runtime.barrier()
    if runtime.is_main:
        store.commit_dir((CHECKPOINTS_DIR, tmp), (CHECKPOINTS_DIR, name))
        store.set_latest(name)
        store.prune(cfg.keep_checkpoints)
        log.info("checkpoint %s", store.uri(CHECKPOINTS_DIR, name))
    runtime.barrier()
    return name


def export_final(store: CheckpointStore, task, model: nn.Module, ema: EMA | None, runtime: Runtime) -> str:
    """The inference weights (EMA weights when EMA is on) to ``OUTPUT/final``, committed by rename."""
    tmp = f".tmp-{FINAL}"
    with _full_weights(model, runtime):
        if runtime.is_main:
            store.remove(tmp)
            swap = ema.swapped() if ema is not None else contextlib.nullcontext()
            with swap, tempfile.TemporaryDirectory(prefix="gen1-final-") as local:
                task.save_model(Path(local))
                store.upload_dir(Path(local), tmp)
            store.commit_dir((tmp,), (FINAL,))
            log.info("exported %s weights to %s", "EMA" if ema is not None else "final", store.uri(FINAL))
    runtime.barrier()
    return store.uri(FINAL)


def _gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out
