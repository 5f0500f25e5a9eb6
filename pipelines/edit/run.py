"""The driver of the edit pipeline: `run_edit` takes DST's lease (`pipelines.lease`), plans the clips,
writes the missing prompts, plans the edits and streams them through the edit actors, writes the run record
and gives the lease back; `EditRun` holds what its passes share (the store, run id, actor resources,
summary and committers).

Every pass runs with the job's bounded ``retries`` and finishes past lost blocks (`pipelines.failures`):
what a finished pass did not return was lost with its Ray worker or actor and becomes an error with
error_type ``crash`` (videos while planning, clips while prompting, edits), except that edits lost in a
call of several (``edit_batch_size`` > 1) are first run again one per call. What a broken stream leaves
undone becomes ``pipeline`` errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gen1.config import ModelSpecs, load_model_specs
from gen1.prompts import ChatConfig, PromptSpec, TemplateWriter
from pipelines.commits import Committer, RowBuffer
from pipelines.edit.clips import EditClip, read_source_table
from pipelines.edit.config import EditJobConfig
from pipelines.edit.keys import plan_tasks
from pipelines.edit.stages import CaptionStage, EditStage, PromptStage, prompt_plan_row, written_prompt_rows
from pipelines.edit.tables import committed_prompts
from pipelines.failures import (
    LOST_STAGE,
    STATUS_ERROR,
    STATUS_OK,
    WorkerLost,
    error_record,
    mark_failed,
    missing_record,
    with_error_columns,
)
from pipelines.keyset import KeySet, rows_not_in
from pipelines.lease import Lease, LeaseError, hold_dst
from pipelines.runtime import (
    ActorPool,
    actor_pool,
    bookkeeping,
    bounded_pass,
    cluster_resources,
    init_ray,
    new_run_id,
    plan_resources,
    task_pool,
    write_run_record,
)
from pipelines.schema import (
    EDIT_SCHEMA_VERSION,
    ERRORS_DIR,
    MANIFEST_DIR,
    MANIFEST_SCHEMA,
    OUTPUTS_DIR,
    PROMPTS_DIR,
    PROMPTS_SCHEMA,
    RUNS_DIR,
    TableStore,
)
from pipelines.sources import PlanStage, is_manifest, list_videos

logger = logging.getLogger(__name__)

EDIT_TABLES = (MANIFEST_DIR, PROMPTS_DIR, ERRORS_DIR, OUTPUTS_DIR)  # what a run writes under _tmp/
PROMPTS_COMMIT_EVERY = 256  # prompt rows per committed part (prompts are cheap to redo)


@dataclass
class EditSummary:
    run_id: str
    dst: str
    videos: int = 0
    clips: int = 0  # clips planned (ok)
    clips_failed: int = 0  # videos that failed planning + clips that failed captioning / prompting
    prompt_writer: str = ""  # of the prompts written by this run: template | chat
    prompt_fallbacks: int = 0  # clips whose prompts the template writer wrote after the chat endpoint was given up
    tasks: int = 0  # edits the job asks for (clips x prompts x grid)
    skipped: int = 0  # already in the manifest before this run
    ok: int = 0  # edits committed by this run
    failed: int = 0  # edits that ended in `errors`
    seconds: float = 0.0
    tiny_models: bool = False
    error: str | None = None  # what stopped the stream, if anything
    # writes after the results were committed that failed: the run record (exit code 6)
    bookkeeping_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def edits_per_minute(self) -> float:
        return 60.0 * self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def committed(self) -> int:
        """Edits committed in the manifest after this run: those skipped as done and those made now."""
        return self.skipped + self.ok

    @property
    def failure_fraction(self) -> float:
        """This run's failures (edits, and clips that failed planning or prompting) over the corpus:
        failed / (committed + failed), so a rerun that retries only the broken ones of a mostly finished
        library stays low."""
        failed = self.failed + self.clips_failed
        total = self.committed + failed
        return failed / total if total else 0.0

    def line(self) -> str:
        tiny = " [TINY RANDOM MODELS]" if self.tiny_models else ""
        fallback = (
            f"; the chat endpoint failed, {self.prompt_fallbacks} clips got template prompts"
            if self.prompt_fallbacks
            else ""
        )
        return (
            f"edit {self.run_id}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped of {self.tasks} edits "
            f"({self.clips} clips, {self.clips_failed} failed{fallback}) in {self.seconds:.1f}s "
            f"({self.edits_per_minute:.1f} edits/min) -> {self.dst}{tiny}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "edits_per_minute": self.edits_per_minute,
            "committed": self.committed,
            "failure_fraction": self.failure_fraction,
        }


def edit_concurrency(config: EditJobConfig) -> int:
    """How many edit actors: ``config.edit_concurrency``, else one per ``edit_num_gpus`` GPUs of the cluster,
    else (no GPUs) one per 4 CPUs."""
    if config.edit_concurrency:
        return config.edit_concurrency
    cpus, gpus = cluster_resources()
    return max(1, int(gpus // config.edit_num_gpus)) if gpus > 0 else max(1, int(cpus // 4))


class EditRun:
    """One run of `run_edit` on a connected Ray: its passes and what they share.

    ``errors`` buffers error records (one part per ``commit_every`` records or ``commit_interval_s``);
    ``manifest`` commits manifest rows once per edit key; ``prompts`` the written prompts; each committer
    checks ``lease`` (the run's lease of DST) before a commit. ``resources``
    holds each actor pool's ``compute`` (`pipelines.runtime.actor_pool`), ``num_cpus`` and ``num_gpus``, planned at the start (a pool
    that does not fit fails the run before any work).
    """

    def __init__(self, config: EditJobConfig, specs: ModelSpecs, run_id: str, lease: Lease | None = None):
        self.config, self.specs, self.run_id, self.lease = config, specs, run_id, lease
        self.store = TableStore(config.dst, config.storage_options)
        self.summary = EditSummary(run_id=run_id, dst=config.dst, tiny_models=specs.is_tiny)
        self.error_parts = Committer(self.store, ERRORS_DIR, run_id, key=None, lease=lease)
        self.errors = RowBuffer(self.error_parts.commit_errors, config.commit_every, config.commit_interval_s)
        self.manifest = Committer(self.store, MANIFEST_DIR, run_id, key="edit_key", lease=lease)
        self.prompts = Committer(self.store, PROMPTS_DIR, run_id, key=None, lease=lease)
        self.resources: dict[str, dict[str, Any]] = {}

    def size_pools(self) -> None:
        """Size the edit pool, and the caption pool when prompts are written. The two passes are separate
        datasets, never running at once, so each is planned alone. An edit actor takes one call at a time:
        when it retires after a time limit (`EditStage`), exactly the one call that finds it retired is run
        again by its replacement (a call queued behind it could be made to wait for several)."""
        cfg = self.config
        pools = [ActorPool("edit", edit_concurrency(cfg), cfg.edit_num_gpus)]
        if cfg.auto_prompts:
            pools.append(
                ActorPool(
                    "caption", cfg.caption_concurrency, min(cfg.caption_num_gpus, cluster_resources()[1])
                )
            )
        for pool in pools:
            planned = plan_resources([pool], cfg.actor_num_cpus, cfg.task_num_cpus)[pool.name]
            one_at_a_time = 1 if pool.name == "edit" else None
            self.resources[pool.name] = {
                **actor_pool(cfg.retries, pool.concurrency, tasks_per_actor=one_at_a_time),
                **planned,
            }

    def fail(self, row: dict[str, Any], message: str | None = None) -> None:
        """Record an error row of a stage batch (``message`` replacing its error message)."""
        record = error_record(row)
        self.errors.add([record if message is None else {**record, "message": message}])

    def failed_clip(self, row: dict[str, Any]) -> bool:
        """True (and recorded) when a planning or prompt-pass row is a clip's failure."""
        if row["status"] == STATUS_OK:
            return False
        self.fail(row)
        self.summary.clips_failed += 1
        return True

    # ------------------------------------------------------------------------------------------ clips

    def plan_clips(self, size: tuple[int, int], frames: int) -> list[EditClip]:
        """The clips to edit: injected, or listed from ``src`` and planned on the cluster (PlanStage)."""
        cfg = self.config
        if cfg.clips is not None:
            clips = list(cfg.clips)
        else:
            clips = self._planned_clips(size, frames)
            clips.sort(key=lambda c: (c.source_uri, c.start))
        unique = list({c.clip_id: c for c in clips}.values())
        if len(unique) != len(clips):
            logger.warning("%d duplicate clips dropped", len(clips) - len(unique))
        self.errors.flush()
        return unique[: cfg.limit] if cfg.limit is not None else unique

    def _planned_clips(self, size: tuple[int, int], frames: int) -> list[EditClip]:
        import ray

        cfg = self.config
        table = read_source_table(cfg.src, cfg.storage_options) if is_manifest(cfg.src) else {}
        uris = (
            list(table)
            if table
            else list_videos(cfg.src, cfg.extensions, storage_options=cfg.storage_options)
        )
        self.summary.videos = len(uris)
        if not uris:
            return []
        stage = PlanStage(frames, cfg.stride, cfg.clips_per_video, size, cfg.decode_timeout_s,
                          cfg.storage_options)
        blocks = min(len(uris), 200)
        ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks)
        ds = bounded_pass(ds, cfg.retries, cfg.call_limits_s).map_batches(
            stage,
            batch_size=1,
            batch_format="pandas",
            num_cpus=cfg.task_num_cpus,
            **task_pool(cfg.retries, cap=blocks),  # no more tasks than blocks (Ray Data warns of idle ones)
        )
        rows = ds.take_all()
        lost = sorted(set(uris) - {r["source_uri"] for r in rows})  # with their planning tasks
        rows += [stage.error_row(u, WorkerLost(f"probe {u}")) for u in lost]
        clips = []
        for row in rows:
            if self.failed_clip(row):
                continue
            extra = table.get(row["source_uri"], {})
            clips.append(
                EditClip.from_plan(
                    row,
                    caption=extra.get("caption"),
                    prompts=tuple(extra.get("prompts", ())),
                    mask_uri=extra.get("mask_uri"),
                )
            )
        return clips

    # ---------------------------------------------------------------------------------------- prompts

    def write_prompts(self, clips: list[EditClip]) -> None:
        """Caption and write prompts for clips with fewer committed prompts than ``auto_prompts``."""
        cfg = self.config
        committed = committed_prompts(cfg.dst, cfg.storage_options)
        rows = [
            prompt_plan_row(clip, committed.get(clip.clip_id, []))
            for clip in clips
            if not clip.prompts and len(committed.get(clip.clip_id, [])) < cfg.auto_prompts
        ]
        if not rows:
            return
        logger.info(
            "writing prompts for %d clips (%d captions to make)",
            len(rows),
            sum(not r["caption"] for r in rows),
        )
        llm = cfg.llm if cfg.llm is not None else ChatConfig.from_env()  # resolved here, not on workers
        logger.info(
            "prompt writer: %s", f"chat {llm.describe()}" if llm else f"templates (seed {cfg.prompt_seed})"
        )
        self.summary.prompt_writer = "chat" if llm else "template"
        buffer = RowBuffer(self._commit_prompts, PROMPTS_COMMIT_EVERY)
        now = dt.datetime.now(dt.UTC)
        came_back: set[str] = set()
        for batch in self._prompt_pass(rows, llm).iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                came_back.add(row["clip_id"])
                if self.failed_clip(row):
                    continue
                if llm is not None and row["writer"] == TemplateWriter.name:
                    self.summary.prompt_fallbacks += 1
                buffer.add(written_prompt_rows(row, self.run_id, now))
        for row in rows:  # lost with a caption or prompt worker
            if row["clip_id"] not in came_back:
                self.failed_clip(mark_failed(dict(row), LOST_STAGE, WorkerLost(f"prompts of clip {row['clip_id']}")))
        buffer.flush()
        self.errors.flush()
        if self.summary.prompt_fallbacks:
            logger.warning(
                "the chat endpoint was given up after %d failed requests in a row: the template writer wrote "
                "the prompts of %d clips (writer 'template' in %s/prompts)",
                llm.max_consecutive_failures,
                self.summary.prompt_fallbacks,
                cfg.dst,
            )

    def _prompt_pass(self, rows: list[dict[str, Any]], llm: ChatConfig | None):
        """The prompts dataset: CaptionStage (an actor pool, when a clip lacks a caption) -> PromptStage:
        CPU tasks with templates; with a chat endpoint ``prompt_concurrency`` actors, so that each keeps its
        HTTP session and circuit breaker from clip to clip (a task would start both afresh). They wait on
        HTTP, so they reserve no CPU."""
        import ray

        cfg = self.config
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.caption_batch_size))
        )
        ds = bounded_pass(ds, cfg.retries, cfg.call_limits_s)
        if any(not r["caption"] for r in rows):
            ds = ds.map_batches(
                CaptionStage,
                fn_constructor_kwargs={
                    "spec": self.specs.caption,
                    "device": cfg.device,
                    "timeout_s": cfg.caption_timeout_s,
                    "decode_timeout_s": cfg.decode_timeout_s,
                    "storage_options": cfg.storage_options,
                },
                batch_size=cfg.caption_batch_size,
                batch_format="pyarrow",
                **self.resources["caption"],
            )
        if llm is None:
            return ds.map_batches(
                PromptStage(cfg.auto_prompts, None, cfg.prompt_seed),
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=cfg.task_num_cpus,
                **task_pool(cfg.retries, cfg.prompt_concurrency),
            )
        return ds.map_batches(  # the pool's size bounds the requests in flight
            PromptStage,
            fn_constructor_kwargs={"n": cfg.auto_prompts, "llm": llm, "seed": cfg.prompt_seed},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            **actor_pool(cfg.retries, cfg.prompt_concurrency),
        )

    def _commit_prompts(self, rows: list[dict[str, Any]]) -> None:
        self.prompts.commit_table(
            pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA), [r["clip_id"] for r in rows]
        )

    def prompts_for(self, clips: list[EditClip]) -> dict[str, list[tuple]]:
        """clip id -> [(prompt, source, caption, caption_model)]: the clip's own, else the job's, else the
        committed written ones."""
        cfg = self.config
        committed = committed_prompts(cfg.dst, cfg.storage_options) if cfg.auto_prompts else {}
        out: dict[str, list[tuple]] = {}
        for clip in clips:
            if clip.prompts:
                out[clip.clip_id] = [(p, "clip", clip.caption, None) for p in clip.prompts]
            elif cfg.prompts:
                out[clip.clip_id] = [(p, "user", clip.caption, None) for p in cfg.prompts]
            elif cfg.auto_prompts:
                rows = committed.get(clip.clip_id, [])[: cfg.auto_prompts]
                out[clip.clip_id] = [
                    (PromptSpec(text=r["prompt"]), r["writer"], r["caption"], r["caption_model"])
                    for r in rows
                ]
        return out

    # ------------------------------------------------------------------------------------------ edits

    def run_edits(self, todo: list[dict[str, Any]]) -> None:
        """Stream ``todo`` through the edit actors, committing manifest rows and errors as they come. Edits a
        finished stream lost become `WorkerLost` errors (those lost from a call of several after a second
        stream, one edit per call); what a broken stream left undone becomes ``pipeline`` errors."""
        cfg = self.config
        buffer = RowBuffer(self._commit_manifest, cfg.commit_every, cfg.commit_interval_s)
        finished = KeySet()  # edit keys that came back (hashes: a library's edits need not fit as strings)
        try:
            self._consume(self._edit_pass(todo, cfg.edit_batch_size), buffer, finished)
            lost = rows_not_in(todo, "edit_key", finished)
            if lost and cfg.edit_batch_size > 1:
                logger.warning("%d edits were lost with their edit actors (and those sharing their calls); "
                               "running them again, one per call", len(lost))
                self._consume(self._edit_pass(lost, 1), buffer, finished)
                lost = rows_not_in(lost, "edit_key", finished)
            for t in lost:
                row = with_error_columns({k: t.get(k) for k in ("clip_id", "source_uri", "start")})
                self.fail(mark_failed(row, LOST_STAGE, WorkerLost(f"edit {t['edit_key']}", cfg.edit_batch_size > 1)))
                finished.add([t["edit_key"]])
            self.summary.failed += len(lost)
        except LeaseError:
            raise  # another driver took DST over: this one commits nothing more (exit 5)
        except Exception as e:  # the stream broke: what is not committed becomes a pipeline error
            logger.exception("the edit stream stopped early: %s", e)
            self.summary.error = f"{type(e).__name__}: {e}"
        finally:
            buffer.flush()
            self.errors.flush()
            self.summary.ok = self.manifest.rows
        missing = rows_not_in(todo, "edit_key", finished)
        if missing:
            message = f"the pipeline ended without this edit: {self.summary.error or 'no result came back'}"
            self.errors.add(
                missing_record(t["clip_id"], t["source_uri"], None, f"edit {t['edit_key']}: {message}")
                for t in missing
            )
            self.errors.flush()
            self.summary.failed += len(missing)

    def _consume(self, ds: Any, buffer: RowBuffer, finished: KeySet) -> None:
        """Take the results of an edit pass: manifest rows into ``buffer``, errors recorded; keys into ``finished``."""
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            now = dt.datetime.now(dt.UTC)
            for row in batch.to_pylist():
                key = row["edit_key"]
                if key in finished:
                    logger.warning("edit %s came back twice; keeping the first", key)
                    continue
                finished.add([key])
                if row["status"] == STATUS_ERROR:
                    self.fail(row, f"edit {key}: {row['error_message']}")
                    self.summary.failed += 1
                    continue
                extra = {"run_id": self.run_id, "created_at": now, "schema_version": EDIT_SCHEMA_VERSION}
                buffer.add([{k: extra[k] if k in extra else row[k] for k in MANIFEST_SCHEMA.names}])

    def _edit_pass(self, todo: list[dict[str, Any]], batch_size: int):
        import ray

        cfg = self.config
        ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
        return bounded_pass(ds, cfg.retries, cfg.call_limits_s).map_batches(
            EditStage,
            fn_constructor_kwargs={
                "specs": self.specs,
                "dst": cfg.dst,
                "run_id": self.run_id,
                "device": cfg.device,
                "previews": cfg.previews,
                "metrics": cfg.metrics,
                "storage_options": cfg.storage_options,
                "decode_timeout_s": cfg.decode_timeout_s,
                "edit_timeout_s": cfg.edit_timeout_s,
                "editors": cfg.grid.editor,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            **self.resources["edit"],
        )

    def _commit_manifest(self, rows: list[dict[str, Any]]) -> None:
        self.manifest.commit_table(
            pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), [r["edit_key"] for r in rows]
        )

    def remove_tmp(self) -> None:
        """What this run left under ``_tmp/`` of its tables (parts and outputs it never committed)."""
        for table in EDIT_TABLES:
            self.store.remove_tmp(table, self.run_id)

    def write_record(self) -> str | None:
        """``DST/runs/edit-<run_id>.json``; its URI, or None when the write failed (reported in
        ``summary.bookkeeping_errors``)."""
        name = f"edit-{self.run_id}"
        record = {
            "run_id": self.run_id,
            "kind": "edit",
            "config": self.config.as_dict(),
            "summary": self.summary.as_dict(),
        }
        uri = self.store.uri(self.store.path(RUNS_DIR, f"{name}.json"))
        return bookkeeping(
            self.summary.bookkeeping_errors,
            f"the run record {uri}",
            lambda: write_run_record(self.store, name, record),
        )


