"""The evaluation driver: `run_eval` takes the lease of ``OUT/<run_name>`` (`pipelines.lease`), opens the run's
MLflow run (`pipelines.evaluate.report.eval_run`), edits a dataset with our model (the edit pipeline, under the
lease of ``OUT/<run_name>/edits``) and the baselines (`BaselineStage`), or takes an edit job's manifest
(`evaluate_edits`), measures every output on an actor pool, assembles the per-video table, records failed
videos in ``OUT/<run_name>/errors/`` and hands the rest to `pipelines.evaluate.report.log_run`. Ray Data's
progress (bars on a terminal, log lines otherwise) shows by default (``progress``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import pickle
import posixpath
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gen1.config import ConfigError, ModelSpecs, load_model_specs
from gen1.prompts import PromptSpec
from pipelines.commits import Committer
from pipelines.datasets import SequenceClip, read_dataset
from pipelines.edit import EditJobConfig, baseline_key, model_key, read_manifest, run_edit
from pipelines.evaluate.config import EDITOR_BASELINES, METRICS, EvalConfig
from pipelines.evaluate.report import EvalSummary, eval_run, join_uri, log_run
from pipelines.evaluate.stages import BaselineStage, MetricsStage, text_prompt
from pipelines.failures import (
    LOST_STAGE,
    STATUS_OK,
    WorkerLost,
    error_record,
    mark_failed,
    with_error_columns,
)
from pipelines.lease import Lease, hold_dst
from pipelines.runtime import (
    ActorPool,
    actor_pool,
    bounded_pass,
    cluster_resources,
    init_ray,
    new_run_id,
    plan_resources,
)
from pipelines.schema import ERRORS_DIR, TableStore

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    "video", "clip_id", "method", "setting", "prompt", "image_uri", "prompt_tag", "caption", "t_s", "w", "w_t", "sdedit_strength",
    "seed", "steps", "sampler", "masked", "num_frames", "width", "height", "fps", "output_uri", "preview_uri",
    "source_uri", "start", "stride", "frame_indices", *METRICS, "seconds",
)
# What a baseline task takes over from the manifest row of our model's edit it mirrors.
BASELINE_ROW_COLUMNS = (
    "clip_id", "source_uri", "start", "stride", "frame_indices", "num_frames", "width", "height", "fps", "caption",
    "prompt", "image_uri", "prompt_tag", "masked", "w", "seed", "steps", "sampler",
)


# ------------------------------------------------------------------------------------------------ table


def setting_label(method: str, t_s: int | None, w: float, w_t: float | None, strength: float | None = None,
                  controlnet_scale: float | None = None) -> str:
    """What varies within a method: ``ts3-w7.5-wt1.5`` (gen1: t_s, w, w_t; ``-wt0`` is eq. 8 with w_t = 0),
    ``ts3-w7.5`` (per_frame: t_s, w), ``s0.6-w7.5`` (sdedit, no_structure: strength, w); the editors
    (`gen1.editors`): the settings they take, e.g. ``s0.8-cn1-w7.5`` (animatediff-depth), ``cn1-w7.5``
    (wan-vace)."""
    if method in EDITOR_BASELINES:
        parts = [] if _missing(strength) else [f"s{strength:g}"]
        parts += [] if _missing(controlnet_scale) else [f"cn{controlnet_scale:g}"]
        return "-".join([*parts, f"w{w:g}"])
    if method in ("sdedit", "no_structure"):
        return f"s{strength:g}-w{w:g}"
    if method == "per_frame":
        return f"ts{int(t_s)}-w{w:g}"
    return f"ts{int(t_s)}-w{w:g}-wt{w_t:g}"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def per_video_table(measured: pd.DataFrame) -> pd.DataFrame:
    """Measured rows -> the per-video table (TABLE_COLUMNS), sorted by video, method, setting."""
    if measured.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    df = measured.copy()
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = None
    # a row without a method is an edit-manifest row: our model's, whatever its w_t
    df["method"] = [m if isinstance(m, str) and m else "gen1" for m in df["method"]]
    cn = df["controlnet_scale"] if "controlnet_scale" in df else [None] * len(df)
    df["setting"] = [setting_label(m, t, w, wt, s, c) for m, t, w, wt, s, c in
                     zip(df["method"], df["t_s"], df["w"], df["w_t"], df["sdedit_strength"], cn, strict=True)]
    df["video"] = [posixpath.basename(str(u).rstrip("/")) for u in df["source_uri"]]
    for m in METRICS:
        df[m] = pd.to_numeric(df[m], errors="coerce")
    df = df[list(TABLE_COLUMNS)].sort_values(["video", "method", "setting", "prompt"], kind="stable")
    return df.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ clips


def dataset_clips(cfg: EvalConfig, specs: ModelSpecs) -> list[SequenceClip]:
    """The dataset's sequences as `pipelines.datasets.SequenceClip`s (first frames, with masks if asked)."""
    kind = cfg.dataset.split(":", 1)[0]
    kwargs: dict[str, Any] = {"limit": cfg.limit, "storage_options": cfg.storage_options}
    if kind == "davis":
        kwargs.update(split=cfg.split, sequences=cfg.sequences)
    sequences = read_dataset(cfg.dataset, **kwargs)
    if kind == "tgve" and cfg.sequences is not None:
        sequences = [s for s in sequences if s.name in set(cfg.sequences)]
    frames = cfg.frames or specs.frames
    size = cfg.size or (specs.width, specs.height)
    clips = []
    for seq in sequences:
        prompts = None
        if seq.prompts:
            kinds = cfg.prompt_kinds or tuple(seq.prompts)
            prompts = [PromptSpec(text=seq.prompts[k], tag=k) for k in kinds if k in seq.prompts]
        elif cfg.prompts:
            prompts = [PromptSpec.parse(p) for p in cfg.prompts]
        mask_objects = None
        if cfg.mask != "none":
            if not seq.has_masks:
                log.warning("%s: no object masks; edited unmasked", seq.name)
            else:
                mask_objects = ()
        clips.append(
            SequenceClip.from_sequence(
                seq, frames, size, stride=cfg.stride, mask_objects=mask_objects,
                invert_mask=cfg.mask == "background", prompts=prompts, storage_options=cfg.storage_options,
            )
        )
    log.info("%s: %d sequences -> %d clips of %d frames", cfg.dataset, len(sequences), len(clips), frames)
    return clips


