"""A training run's settings: `TrainConfig` (one YAML file per stage) and where a run starts from."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import yaml

from gen1.config import ConfigError, ModelSpecs

TASKS = ("unet", "prior")
TRAINABLE_GROUPS = ("all", "spatial", "temporal", "conv_in_structure")
MIXED_PRECISION = ("no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
LATENT_CHANNELS = 4
OUTPUT_PARENT = "{output_parent}"  # placeholder in init_from: the folder that holds this run's output


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
    # wall-clock budget: stop (checkpoint and export as at max_steps) after the optimizer step that reaches
    # this many seconds of steps in this call; None = only max_steps. For runs planned in minutes, not steps.
    max_seconds: float | None = None
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
    # (width, height) sizes the image_data images are cut to, one drawn per image step (every worker, every
    # micro-batch alike), each with its transpose added; None = the preset's (sd15: the paper's 320x320,
    # 384x320, 448x256). Frames of the clips keep the clips' size.
    image_buckets: tuple[tuple[int, int], ...] | None = None
    image_flip: bool = True  # image_data: mirror each image with probability 1/2
    subject_data: str | None = None  # customization: folder (or Parquet) of 15-30 subject images
    subject_fraction: float = 0.5  # share of every image batch drawn from the subject
    subject_flip: bool = True
    fit_clip_stats: bool = False  # prior: set the embedding normalisation from the data at the start

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainable", tuple(self.trainable))
        object.__setattr__(self, "ts_range", tuple(int(x) for x in self.ts_range))
        object.__setattr__(self, "adam_betas", tuple(float(x) for x in self.adam_betas))
        if isinstance(self.image_buckets, list | tuple):  # YAML lists -> tuples (hashable, frozen)
            object.__setattr__(self, "image_buckets", tuple(tuple(size) if isinstance(size, list | tuple) else size
                                                            for size in self.image_buckets))
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
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0 or null, found {self.max_seconds}")
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
        if self.image_buckets is not None and not _sizes(self.image_buckets):
            problems.append(
                "image_buckets must be a non-empty list of [width, height] pairs of ints >= 8 or null, found "
                f"{self.as_dict()['image_buckets']}"
            )
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
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def as_params(self) -> dict[str, str]:
        """Flat string values for MLflow params (a size list as ``320x320,384x320``)."""

        def flat(v: Any) -> str:
            return "x".join(map(str, v)) if isinstance(v, list) else str(v)

        return {k: ",".join(map(flat, v)) if isinstance(v, list) else str(v) for k, v in self.as_dict().items()}

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step: ``grad_accum``, or what reaches ``global_batch_size``."""
        if self.global_batch_size is None:
            return self.grad_accum
        return max(1, math.ceil(self.global_batch_size / (self.batch_size * world_size)))

    def images_per_batch(self, frames: int) -> int:
        return self.image_batch_size or self.batch_size * frames

    def image_sizes(self, specs: ModelSpecs) -> tuple[tuple[int, int], ...]:
        """The (width, height) sizes of image steps from ``image_data``: ``image_buckets`` (None: the preset's)
        and their transposes."""
        return with_transposes(self.image_buckets or specs.image_buckets)


def _sizes(value: Any) -> bool:
    """True for a non-empty sequence of (width, height) int pairs, each >= 8."""
    return isinstance(value, tuple) and bool(value) and all(
        isinstance(size, tuple) and len(size) == 2 and all(isinstance(x, int) and x >= 8 for x in size) for size in value
    )


def _lists(value: Any) -> Any:
    """Tuples (nested too) as lists, so YAML and MLflow see plain values."""
    return [_lists(v) for v in value] if isinstance(value, tuple | list) else value


def with_transposes(buckets: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """(width, height) sizes -> each size, then its transpose (a square once).

    ``((320, 320), (384, 320), (448, 256))`` -> 320x320, 384x320, 320x384, 448x256, 256x448.
    """
    sizes: list[tuple[int, int]] = []
    for w, h in buckets:
        for size in ((int(w), int(h)), (int(h), int(w))):
            if size not in sizes:
                sizes.append(size)
    return tuple(sizes)


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