def run_edit(config: EditJobConfig) -> EditSummary:
    """Mass-edit ``config.src`` (or ``config.clips``) into ``config.dst``; see `pipelines.edit`.
    `pipelines.lease.LeaseHeldError` when another driver holds DST's lease past ``config.lease_wait_s``."""
    from gen1.models import check_editor_weights, check_weights

    config.load_prompts()
    specs = load_model_specs(config.models)
    gen1_parts = ("vae", "unet", "prior") if "gen1" in config.grid.editor else ()
    check_weights(specs, gen1_parts + ("clip", "depth") + (("caption",) if config.auto_prompts else ()))
    check_editor_weights(specs, config.grid.editor, config.editor_weights)
    run_id = new_run_id()
    logger.info("edit %s -> %s, run %s, models %s", config.src or "<injected clips>", config.dst, run_id,
                specs.label())
    logger.debug("config: %s", json.dumps(config.as_dict(), default=str))  # -v; the run record keeps it
    if specs.is_tiny:
        logger.warning("tiny random models: the outputs are plumbing checks, not real edits")
    store = TableStore(config.dst, config.storage_options)
    with hold_dst(store, "edit", run_id, config, EDIT_TABLES) as lease:
        run = EditRun(config, specs, run_id, lease)
        _run(run)
    logger.info("%s", run.summary.line())
    return run.summary


