"""The driver of a preprocess run: `run_preprocess` takes DST's lease (`pipelines.lease`: one driver at a
time; leftovers of dead runs under ``_tmp/`` go), lists and plans the videos, skips what DST already has
or holds in quarantine, streams the rest through the stages (`pipelines.preprocess.stages`), commits what
the writer reports, records lost clips, then updates the quarantine list and writes the run record
(``DST/runs/<run_id>.json``) and gives the lease back. Its `PreprocessSummary` counts every clip
and names the bookkeeping writes that failed.

Lost clips (`pipelines.failures`): the clips a finished stream did not return were lost with a Ray worker
or actor (every attempt of their block died within ``retries``), together with the clips that shared their
blocks; they are streamed again, each clip alone in its blocks, and those lost again become errors
(stage ``worker``, error_type ``crash``) that count toward quarantine. Videos lost while planning are
planned again one per task if they shared one, and become ``plan`` errors of error_type ``crash``. What a
broken stream leaves undone becomes ``pipeline`` errors, which do not count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.commits import Committer
from pipelines.failures import (
    LOST_STAGE,
    STATUS_OK,
    WorkerLost,
    error_record,
    mark_failed,
    missing_record,
    with_error_columns,
)
from pipelines.keyset import rows_not_in
from pipelines.lease import Lease, LeaseError, hold_dst
from pipelines.preprocess.config import PreprocessConfig, ResolvedConfig
from pipelines.preprocess.stages import (
    ClipStage,
    DecodeStage,
    DepthStage,
    FusedModels,
    LatentsStage,
    ShardWriter,
    video_rows,
)
from pipelines.quarantine import (
    QUARANTINE_AFTER,
    QUARANTINE_DIR,
    QUARANTINE_FILE,
    Quarantine,
    load_quarantine,
    write_quarantine,
)
from pipelines.runtime import (
    ActorPool,
    actor_pool,
    bookkeeping,
    bounded_pass,
    cluster_resources,
    init_ray,
    new_run_id,
    operator_seconds,
    plan_resources,
    task_pool,
    write_run_record,
)
from pipelines.schema import ERRORS_DIR, RUNS_DIR, SHARDS_DIR, TableStore
from pipelines.sources import PlanStage, list_videos

logger = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    """What a run did, in clips; `line` is its last log line, `as_dict` goes into its run record."""

    run_id: str
    dst: str
    videos: int = 0
    planned: int = 0  # clips sampled from the videos (whole-video failures count as one)
    ok: int = 0  # clips written by this run
    failed: int = 0  # clips (or whole videos) that ended in `errors` in this run
    skipped: int = 0  # clips already in DST before this run
    quarantined: int = 0  # inputs (clips, and videos that failed planning) skipped as quarantined
    in_quarantine: int = 0  # inputs on the quarantine list after this run (DST/quarantine)
    seconds: float = 0.0
    error: str | None = None  # the exception that stopped the stream, if any
    # writes after the results were committed that failed: the quarantine list, the run record (exit code 6)
    bookkeeping_errors: list[str] = dataclasses.field(default_factory=list)
    # per Ray Data operator: UDF and task wall seconds, rows out (`pipelines.runtime.operator_seconds`)
    stage_seconds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def clips_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def committed(self) -> int:
        """Clips of the corpus committed in DST after this run: those skipped as done and those written now."""
        return self.skipped + self.ok

    @property
    def failure_fraction(self) -> float:
        """This run's failures over the corpus: failed / (committed + failed). Quarantined inputs are in
        neither, so a rerun that retries only the few broken clips of a mostly committed corpus stays low."""
        total = self.committed + self.failed
        return self.failed / total if total else 0.0

    def line(self) -> str:
        return (
            f"preprocess {self.run_id}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped, "
            f"{self.quarantined} quarantined (skipped; {self.in_quarantine} on the list) of {self.planned} clips from {self.videos} videos in {self.seconds:.1f}s "
            f"({self.clips_per_second:.2f} clips/s) -> {self.dst}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "clips_per_second": self.clips_per_second,
                "committed": self.committed, "failure_fraction": self.failure_fraction}


def run_preprocess(src: str, dst: str, cfg: PreprocessConfig | None = None) -> PreprocessSummary:
    """Build feature shards under ``dst`` for the videos under ``src`` (see `pipelines.preprocess`).
    `pipelines.lease.LeaseHeldError` when another driver holds DST's lease past ``cfg.lease_wait_s``."""
    cfg = cfg or PreprocessConfig()
    res = cfg.resolved()
    run_id = new_run_id()
    logger.info("preprocess %s -> %s, run %s, models %s", src, dst, run_id, res.specs.label())
    logger.debug("config: %s", json.dumps(cfg.as_dict(), default=str))  # -v; the run record keeps it
    _check_weights(res)
    store = TableStore(dst, cfg.storage_options)
    with hold_dst(store, "preprocess", run_id, cfg, (SHARDS_DIR, ERRORS_DIR)) as lease:
        summary = _run(src, store, lease, run_id, cfg, res)
    logger.info("%s", summary.line())
    return summary


