"""The preprocess pipeline: videos -> clips -> decode -> depth -> CLIP (-> VAE latents) -> Parquet shards.

Ray Data streams clips through plain stage classes (`pipelines.preprocess.stages`: each
``__call__(batch: pandas.DataFrame) -> DataFrame``, callable without Ray); the driver
(`pipelines.preprocess.run`) plans, skips and commits::

    list videos (driver) -> drop quarantined videos (driver)
      -> PlanStage (`pipelines.sources`; CPU tasks, or the driver for a few videos: probe, pick clips)
      -> drop clips already in DST or quarantined (driver)
      -> DecodeStage (actor pool: one video per call, decoded in a child process)
      -> DepthStage (actor pool) -> ClipStage (actor pool) -> [LatentsStage (actor pool)]
         (on a CPU-only cluster one pool runs them all in each actor: FusedModels, ``fuse_models``)
      -> ShardWriter (CPU tasks: write shards/_tmp/..., errors/_tmp/...)
      -> Committer (`pipelines.commits`, one per table; driver: move each tmp file to its final name,
         one at a time)

Failures are data: a clip that cannot be decoded or fails in a stage becomes an error row that flows on
to the writer and lands in ``DST/errors`` (`pipelines.failures`). Completion is tracked per clip id:
a rerun plans the same clips, skips those already committed (read at start from the shards' key index,
`pipelines.commit_index`, not from every shard) and retries the ones that failed. The driver holding DST's
lease is the only committer and drops rows whose clip id is already committed (by an earlier run or
earlier in this one), so DST never holds a clip id twice. Every Ray Data call has bounded retries
(``retries``, `pipelines.runtime.RetryConfig`): a clip whose worker or actor died on every attempt, also
when streamed again alone, becomes an error (stage ``worker``, error_type ``crash``) that counts toward
quarantine, and the job finishes. What is neither committed nor in errors when a broken stream ends is
recorded as a ``pipeline`` error, so every planned clip ends either written or in ``errors``. A model
call past ``model_timeout_s`` retires its actor (`pipelines.timeouts.Retirement`). Inputs that failed in
two runs are skipped (`pipelines.quarantine`) unless ``retry_quarantined`` is set; each run ends by
rewriting the quarantine list and its run record, ``DST/runs/<run_id>.json`` (a failed write of either is
reported and the command exits 6). One driver at a time: a run holds DST's lease from start to end
(`pipelines.lease`), and a second driver waits for it or refuses; at start the run removes ``_tmp/``
leftovers of runs that died.

Storage: listing, probes, decodes, shards, errors, quarantine and run records all go through the
config's fsspec ``storage_options``, handed to each stage as an argument.

Resources (`pipelines.runtime.plan_resources`): model actors take ``num_gpus`` when the cluster has GPUs,
and a fraction of a CPU otherwise. CPU tasks (plan, decode, write) claim no CPU by default and are capped
in number instead (``task_concurrency``, `pipelines.runtime.task_pool`), so they are never starved by
actors that hold every CPU (which hangs Ray Data): measured on 2 CPUs, and after a worker node dies and
its actors restart on the head.

Modules: `config` (`PreprocessConfig`, `ResolvedConfig`), `stages` (the stage classes), `run`
(`run_preprocess`, `PreprocessSummary`).
"""

from pipelines.preprocess.config import PreprocessConfig, ResolvedConfig
from pipelines.preprocess.run import PreprocessSummary, run_preprocess
from pipelines.preprocess.stages import (
    ClipStage,
    DecodeStage,
    DepthStage,
    FusedModels,
    LatentsStage,
    ModelStage,
    ShardWriter,
    clip_frames,
    split_by_bytes,
)

__all__ = [
    "ClipStage",
    "DecodeStage",
    "DepthStage",
    "FusedModels",
    "LatentsStage",
    "ModelStage",
    "PreprocessConfig",
    "PreprocessSummary",
    "ResolvedConfig",
    "ShardWriter",
    "clip_frames",
    "run_preprocess",
    "split_by_bytes",
]