def _run(run: EditRun) -> None:
    """The passes of ``run``, under DST's lease, then its run record."""
    import ray

    config, specs, summary = run.config, run.specs, run.summary
    size = config.size or (specs.width, specs.height)
    frames = config.frames or specs.frames
    t0 = time.monotonic()
    started = init_ray(config.ray_address, config.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = config.progress
        run.size_pools()
        clips = run.plan_clips(size, frames)
        summary.clips = len(clips)
        if config.auto_prompts:
            run.write_prompts(clips)
        prompts_for = run.prompts_for(clips)
        unprompted = [c.clip_id for c in clips if not prompts_for.get(c.clip_id)]
        if unprompted:
            logger.warning(
                "%d clips have no prompts and are not edited (first: %s)", len(unprompted), unprompted[0]
            )
        tasks = plan_tasks(clips, prompts_for, config.grid, config.steps, config.sampler, specs, config.editor_weights)
        todo = rows_not_in(tasks, "edit_key", run.manifest.committed)  # from the manifest's key index
        summary.tasks, summary.skipped = len(tasks), len(tasks) - len(todo)
        logger.info(
            "%d clips -> %d edits: %d to do, %d already in %s",
            len(clips),
            len(tasks),
            len(todo),
            summary.skipped,
            config.dst,
        )
        if todo:
            run.run_edits(todo)
    finally:
        summary.seconds = time.monotonic() - t0
        run.remove_tmp()
        if started:
            ray.shutdown()
    if run.lease is not None:
        run.lease.check()  # the run record is DST's too: written only while this run holds it
    run.write_record()