def _run(src: str, store: TableStore, lease: Lease, run_id: str, cfg: PreprocessConfig,
         res: ResolvedConfig) -> PreprocessSummary:
    """The run, under DST's lease: every commit, the quarantine list and the run record."""
    import ray

    t0 = time.monotonic()
    commits = run_committers(store, run_id, lease)
    shards, errors = commits[SHARDS_DIR], commits[ERRORS_DIR]
    summary = PreprocessSummary(run_id=run_id, dst=store.dst)

    uris = list_videos(src, cfg.extensions, cfg.manifest_column, cfg.storage_options)
    summary.videos = len(uris)
    quarantine = _current_quarantine(store, shards)
    uris = _videos_to_do(uris, quarantine, cfg, summary)
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        todo = _clips_to_do(uris, shards, errors, quarantine, cfg, res, summary)
        if todo:
            summary.error, summary.stage_seconds = _run_clips(todo, commits, store.dst, run_id, cfg, res)
        summary.ok = len(shards.written)
        summary.failed = errors.written.count_not_in(shards.written)
    finally:
        summary.seconds = time.monotonic() - t0
        for committer in commits.values():
            committer.remove_tmp()
        if started:
            ray.shutdown()
    lease.check()  # the quarantine list and the run record are DST's too: only while this run holds it
    _update_quarantine(store, shards, summary)
    record = store.uri(store.path(RUNS_DIR, f"{run_id}.json"))
    bookkeeping(summary.bookkeeping_errors, f"the run record {record}",
                lambda: write_run_record(store, run_id, {"run_id": run_id, "src": src, "config": cfg.as_dict(),
                                                         "summary": summary.as_dict()}))
    return summary


def run_committers(store: TableStore, run_id: str, lease: Lease | None = None) -> dict[str, Committer]:
    """The driver's committers of a run, by table: ``shards`` (a clip id once, tracking the source URIs
    that have a clip) and ``errors`` (every row); each checks ``lease`` before a commit."""
    return {
        SHARDS_DIR: Committer(store, SHARDS_DIR, run_id, key="clip_id", track=("source_uri",), lease=lease),
        ERRORS_DIR: Committer(store, ERRORS_DIR, run_id, key=None, lease=lease),
    }


def _current_quarantine(store: TableStore, shards: Committer) -> Quarantine:
    """The quarantine list from DST/errors, minus the inputs DST/shards has committed by now."""
    return load_quarantine(store, shards.committed, shards.values["source_uri"])


def _videos_to_do(uris: list[str], quarantine: Quarantine, cfg: PreprocessConfig,
                  summary: PreprocessSummary) -> list[str]:
    """``uris`` minus the quarantined videos, unless retry_quarantined; counts those skipped in ``summary``."""
    if cfg.retry_quarantined:
        logger.info("retrying %d quarantined inputs (retry_quarantined)", len(quarantine))
        return uris
    held = [u for u in uris if u in quarantine.videos]
    if held:
        logger.warning("skipping %d quarantined videos (failed planning in %d+ runs; --retry-quarantined "
                       "retries them): %s", len(held), QUARANTINE_AFTER,
                       ", ".join(held[:5]) + (" ..." if len(held) > 5 else ""))
    summary.quarantined += len(held)
    return [u for u in uris if u not in quarantine.videos]


def _check_weights(res: ResolvedConfig) -> None:
    """Fail before any work when a weight spec cannot be resolved."""
    from gen1.weights import resolve_spec

    for spec in (res.depth_model, res.clip_model, res.vae_model):
        if spec:
            resolve_spec(spec)