# ------------------------------------------------------------------------------------------------ passes


def _actor_args(cfg: EvalConfig, name: str, concurrency: int) -> dict[str, Any]:
    """``map_batches`` arguments of one model-actor pool (`pipelines.runtime.plan_resources`). The eval's
    passes run no CPU tasks beside their actors (the rows are in memory), so none are reserved."""
    pool = ActorPool(name, concurrency, min(cfg.num_gpus, cluster_resources()[1]))
    return {**actor_pool(cfg.retries, concurrency), **plan_resources([pool], cfg.actor_num_cpus, task_num_cpus=0.0)[name]}


def _with_lost(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], what: str) -> pd.DataFrame:
    """The rows a pass returned, plus an error row (`WorkerLost`) for each input it lost with its actor."""
    back = {r["edit_key"] for r in outputs}
    lost = [{k: v for k, v in r.items() if k != "clip"} for r in inputs if r["edit_key"] not in back]
    for row in lost:
        mark_failed(with_error_columns(row), LOST_STAGE, WorkerLost(f"{what} of {row['edit_key']}"))
    return pd.DataFrame(outputs + lost)


def _run_ours(cfg: EvalConfig, clips: list[SequenceClip], edits_dir: str, bookkeeping_errors: list[str]) -> pd.DataFrame:
    """Our model over the grid through the edit pipeline; returns its manifest rows. The edit job's failed
    bookkeeping writes are added to ``bookkeeping_errors``."""
    edit_cfg = EditJobConfig(
        dst=edits_dir, clips=clips, models=cfg.models, grid=cfg.edit_grid(), steps=cfg.steps, sampler=cfg.sampler,
        prompts=tuple(PromptSpec.parse(p) for p in cfg.prompts), auto_prompts=0 if cfg.prompts else cfg.auto_prompts,
        metrics=False, previews=True, edit_concurrency=cfg.edit_concurrency, device=cfg.device,
        actor_num_cpus=cfg.actor_num_cpus, progress=cfg.progress, storage_options=cfg.storage_options,
        max_failure_fraction=1.0, retries=cfg.retries, lease_ttl_s=cfg.lease_ttl_s, lease_wait_s=cfg.lease_wait_s,
        tmp_max_age_s=cfg.tmp_max_age_s,
    )
    summary = run_edit(edit_cfg)
    log.info("%s", summary.line())
    bookkeeping_errors.extend(summary.bookkeeping_errors)
    return read_manifest(edits_dir, cfg.storage_options).to_pandas()


