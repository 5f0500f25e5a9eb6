"""`PreprocessConfig`: every setting of a preprocess run besides SRC and DST; `ResolvedConfig`: the same with
the model preset's defaults (weight specs, frames, stride, size) filled in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen1.config import ConfigError, ModelSpecs, config_from_mapping, load_model_specs, read_yaml_mapping
from pipelines.lease import check_lease_settings
from pipelines.runtime import RetryConfig
from pipelines.sources import VIDEO_EXTENSIONS
from pipelines.timeouts import check_time_limits

# The fields holding per-call time limits (seconds; 0 or None: none): checked, and a pass's stall limit
# derived from them.
TIME_LIMITS = ("decode_timeout_s", "model_timeout_s")


@dataclass
class PreprocessConfig:
    """Everything a preprocess run needs besides SRC and DST. Load with `from_yaml`; printed at start."""

    models: str = "tiny"  # preset name or YAML of weight specs (gen1.config.load_model_specs)
    depth_model: str | None = None  # override the preset's weight spec of that component
    clip_model: str | None = None
    vae_model: str | None = None
    # sampling: None = the preset's (sd15: 8 frames 4 apart at 448x256; tiny: 4 frames 2 apart at 64x64)
    frames: int | None = None
    stride: int | None = None
    clips_per_video: int | None = None  # None: every non-overlapping clip; else that many, evenly spread
    size: tuple[int, int] | None = None  # (w, h) for landscape sources; portrait sources get (h, w)
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    manifest_column: str = "uri"
    # outputs
    store_frames: bool = True  # keep the resized frames (so training can compute VAE latents)
    frames_format: str = "jpeg"  # "jpeg" (compact) | "raw" (exact uint8)
    jpeg_quality: int = 95
    latents: bool = False  # compute VAE latents of the frames (LatentsStage)
    shard_size: int = 64  # clips per shard file (when target_shard_bytes is None)
    # Shard files sized by bytes instead: each file holds rows whose in-memory Arrow size totals at most this
    # (a row larger than it gets a file of its own), so a file is at most target + one row, and smaller once
    # zstd compresses it. Writer batches hold about this many bytes (estimated from the frame size), so most
    # files come close to it. None: shard_size clips per file.
    target_shard_bytes: int | None = None
    # execution
    plan_batch_size: int = 1  # videos per planning task
    plan_in_driver_max: int = 64  # corpora up to this many videos are planned in the driver (no task start-up)
    # Memory: blocks stream through the object store; Ray Data backpressures each stage by its share of the
    # store (about half of it in all), and decodes run at most max_concurrent_decodes at once, so memory does
    # not grow with the corpus. A block is decode_batch_size decoded clips (frames * h * w * 3 bytes each,
    # plus float16 depth after the depth stage); every stage may hold a block or two in and out whatever the
    # budget, and Ray spills past 80% of the store, so keep a block under about 1/16 of the object store (the
    # test runs 4.4 MiB blocks in 80 MiB) or blocks spill to disk. Frames leave the stream after the last
    # model stage unless store_frames is set. The writer's batch (shard_size rows, or target_shard_bytes)
    # also waits in the store: keep it a small part of the store too, or the stages starve each other.
    decode_batch_size: int = 4  # clips per block out of the decode stage
    # Model calls are sized in frames: a call takes as many whole clips as fit (at least one), and the
    # model's forwards take that many frames at most.
    depth_batch_frames: int = 16  # frames per depth call
    clip_batch_frames: int = 32  # frames per CLIP call
    latents_batch_frames: int = 16
    # One actor pool for every model stage (depth, then CLIP, then latents, in each actor) instead of one
    # pool per model. None: fused on a CPU-only cluster, where each pool's process pays its own torch and
    # transformers imports (about 8 CPU seconds) and the models take turns on the same cores anyway; separate
    # on a GPU cluster, where each pool gets its GPU share. A fused pool has depth_concurrency actors.
    fuse_models: bool | None = None
    depth_concurrency: int = 1  # actors per model pool
    clip_concurrency: int = 1
    latents_concurrency: int = 1
    # CPU tasks (plan, decode, write) claim task_num_cpus each, at most task_concurrency at once (None: the
    # cluster's CPU count). 0 CPUs means they never wait behind model actors: actors that hold every CPU,
    # e.g. after a node died and its actors restarted elsewhere, would otherwise starve them and hang the job.
    task_num_cpus: float = 0.0
    task_concurrency: int | None = None
    actor_num_cpus: float = 0.5  # model actors on a CPU-only cluster
    depth_num_gpus: float = 0.5  # model actors when the cluster has GPUs (defaults fit on one GPU)
    clip_num_gpus: float = 0.25
    latents_num_gpus: float = 0.25
    device: str | None = None  # None: cuda when the actor got a GPU, else cpu
    max_failure_fraction: float = 0.1  # exit 4 when failed / (committed + failed) exceeds this (PreprocessSummary)
    # time limits (`pipelines.timeouts`; None or 0: none). A clip over the limit becomes an error row of its
    # stage with error_type "timeout". A late decode's child process is killed; a hung model call's thread is
    # abandoned.
    decode_timeout_s: float | None = 120.0  # per probe (plan) and per clip decode
    model_timeout_s: float | None = 600.0  # per model call (a batch forward, or one clip's on retry)
    # Decoding: each decode actor owns one child process that decodes one video at a time (a decoder that
    # hangs is killed, one that crashes fails only its video) and streams its clips out as they complete, so
    # Ray Data bounds each actor's output more loosely than a task's: on a tiny store (80 MiB, 2.6 MiB blocks)
    # two actors spilled where one did not. None: half the cluster's CPUs, at least 1.
    max_concurrent_decodes: int | None = None  # decode actors, hence videos decoding at once
    decode_threads: int = 0  # FFmpeg threads per decode (0: FFmpeg's choice)
    # CPU threads of each model actor on a CPU-only cluster (None: Ray's default, one per claimed CPU)
    model_threads: int | None = None
    # inputs that failed in 2 runs are skipped (pipelines.quarantine) unless this is set
    retry_quarantined: bool = False
    # Bounded retries of every Ray Data call (`pipelines.runtime.RetryConfig`; YAML: a mapping of its fields).
    # A clip whose Ray worker or actor died on every attempt, also when run again alone, becomes an error
    # row (stage "worker", error_type "crash") that counts toward quarantine.
    retries: RetryConfig = field(default_factory=RetryConfig)
    # Concurrent drivers (`pipelines.lease`): a run holds DST's lease while it runs (renewed every
    # lease_ttl_s / 3; a driver that dies frees it after lease_ttl_s, or at once seen from its own machine); a
    # second driver waits up to lease_wait_s for it, then refuses (exit code 5). At start the run removes
    # DST's _tmp/ leftovers older than tmp_max_age_s (what runs that died wrote and never committed).
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 0.0
    tmp_max_age_s: float = 86400.0
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started here
    num_cpus: int | None = None  # CPUs of a local Ray (None: the machine's)
    progress: bool = True  # Ray Data progress bars
    # fsspec options (credentials, endpoint) of every read and write: listing, probes, decodes, shards, records
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        self.extensions = tuple(self.extensions)
        self.retries = RetryConfig.from_value(self.retries)
        if self.frames_format not in ("jpeg", "raw"):
            raise ConfigError(f"frames_format: expected 'jpeg' or 'raw'; found {self.frames_format!r}")
        for name in ("shard_size", "plan_batch_size", "decode_batch_size", "depth_batch_frames",
                     "clip_batch_frames", "latents_batch_frames", "depth_concurrency", "clip_concurrency",
                     "latents_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1; found {getattr(self, name)!r}")
        if self.target_shard_bytes is not None and int(self.target_shard_bytes) < 1:
            raise ConfigError(f"target_shard_bytes: expected bytes >= 1 or None; found {self.target_shard_bytes!r}")
        for name in ("max_concurrent_decodes", "model_threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1 or None; found {getattr(self, name)!r}")
        if int(self.decode_threads) < 0:
            raise ConfigError(f"decode_threads: expected an integer >= 0; found {self.decode_threads!r}")
        check_time_limits(self, TIME_LIMITS)
        check_lease_settings(self)
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"max_failure_fraction: expected a value in [0, 1]; found {self.max_failure_fraction}")

    @property
    def call_limits_s(self) -> tuple[float | None, ...]:
        """Every per-call time limit of the job: a pass's stall limit is derived from them
        (`pipelines.runtime.RetryConfig.stall_timeout`)."""
        return tuple(getattr(self, name) for name in TIME_LIMITS)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PreprocessConfig:
        """Fields from a YAML mapping, then ``overrides`` (None values ignored)."""
        return config_from_mapping(cls, read_yaml_mapping(path, "preprocess settings"), path, overrides)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d

    def resolved(self) -> ResolvedConfig:
        """The config with preset defaults filled in."""
        specs = load_model_specs(self.models)
        return ResolvedConfig(
            specs=specs,
            frames=self.frames or specs.frames,
            stride=self.stride or specs.frame_stride,
            size=self.size or (specs.width, specs.height),
            depth_model=self.depth_model or specs.depth,
            clip_model=self.clip_model or specs.clip,
            vae_model=(self.vae_model or specs.vae) if self.latents else None,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    specs: ModelSpecs
    frames: int
    stride: int
    size: tuple[int, int]
    depth_model: str
    clip_model: str
    vae_model: str | None