def _plan(uris: list[str], cfg: PreprocessConfig, res: ResolvedConfig) -> list[dict[str, Any]]:
    """Plan rows (PLAN_SCHEMA) of every video: in the driver for a few videos, else in Ray tasks. A video
    lost with its task worker is planned again alone if it shared its task, and is then a ``plan`` error
    (`pipelines.failures.WorkerLost`)."""
    stage = PlanStage(res.frames, res.stride, cfg.clips_per_video, res.size, cfg.decode_timeout_s,
                      cfg.storage_options)
    if len(uris) <= cfg.plan_in_driver_max:
        return stage({"uri": uris}).to_pylist()
    plans = _plan_in_tasks(stage, uris, cfg, cfg.plan_batch_size)
    lost = sorted(set(uris) - {p["source_uri"] for p in plans})
    if lost and cfg.plan_batch_size > 1:
        logger.warning("%d videos were lost with their planning tasks; planning them again, one per task", len(lost))
        plans += _plan_in_tasks(stage, lost, cfg, 1)
        lost = sorted(set(lost) - {p["source_uri"] for p in plans})
    plans += [stage.error_row(uri, WorkerLost(f"probe {uri}", alone=cfg.plan_batch_size > 1)) for uri in lost]
    return plans


def _plan_in_tasks(stage: PlanStage, uris: list[str], cfg: PreprocessConfig, batch: int) -> list[dict[str, Any]]:
    import ray

    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=math.ceil(len(uris) / batch))
    ds = bounded_pass(ds, cfg.retries, cfg.call_limits_s).map_batches(
        stage, batch_size=batch, batch_format="pandas", num_cpus=cfg.task_num_cpus,
        **task_pool(cfg.retries, cfg.task_concurrency))
    return ds.take_all()


def _clips_to_do(uris: list[str], shards: Committer, errors: Committer, quarantine: Quarantine,
                 cfg: PreprocessConfig, res: ResolvedConfig, summary: PreprocessSummary) -> list[dict[str, Any]]:
    """Plan ``uris``; returns the clips to run: each clip id once, minus those committed and (unless
    retry_quarantined) those quarantined. Commits the plan errors; counts planned, skipped and quarantined
    in ``summary``."""
    plans = _plan(uris, cfg, res)
    ok_plans = _unique_clips([p for p in plans if p["status"] == STATUS_OK])
    todo = rows_not_in(ok_plans, "clip_id", shards.committed)
    summary.skipped = len(ok_plans) - len(todo)
    if not cfg.retry_quarantined:
        held_clips = [p for p in todo if p["clip_id"] in quarantine.clips]
        if held_clips:
            logger.warning("skipping %d quarantined clips (failed in %d+ runs; --retry-quarantined retries "
                           "them)", len(held_clips), QUARANTINE_AFTER)
            todo = [p for p in todo if p["clip_id"] not in quarantine.clips]
        summary.quarantined += len(held_clips)
    plan_errors = [p for p in plans if p["status"] != STATUS_OK]
    summary.planned = len(ok_plans) + len(plan_errors)
    errors.commit_errors([error_record(p) for p in plan_errors])
    logger.info("%d videos -> %d clips: %d to do, %d already in %s, %d quarantined, %d videos failed "
                "planning", len(uris), len(ok_plans), len(todo), summary.skipped, summary.dst, summary.quarantined,
                len(plan_errors))
    return todo