def baseline_tasks(cfg: EvalConfig, specs: ModelSpecs, clips: list[SequenceClip], ours: pd.DataFrame) -> list[dict]:
    """One task per method of ``cfg.baselines`` and (clip, prompt, w, seed) that our model edited (and t_s,
    for the per-frame baseline), keyed by `baseline_key`: the same key on a rerun."""
    by_id = {c.clip_id: c for c in clips}
    blobs: dict[str, bytes] = {}
    models = model_key(specs)
    tasks: dict[str, dict[str, Any]] = {}
    for row in ours.to_dict("records"):
        clip = by_id.get(row["clip_id"])
        if clip is None:
            continue
        content = text_prompt(row) or f"image:{row['image_uri']}"
        for method in cfg.image_baselines:
            t_s = int(row["t_s"]) if method == "per_frame" else None  # the SDEdit-style methods have no structure
            strength = None if method == "per_frame" else cfg.sdedit_strength
            key = baseline_key(method, row["clip_id"], content, row["w"], row["seed"], row["steps"], row["sampler"],
                               models, (clip.width, clip.height), clip.mask_key, t_s=t_s, strength=strength)
            if key not in tasks:
                blob = blobs.setdefault(clip.clip_id, pickle.dumps(clip))
                tasks[key] = {
                    **{k: row[k] for k in BASELINE_ROW_COLUMNS}, "frame_indices": list(row["frame_indices"]),
                    "method": method, "edit_key": key, "clip": blob, "t_s": t_s, "w_t": None,
                    "sdedit_strength": strength, "preview_uri": None,
                }
    return list(tasks.values())


def _run_baselines(cfg: EvalConfig, specs: ModelSpecs, tasks: list[dict], out_dir: str) -> pd.DataFrame:
    """The baseline ``tasks`` (every method) on one actor pool."""
    import ray

    counts = {m: sum(t["method"] == m for t in tasks) for m in cfg.image_baselines}
    log.info("baselines: %s edits (SDEdit strength %.2f)", counts, cfg.sdedit_strength)
    ds = bounded_pass(ray.data.from_items(tasks, override_num_blocks=len(tasks)), cfg.retries)
    ds = ds.map_batches(
        BaselineStage,
        fn_constructor_kwargs={"specs": specs, "out": out_dir, "device": cfg.device,
                               "storage_options": cfg.storage_options},
        batch_size=1, batch_format="pandas", **_actor_args(cfg, "baselines", cfg.baseline_concurrency),
    )
    return _with_lost(tasks, ds.take_all(), "baseline")


def _measure(cfg: EvalConfig, specs: ModelSpecs, rows: list[dict[str, Any]]) -> pd.DataFrame:
    import ray

    if not rows:
        return pd.DataFrame()
    n = max(1, math.ceil(len(rows) / cfg.metrics_batch_size))
    ds = bounded_pass(ray.data.from_items(rows, override_num_blocks=n), cfg.retries).map_batches(
        MetricsStage,
        fn_constructor_kwargs={"specs": specs, "device": cfg.device, "storage_options": cfg.storage_options},
        batch_size=cfg.metrics_batch_size, batch_format="pandas",
        **_actor_args(cfg, "metrics", cfg.metrics_concurrency),
    )
    return _with_lost(rows, ds.take_all(), "metrics")


def _outputs(cfg: EvalConfig, specs: ModelSpecs, run_dir: str, bookkeeping_errors: list[str]) -> list[dict[str, Any]]:
    """The rows to measure: our model's and the baselines' outputs of the dataset, or the manifest of
    ``cfg.edits``; every row carries its input clip (pickled, or None) and the error columns. Failed
    bookkeeping writes of the edit job go to ``bookkeeping_errors``."""
    if cfg.dataset:
        clips = dataset_clips(cfg, specs)
        if not clips:
            raise ConfigError(f"{cfg.dataset}: no sequences selected")
        ours = _run_ours(cfg, clips, join_uri(run_dir, "edits"), bookkeeping_errors)
        by_id = {c.clip_id: pickle.dumps(c) for c in clips}
        rows = [{**r, "clip": by_id.get(r["clip_id"]), **_method(r)} for r in ours.to_dict("records")]
        gen1 = pd.Series([_method(r)["method"] == "gen1" for r in ours.to_dict("records")], index=ours.index, dtype=bool)
        tasks = baseline_tasks(cfg, specs, clips, ours[gen1])  # they mirror our model's edits only
        if tasks:
            done = _run_baselines(cfg, specs, tasks, join_uri(run_dir, "baselines"))
            rows += [{**r, "clip": by_id.get(r["clip_id"])} for r in done.to_dict("records")]
    else:
        ours = read_manifest(cfg.edits, cfg.storage_options).to_pandas()
        if ours.empty:
            raise ConfigError(f"{cfg.edits}: no edit manifest rows to evaluate")
        rows = [{**r, "clip": None, **_method(r)} for r in ours.to_dict("records")]
    return [with_error_columns(r) for r in _plain(rows)]


