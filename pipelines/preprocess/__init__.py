"""The preprocess pipeline: videos -> clips -> decode -> depth -> CLIP (-> VAE latents) -> Parquet shards.

Ray Data streams clips through plain stage classes (`pipelines.preprocess.stages`: each
``__call__(batch: pandas.DataFrame) -> DataFrame``, callable without Ray); the driver
(`pipelines.preprocess.run`) plans, skips and commits::

    list videos (driver) -> drop quarantined videos (driver)
      -> PlanStage (`pipelines.sources`; CPU tasks, or the driver for a few videos: probe, pick clips)
      -> drop clips already in DST or quarantined (driver)
      -> DecodeStage (CPU tasks) -> DepthStage (actor pool) -> ClipStage (actor pool)
      -> [LatentsStage (actor pool)] -> ShardWriter (CPU tasks: write shards/_tmp/..., errors/_tmp/...)
      -> Committer (`pipelines.commits`, one per table; driver: move each tmp file to its final name,
         one at a time)

Failures are data: a clip that cannot be decoded or fails in a stage becomes an error row that flows on
to the writer and lands in ``DST/errors`` (`pipelines.failures`). Completion is tracked per clip id:
a rerun plans the same clips, skips those already committed and retries the ones that failed. The
driver is the only committer and drops rows whose clip id is already committed (also by another run
that committed meanwhile), so DST never holds a clip id twice. Whatever is neither committed nor in
errors when the stream ends (e.g. the stream itself failed) is recorded as a ``pipeline`` error, so
every planned clip ends either written or in ``errors``. Inputs that failed in two runs are skipped
(`pipelines.quarantine`) unless ``retry_quarantined`` is set; each run ends by rewriting the quarantine
list and its run record, ``DST/runs/<run_id>.json`` (a failed write of either is reported and the command
exits 6). One driver at a time: a run holds DST's lease from start to end (`pipelines.lease`), and a second
driver waits for it or refuses; at start the run removes ``_tmp/`` leftovers of runs that died.

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