def _unique_clips(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for p in plans:
        if p["clip_id"] not in seen:
            seen.add(p["clip_id"])
            out.append({k: (list(v) if k == "frame_indices" else v) for k, v in p.items()})
    return out


@dataclass(frozen=True)
class _ModelPass:
    """One model stage of the dataset: its class, weight spec, frames per call and actor pool."""

    stage: type
    spec: str
    batch_frames: int
    pool: ActorPool
    options: dict[str, Any] = field(default_factory=dict)  # the stage's own constructor arguments


def _model_passes(cfg: PreprocessConfig, res: ResolvedConfig) -> list[_ModelPass]:
    passes = [
        _ModelPass(DepthStage, res.depth_model, cfg.depth_batch_frames,
                   ActorPool("depth", cfg.depth_concurrency, cfg.depth_num_gpus)),
        _ModelPass(ClipStage, res.clip_model, cfg.clip_batch_frames,
                   ActorPool("clip", cfg.clip_concurrency, cfg.clip_num_gpus), {"convention": res.specs.content}),
    ]
    if res.vae_model:
        passes.append(_ModelPass(LatentsStage, res.vae_model, cfg.latents_batch_frames,
                                 ActorPool("latents", cfg.latents_concurrency, cfg.latents_num_gpus)))
    return passes


def fuse_models(cfg: PreprocessConfig) -> bool:
    """Whether one actor pool runs every model stage: ``fuse_models``, else on a CPU-only cluster."""
    return cfg.fuse_models if cfg.fuse_models is not None else cluster_resources()[1] == 0


def fused_pool(cfg: PreprocessConfig, passes: Sequence[_ModelPass]) -> ActorPool:
    """The one pool of fused model stages: depth_concurrency actors, each with every model's GPU share."""
    return ActorPool("models", cfg.depth_concurrency, sum(p.pool.num_gpus for p in passes))


def decode_actors(cfg: PreprocessConfig, videos: int) -> int:
    """How many decode actors (each decoding one video at a time): max_concurrent_decodes, else half the
    cluster's CPUs; at least 1 and at most one per video."""
    wanted = cfg.max_concurrent_decodes or max(1, int(cluster_resources()[0]) // 2)
    return max(1, min(wanted, videos))


def estimated_row_bytes(cfg: PreprocessConfig, res: ResolvedConfig) -> int:
    """About how many Arrow bytes one shard row takes: depth, CLIP embeddings, frames (JPEG guessed at a
    sixth of raw), latents, plus 1 KiB of ids and scalars. Sizes writer batches for target_shard_bytes."""
    f, (w, h) = res.frames, res.size
    frames = 0 if not cfg.store_frames else f * h * w * 3 // (1 if cfg.frames_format == "raw" else 6)
    latents = 4 * f * (h // 8) * (w // 8) * 2 if res.vae_model else 0
    return f * h * w * 2 + f * res.specs.clip_dim * 2 + frames + latents + 1024


def writer_batch_rows(cfg: PreprocessConfig, res: ResolvedConfig) -> int:
    """Rows per writer call: shard_size, or as many estimated rows as fit in target_shard_bytes."""
    if cfg.target_shard_bytes is None:
        return cfg.shard_size
    return max(1, cfg.target_shard_bytes // estimated_row_bytes(cfg, res))


def _build_dataset(todo: list[dict[str, Any]], dst: str, run_id: str, cfg: PreprocessConfig,
                   res: ResolvedConfig, alone: bool = False):
    """The stream of ``todo``; ``alone``: every clip in blocks of its own (its own decode task, model calls
    and shard), and one call queued per model actor, so a retired actor's next call is never another's."""
    import ray

    passes = _model_passes(cfg, res)
    fused = fuse_models(cfg)
    pools = [fused_pool(cfg, passes)] if fused else [p.pool for p in passes]
    resources = plan_resources(pools, cfg.actor_num_cpus, cfg.task_num_cpus)
    videos = [video_rows([p])[0] for p in todo] if alone else video_rows(todo)
    # A generator stage's clips leave in blocks of about decode_batch_size clips (Ray Data cuts a
    # generator's output at the target block size).
    ds = bounded_pass(ray.data.from_items(videos, override_num_blocks=len(videos)), cfg.retries, cfg.call_limits_s)
    clip_bytes = res.frames * res.size[0] * res.size[1] * 3
    ds.context.target_max_block_size = max(2**20, cfg.decode_batch_size * clip_bytes)  # this run's datasets only
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"timeout_s": cfg.decode_timeout_s, "batch_clips": 1 if alone else cfg.decode_batch_size,
                               "storage_options": cfg.storage_options, "threads": cfg.decode_threads},
        batch_size=1, batch_format="pandas", num_cpus=cfg.task_num_cpus,
        **actor_pool(cfg.retries, decode_actors(cfg, len(videos)), tasks_per_actor=1),
    )
    stages = [(p.stage, {"spec": p.spec, "device": cfg.device, "timeout_s": cfg.model_timeout_s,
                         "drop_frames": i == len(passes) - 1 and not cfg.store_frames,  # the frames' last reader
                         "batch_frames": p.batch_frames, "threads": cfg.model_threads, **p.options})
              for i, p in enumerate(passes)]
    if fused:
        stages = [(FusedModels, {"stages": stages})]
        passes = [_ModelPass(FusedModels, "", min(p.batch_frames for p in passes), fused_pool(cfg, passes))]
    for p, (stage, kwargs) in zip(passes, stages, strict=True):
        ds = ds.map_batches(  # a class: Ray Data runs it in a pool of `concurrency` actors
            stage,
            fn_constructor_kwargs=kwargs,
            batch_size=1 if alone else max(1, p.batch_frames // res.frames),  # whole clips: as many as fit
            batch_format="pandas",
            **actor_pool(cfg.retries, p.pool.concurrency, tasks_per_actor=1 if alone else None),
            **resources[p.pool.name],
        )
    writer = ShardWriter(dst, run_id, {"depth": res.depth_model, "clip": res.specs.content.model_id(res.clip_model),
                                       "vae": res.vae_model},
                         cfg.store_frames, cfg.frames_format, cfg.jpeg_quality, cfg.storage_options,
                         target_bytes=cfg.target_shard_bytes)
    return ds.map_batches(writer, batch_size=1 if alone else writer_batch_rows(cfg, res), batch_format="pandas",
                          num_cpus=cfg.task_num_cpus, **task_pool(cfg.retries, cfg.task_concurrency))


def _run_clips(todo: list[dict[str, Any]], commits: Mapping[str, Committer], dst: str, run_id: str,
               cfg: PreprocessConfig, res: ResolvedConfig) -> tuple[str | None, dict[str, dict[str, float]]]:
    """Stream ``todo``, then the clips a finished stream lost again, each alone; records the clips lost
    again (`WorkerLost`) and what a broken stream left (``pipeline`` errors). Returns what broke the
    stream ("Type: message") or None, and the operators' times."""
    shards, errors = commits[SHARDS_DIR], commits[ERRORS_DIR]
    error, stats = _stream(todo, commits, dst, run_id, cfg, res)
    lost = _lost(todo, shards, errors) if error is None else []
    if lost:
        logger.warning("%d clips were lost with their Ray workers or actors (and the clips sharing their "
                       "blocks); streaming them again, each clip alone", len(lost))
        error, again = _stream(lost, commits, dst, run_id, cfg, res, alone=True)
        for name, entry in again.items():
            for key, value in entry.items():
                stats.setdefault(name, dict.fromkeys(entry, 0.0))[key] += value
        if error is None:
            errors.commit_errors([_lost_record(p) for p in _lost(lost, shards, errors)])
    _record_missing(todo, shards, errors, error)
    return error, stats


def _lost(todo: list[dict[str, Any]], shards: Committer, errors: Committer) -> list[dict[str, Any]]:
    """The clips of ``todo`` neither committed (by any run) nor recorded as failed by this one."""
    return rows_not_in(todo, "clip_id", shards.committed, errors.written)


def _lost_record(plan: dict[str, Any]) -> dict[str, Any]:
    what = f"clip {plan['clip_id']} (start {plan['start']}) of {plan['source_uri']}"
    return error_record(mark_failed(with_error_columns(dict(plan)), LOST_STAGE, WorkerLost(what, alone=True)))


def _stream(todo: list[dict[str, Any]], commits: Mapping[str, Committer], dst: str, run_id: str,
            cfg: PreprocessConfig, res: ResolvedConfig, alone: bool = False
            ) -> tuple[str | None, dict[str, dict[str, float]]]:
    """Stream ``todo`` through the stages (`_build_dataset`), committing each file the writer reports as it
    comes; returns the exception that stopped the stream early ("Type: message") or None, and the
    operators' times."""
    ds = None
    try:
        ds = _build_dataset(todo, dst, run_id, cfg, res, alone)
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for w in batch.to_dict("records"):
                commits[w["table"]].commit_file(w["tmp_path"], [str(i) for i in w["clip_ids"]])
    except LeaseError:
        raise  # another driver took DST over: this one commits nothing more, error rows included (exit 5)
    except Exception as e:  # the stream broke: what is not committed yet becomes a pipeline error
        logger.exception("the pipeline stopped early: %s", e)
        return f"{type(e).__name__}: {e}", operator_seconds(ds) if ds is not None else {}
    return None, operator_seconds(ds)


def _record_missing(todo: list[dict[str, Any]], shards: Committer, errors: Committer, error: str | None) -> None:
    """Planned clips neither written nor in errors (the stream broke) -> `pipeline` errors."""
    missing = rows_not_in(todo, "clip_id", shards.written, errors.written)
    if not missing:
        return
    message = f"the pipeline ended without this clip: {error}" if error else "the pipeline ended without this clip"
    logger.error("%d planned clips were neither written nor failed; recording them as errors", len(missing))
    errors.commit_errors([missing_record(p["clip_id"], p["source_uri"], int(p["start"]), message, error)
                          for p in missing])


def _update_quarantine(store: TableStore, shards: Committer, summary: PreprocessSummary) -> None:
    """Recompute the quarantine list with this run's errors and write it to DST/quarantine (bookkeeping: a
    failure is reported in ``summary.bookkeeping_errors``)."""

    def update() -> None:
        quarantine = _current_quarantine(store, shards)
        write_quarantine(store, quarantine)
        summary.in_quarantine = len(quarantine)

    path = store.uri(store.path(QUARANTINE_DIR, QUARANTINE_FILE))
    bookkeeping(summary.bookkeeping_errors, f"the quarantine list {path}", update)