def _method(row: Mapping[str, Any]) -> dict[str, Any]:
    """An edit-manifest row's method (its editor; gen1 for rows written before editors were pluggable) and
    SDEdit strength (the editors': their ``strength``)."""
    editor = row.get("editor") or "gen1"
    if not isinstance(editor, str) or editor == "gen1":
        return {"method": "gen1", "sdedit_strength": None}
    strength = row.get("strength")
    return {"method": editor, "sdedit_strength": None if _missing(strength) else float(strength)}


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with numpy / pandas values turned into plain Python (Ray Data's from_items needs uniform types)."""
    out = []
    for r in rows:
        clean = {}
        for k, v in r.items():
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, (pd.Timestamp, dt.datetime)):
                v = str(v)
            elif isinstance(v, float) and math.isnan(v):
                v = None
            elif v is pd.NaT:
                v = None
            clean[k] = v
        out.append(clean)
    return out


def _commit_errors(store: TableStore, lease: Lease, failed: pd.DataFrame) -> list[dict[str, Any]]:
    """The failed rows as error records, committed to ``run_dir/errors/`` (ERRORS_SCHEMA) under the run's
    lease of ``run_dir`` (``store``)."""
    records: list[dict[str, Any]] = [
        {**error_record(r), "message": f"edit {r['edit_key']}: {r['error_message']}"}
        for r in failed.to_dict("records")
    ]
    if records:
        committer = Committer(store, ERRORS_DIR, lease.owner.run_id, key=None, lease=lease)
        committer.commit_errors(records)
        log.warning("%d videos failed; their errors are in %s", len(records), join_uri(store.dst, ERRORS_DIR))
    return records


def _split(measured: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured rows, failed rows)."""
    if measured.empty:
        return measured, measured
    ok = measured["status"] == STATUS_OK
    return measured[ok], measured[~ok]


# ------------------------------------------------------------------------------------------------ driver


def _measured(cfg: EvalConfig, specs: ModelSpecs, run_dir: str, bookkeeping_errors: list[str]) -> pd.DataFrame:
    """Every output edited (dataset) or read (``--edits``) and measured on Ray: rows with a status column."""
    import ray

    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        return _measure(cfg, specs, _outputs(cfg, specs, run_dir, bookkeeping_errors))
    finally:
        if started:
            ray.shutdown()


def run_eval(cfg: EvalConfig) -> EvalSummary:
    """Edit ``cfg.dataset`` with our model and the baselines (or take ``cfg.edits``), measure, log to MLflow."""
    from gen1.models import check_editor_weights, check_weights

    specs = load_model_specs(cfg.models)
    check_weights(specs, ("vae", "unet", "clip", "depth", "prior"))
    check_editor_weights(specs, cfg.editors)
    kind = (cfg.dataset or "edits:").split(":", 1)[0]
    run_name = cfg.run_name or f"eval-{kind}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    run_dir = join_uri(cfg.out, run_name)
    log.info("eval %s -> %s, models %s", cfg.dataset or cfg.edits, run_dir, specs.label())
    log.debug("config: %s", json.dumps(cfg.as_dict(), default=str))  # -v; the MLflow run keeps it
    if specs.is_tiny:
        log.warning("tiny random models: the numbers are plumbing checks, not results")
    t0 = time.monotonic()
    store = TableStore(run_dir, cfg.storage_options)
    bookkeeping_errors: list[str] = []
    with hold_dst(store, "eval", new_run_id(), cfg, (ERRORS_DIR,)) as lease, \
            eval_run(cfg, specs, run_name, run_dir) as summary:
        measured, failed = _split(_measured(cfg, specs, run_dir, bookkeeping_errors))
        errors = _commit_errors(store, lease, failed)
        log_run(cfg, specs, per_video_table(measured), summary, errors, seconds=time.monotonic() - t0)
    summary.bookkeeping_errors = bookkeeping_errors
    summary.seconds = time.monotonic() - t0
    log.info("%s", summary.line())
    return summary


def evaluate_edits(edits: str, out: str, models: str = "tiny", **kwargs: Any) -> EvalSummary:
    """Measure and log the edits of an earlier `gen1 edit` job under ``edits`` (its DST)."""
    return run_eval(EvalConfig(edits=edits, out=out, models=models, baselines=(), **kwargs))
