"""Training from the preprocess feature shards: on this process, or on a Ray cluster with Ray Train.

Both paths decode shard rows with `pipelines.schema`'s row helpers and collate them with
`gen1.train_data`, then run the same loop, `gen1.training.train`:

- **local** (`local_source`): the shards are read with pyarrow and batched in a per-epoch shuffled order
  fixed by the seed, so a resumed run sees exactly the batches an uninterrupted one would have seen;
- **Ray Train** (`train_with_ray`): a `TorchTrainer` starts ``num_workers`` workers (DDP over gloo on CPU,
  NCCL on GPU; FSDP by config), Ray Data streams the shards (``read_parquet``), splits them over the
  workers and each worker iterates its split with ``iter_torch_batches``. Checkpoints and resume are
  `gen1.training`'s own, and MLflow logging goes through the tracker handed in
  (`pipelines.tracking.MlflowTracker`), so they behave the same as in a local run; every worker also
  reports its logged metrics to Ray Train.

With a tracker, the run's input is the data described by `training_data` (the committed shards: their URI,
clip count and a digest of their clip ids; or the image folder of a prior run).

Prior training reads (caption, CLIP image embedding) pairs: shard rows that carry a caption, or a folder
of images with same-name ``.txt`` captions.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gen1.config import ModelSpecs
from gen1.train_data import ClipBatch, PriorBatch, RowSource, collate_clips, collate_prior_rows, list_images
from gen1.training import Runtime, Tracker, TrainConfig, TrainingData, TrainResult, check_output, train
from pipelines.runtime import forwarded_env, init_ray
from pipelines.schema import (
    SHARDS_DIR,
    TableStore,
    read_shards,
    row_clip_embedding,
    row_depth,
    row_frames,
    row_latents,
)

log = logging.getLogger(__name__)

BASE_COLUMNS = ["clip_id", "num_frames", "height", "width", "clip_embedding", "clip_dim"]
DEPTH_COLUMNS = ["depth", "depth_shape"]
LATENT_COLUMNS = ["latents", "latents_shape"]
FRAME_COLUMNS = ["frames", "frames_format"]
PRIOR_COLUMNS = ["clip_id", "num_frames", "clip_embedding", "clip_dim", "caption"]


# ------------------------------------------------------------------------------------------------ rows


def decode_row(row: Mapping[str, Any], with_depth: bool = True) -> dict[str, Any]:
    """A shard row (as read from Parquet) -> the decoded row `gen1.train_data.collate_clips` takes."""
    out: dict[str, Any] = {"clip_id": row["clip_id"], "clip_embedding": row_clip_embedding(row)}
    if with_depth and row.get("depth") is not None:
        out["depth"] = row_depth(row)
    if row.get("latents") is not None:
        out["latents"] = row_latents(row)
    elif row.get("frames") is not None:
        out["frames"] = row_frames(row)
    if row.get("caption") is not None:
        out["caption"] = row["caption"]
    return out


def shard_columns(cfg: TrainConfig, has_latents: bool) -> list[str]:
    """The shard columns a run reads: frames only when no latents are stored, depth only with structure."""
    if cfg.task == "prior":
        return list(PRIOR_COLUMNS)
    columns = BASE_COLUMNS + (LATENT_COLUMNS if has_latents else FRAME_COLUMNS)
    return columns + (DEPTH_COLUMNS if cfg.use_structure else [])


def shards_have_latents(data: str) -> bool:
    """True when every committed shard row carries VAE latents."""
    table = read_shards(data, ["latents_shape"])
    if table.num_rows == 0:
        raise FileNotFoundError(f"no committed feature shards under {data!r} (expected {data}/{SHARDS_DIR}/part-*.parquet)")
    return table.column("latents_shape").null_count == 0


def _collate_for(cfg: TrainConfig):
    if cfg.task == "prior":
        return functools.partial(collate_prior_rows, seed=cfg.seed)
    return collate_clips


def local_source(cfg: TrainConfig, data: str, specs: ModelSpecs | None = None) -> RowSource:
    """The batches of a one-process run: shards read with pyarrow, or a captioned-image folder (prior)."""
    if cfg.task == "prior" and not _has_shards(data):
        from gen1.clip import ClipEmbedder
        from gen1.train_data import read_captioned_images

        if specs is None:
            raise ValueError("prior training from an image folder needs the model specs (for CLIP)")
        rows = read_captioned_images(data, ClipEmbedder(specs.clip, convention=specs.content))
        return RowSource(len(rows), lambda idx: [rows[i] for i in idx], cfg.batch_size, cfg.seed,
                         collate=_collate_for(cfg))
    has_latents = shards_have_latents(data)
    table = read_shards(data, shard_columns(cfg, has_latents))
    if cfg.task == "prior":
        table = table.filter(table.column("caption").is_valid())
        if table.num_rows == 0:
            raise ValueError(f"no shard row under {data!r} has a caption; preprocess with captions for the prior")
    log.info("training data %s: %d clips (%s)", data, table.num_rows, "latents stored" if has_latents else "frames stored")
    with_depth = cfg.use_structure

    def get_rows(indices: list[int]) -> list[dict]:
        return [decode_row(r, with_depth) for r in table.take(indices).to_pylist()]

    return RowSource(table.num_rows, get_rows, cfg.batch_size, seed=cfg.seed, collate=_collate_for(cfg))


def _has_shards(data: str) -> bool:
    return bool(TableStore(data).committed(SHARDS_DIR))


def training_data(data: str) -> TrainingData:
    """What a run under ``data`` trains on, for its tracker: the committed feature shards (digest: of their
    sorted clip ids, so it changes when clips are added, whatever the sharding), or a folder of captioned
    images (digest: of the image URIs)."""
    base = posixpath.basename(data.rstrip("/")) or data
    if _has_shards(data):
        items, name = sorted(read_shards(data, ["clip_id"]).column("clip_id").to_pylist()), f"{base} feature shards"
    else:
        items, name = list_images(data), f"{base} images"
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
    return TrainingData(name=name, source=data, digest=digest, rows=len(items))


# ------------------------------------------------------------------------------------------ Ray Data


def shard_dataset(cfg: TrainConfig, data: str):
    """A Ray Dataset over the committed shards (only the columns this run needs)."""
    import ray.data

    store = TableStore(data)
    paths = [store.uri(p) for p in store.committed(SHARDS_DIR)]
    if not paths:
        raise FileNotFoundError(f"no committed feature shards under {data!r} (expected {data}/{SHARDS_DIR}/part-*.parquet)")
    columns = shard_columns(cfg, shards_have_latents(data))
    ds = ray.data.read_parquet(paths, columns=columns, filesystem=_arrow_fs(store))
    if cfg.task == "prior":
        ds = ds.filter(lambda row: row["caption"] is not None)
    return ds


def _arrow_fs(store: TableStore):
    """A pyarrow filesystem for the shards' fsspec filesystem (so s3 endpoints and options carry over)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(store.fs, LocalFileSystem):
        return None
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))


def _numpy_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


class RayShardSource:
    """A `gen1.train_data.BatchSource` over this worker's Ray Data split (``ray.train.get_dataset_shard``).

    Each epoch is one pass of ``iter_torch_batches`` with a local shuffle seeded by (seed, epoch);
    ``skip`` batches are read and dropped (a resumed run continues at its saved position).
    """

    def __init__(self, shard, cfg: TrainConfig):
        self.shard = shard
        self.cfg = cfg
        self.collate = _collate_for(cfg)
        self.with_depth = cfg.use_structure

    def _collate(self, batch: Mapping[str, np.ndarray]) -> ClipBatch | PriorBatch:
        return self.collate([decode_row(r, self.with_depth) for r in _numpy_rows(batch)])

    def batches(self, epoch: int, skip: int = 0) -> Iterator[ClipBatch | PriorBatch]:
        it = self.shard.iter_torch_batches(
            batch_size=self.cfg.batch_size,
            collate_fn=self._collate,
            drop_last=True,
            local_shuffle_buffer_size=4 * self.cfg.batch_size,
            local_shuffle_seed=self.cfg.seed * 1000 + epoch,
        )
        return itertools.islice(it, skip, None)


# ------------------------------------------------------------------------------------------ Ray Train


@dataclass(frozen=True)
class RayTrainSettings:
    """How a Ray Train run is laid out."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: Ray's default (1); fractions let several share a CPU
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started here
    storage_path: str | None = None  # Ray Train's own run records (None: Ray's default)
    max_failures: int = 0  # restarts of the worker group; each restart resumes from the latest checkpoint


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["cfg"])
    runtime = Runtime.current(device=ray.train.torch.get_device(), report=ray.train.report)
    source = RayShardSource(ray.train.get_dataset_shard("train"), cfg)
    train(cfg, config["specs"], source, config["output"], resume=config["resume"], runtime=runtime,
          tracker=config["tracker"], dataset=config["dataset"])


def train_with_ray(
    cfg: TrainConfig,
    specs: ModelSpecs,
    data: str,
    output: str,
    settings: RayTrainSettings = RayTrainSettings(),
    *,
    resume: bool = False,
    tracker: Tracker | None = None,
):
    """Run ``cfg`` as a Ray Train `TorchTrainer` over the shards under ``data``; returns Ray's Result."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.task == "prior" and not _has_shards(data):
        raise ValueError("Ray Train prior training reads feature shards with captions; for an image folder run locally")
    check_output(output, resume)
    # a restarted worker group (max_failures > 0) continues from the run's own latest checkpoint
    resume = resume or settings.max_failures > 0
    started = init_ray(settings.ray_address)
    try:
        env = forwarded_env()
        if os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
        resources = {"CPU": settings.cpus_per_worker} if settings.cpus_per_worker is not None else None
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.as_dict(),
                "specs": specs,
                "output": output,
                "resume": resume,
                "tracker": tracker,
                "dataset": training_data(data) if tracker is not None else None,
            },
            torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=f"gen1-train-{cfg.stage}",
                storage_path=settings.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
                worker_runtime_env={"env_vars": env} if env else None,
            ),
            datasets={"train": shard_dataset(cfg, data)},
        )
        log.info("Ray Train: %d workers (%s), output %s", settings.num_workers, "GPU" if settings.use_gpu else "CPU", output)
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()


def train_local(
    cfg: TrainConfig,
    specs: ModelSpecs,
    data: str,
    output: str,
    *,
    resume: bool = False,
    tracker: Tracker | None = None,
    device: str | None = None,
    callbacks: Sequence = (),
) -> TrainResult:
    """Run ``cfg`` in this process over the shards (or captioned images) under ``data``."""
    return train(
        cfg, specs, local_source(cfg, data, specs), output, resume=resume,
        runtime=Runtime.current(device=device), tracker=tracker, callbacks=callbacks,
        dataset=training_data(data) if tracker is not None else None,
    )
