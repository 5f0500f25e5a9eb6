"""Evaluation: edit a dataset with our video model and two baselines, measure, and log to MLflow.

`run_eval` (``gen1 eval --dataset davis:URI``)::

    read_dataset (driver: DAVIS / TGVE sequences) -> SequenceClips (with object masks if asked)
      -> pipelines.edit.run_edit over the grid   t_s x w x w_t (ours)  +  w_t = 0 (per-frame baseline)
      -> SDEditStage (actor pool: per-frame SDEdit, gen1.baselines)  on the same clips and prompts
      -> MetricsStage (actor pool: CLIP + depth, batched)  on every output video
      -> per-video table (Parquet under OUT/<run>/) -> MLflow run: params, metrics, table, plots, samples

`evaluate_edits` (``gen1 eval --edits DST``, and `gen1 demo`) runs only the last two steps over the manifest
of an earlier `gen1 edit` job.

Methods in the table: ``gen1`` (our video model, every w_t != 0 of the grid), ``per_frame`` (eq. 8 with
w_t = 0: the image model applied to each frame, structure kept) and ``sdedit`` (per-frame SDEdit, no
structure conditioning). Metrics (`gen1.metrics`), measured on the written videos for every method alike:
``frame_consistency`` (consecutive frames, the paper's), ``frame_consistency_all_pairs`` (TGVE's),
``prompt_consistency``, ``flow_warp_error`` (Fig. 4; also of the input, for reference) and
``depth_fidelity``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import pickle
import posixpath
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gen1.config import ConfigError, ModelSpecs, config_from_mapping, load_model_specs, read_yaml_mapping
from gen1.video import read_image
from pipelines.datasets import read_dataset
from pipelines.regression import GateConfig

log = logging.getLogger(__name__)

METHODS = ("gen1", "per_frame", "sdedit")
BASELINES = ("per_frame", "sdedit")
METRICS = (
    "frame_consistency",
    "frame_consistency_all_pairs",
    "prompt_consistency",
    "flow_warp_error",
    "input_flow_warp_error",
    "depth_fidelity",
)
MASK_MODES = ("none", "objects", "background")
TABLE_FILE = "per_video.parquet"


# --------------------------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    """One evaluation run. Loadable from YAML (`from_yaml`, also the ``config:`` section of a job spec in
    ``jobs/specs/``); printed at start and logged to MLflow as params."""

    dataset: str | None = None  # "davis:URI" | "tgve:URI"
    edits: str | None = None  # or: the DST of an earlier `gen1 edit` job: evaluate its manifest only
    out: str = "gen1-eval"  # results: OUT/<run_name>/{edits, sdedit, per_video.parquet, samples}
    models: str = "tiny"
    grid: dict[str, list] = field(default_factory=lambda: {"t_s": [3], "w": [7.5], "w_t": [1.0, 1.5], "seeds": [0]})
    baselines: tuple[str, ...] = BASELINES
    sdedit_strength: float = 0.6
    steps: int = 50
    sampler: str = "ddim"
    # dataset selection and clips
    split: str | None = None  # DAVIS ImageSets split (train | val)
    sequences: tuple[str, ...] | None = None
    limit: int | None = None  # first N sequences
    frames: int | None = None  # frames per clip (None: the model's window)
    stride: int = 2  # source frames between edited frames (shrinks for short sequences)
    size: tuple[int, int] | None = None  # (w, h) edit size (None: the model's)
    mask: str = "none"  # none | objects (edit the annotated objects) | background (edit the rest)
    # prompts: TGVE brings its own; DAVIS uses these, else captions -> auto_prompts prompts
    prompts: tuple[str, ...] = ()
    auto_prompts: int = 1
    prompt_kinds: tuple[str, ...] | None = None  # TGVE: keep only these kinds (style, object, background, multiple)
    # tracking
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under OUT
    experiment: str = "gen1-eval"
    run_name: str | None = None  # None: eval-<dataset kind>-<UTC time>
    sample_videos: int = 3  # side-by-side sample videos logged
    # regression gate (pipelines.regression): compare with the experiment's accepted baseline run
    gate: GateConfig | dict[str, Any] | None = None  # None: the defaults; YAML: {thresholds: {...}, ...}
    accept_baseline: bool = False  # tag this run as the accepted baseline when its gate does not fail
    # execution
    metrics_batch_size: int = 4
    metrics_concurrency: int = 1
    sdedit_concurrency: int = 1
    actor_num_cpus: float = 0.5
    num_gpus: float = 0.5  # per metrics / SDEdit actor when the cluster has GPUs
    edit_concurrency: int | None = None
    device: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    progress: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.edits is None):
            raise ConfigError("eval needs exactly one of dataset (davis:URI | tgve:URI) or edits (an edit job's DST)")
        self.baselines = tuple(self.baselines)
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ConfigError(f"baselines: expected some of {BASELINES}, found {sorted(unknown)}")
        if self.mask not in MASK_MODES:
            raise ConfigError(f"mask: expected one of {MASK_MODES}, found {self.mask!r}")
        if not 0 < self.sdedit_strength <= 1:
            raise ConfigError(f"sdedit_strength: expected a value in (0, 1], found {self.sdedit_strength}")
        self.prompts = tuple(self.prompts)
        if self.sequences is not None:
            self.sequences = tuple(self.sequences)
        if self.prompt_kinds is not None:
            self.prompt_kinds = tuple(self.prompt_kinds)
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        for name in ("steps", "stride", "metrics_batch_size", "metrics_concurrency", "sdedit_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)!r}")
        self.gate = GateConfig.from_value(self.gate)
        self.edit_grid()  # validate now, not after minutes of work

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EvalConfig:
        """Fields from a YAML mapping (or a job spec's ``config:`` section), then non-None ``overrides``."""
        data = read_yaml_mapping(path, "eval settings")
        if "entrypoint" in data:  # a job spec (jobs/specs/*.yaml): its config section
            data = data.get("config") or {}
        return config_from_mapping(cls, data, path, overrides)

    def edit_grid(self):
        """The edit pipeline's grid: ours, plus w_t = 0 when the per-frame baseline is on."""
        from pipelines.edit import EditGrid

        grid = dict(self.grid)
        grid["w_t"] = list(grid.get("w_t", [1.0]))
        if "per_frame" in self.baselines and 0.0 not in [float(v) for v in grid["w_t"]]:
            grid["w_t"].append(0.0)
        try:
            return EditGrid(**grid)
        except TypeError as e:
            raise ConfigError(f"grid: expected keys t_s, w, w_t, seeds; found {sorted(self.grid)}") from e

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d


# ---------------------------------------------------------------------------------------------- labels


def method_of(w_t: float, tag: str | None = None) -> str:
    """The method of an edit-manifest row: w_t = 0 is eq. 8's image model per frame."""
    if tag == "sdedit":
        return "sdedit"
    return "per_frame" if float(w_t) == 0.0 else "gen1"


def setting_label(method: str, t_s: int, w: float, w_t: float, strength: float | None = None) -> str:
    if method == "sdedit":
        return f"s{strength:g}-w{w:g}"
    return f"ts{int(t_s)}-w{w:g}-wt{w_t:g}"


# ------------------------------------------------------------------------------------------------ clips


def dataset_clips(cfg: EvalConfig, specs: ModelSpecs) -> list:
    """The dataset's sequences as `pipelines.datasets.SequenceClip`s (first frames, with masks if asked)."""
    from gen1.prompts import PromptSpec
    from pipelines.datasets import SequenceClip

    kind = cfg.dataset.split(":", 1)[0]
    kwargs: dict[str, Any] = {"limit": cfg.limit}
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
                invert_mask=cfg.mask == "background", prompts=prompts,
            )
        )
    log.info("%s: %d sequences -> %d clips of %d frames", cfg.dataset, len(sequences), len(clips), frames)
    return clips


def input_clip(row: Mapping[str, Any]):
    """Rebuild the input clip of a manifest row (no pickled clip at hand): a folder of frames or a video."""
    import fsspec

    from pipelines.datasets import DAVIS_FPS, SequenceClip, VideoSequence, _list_files
    from pipelines.edit import EditClip

    common = dict(
        clip_id=row["clip_id"], source_uri=row["source_uri"], start=int(row["start"]), stride=int(row["stride"]),
        frame_indices=tuple(int(i) for i in row["frame_indices"]), fps=float(row["fps"]),
        width=int(row["width"]), height=int(row["height"]),
    )
    fs, path = fsspec.core.url_to_fs(row["source_uri"])
    if fs.isdir(path):
        names = _list_files(row["source_uri"], (".jpg", ".jpeg", ".png"))
        seq = VideoSequence(
            name=posixpath.basename(row["source_uri"].rstrip("/")), dataset="frames", frames_uri=row["source_uri"],
            frame_uris=tuple(posixpath.join(row["source_uri"], n) for n in names), fps=DAVIS_FPS,
        )
        return SequenceClip(**common, sequence=seq)
    return EditClip(**common)


# ------------------------------------------------------------------------------------------------ stages


def _rows(batch) -> list[dict[str, Any]]:
    if isinstance(batch, pd.DataFrame):
        return batch.to_dict("records")
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    return pd.DataFrame(dict(batch)).to_dict("records")


def read_video(uri: str) -> np.ndarray:
    """Every frame of a written video: uint8 (f, h, w, 3)."""
    from gen1.video import probe, read_frames

    return read_frames(uri, list(range(probe(uri).num_frames)))


def sdedit_key(clip_id: str, content: str, strength: float, w: float, seed: int, steps: int, sampler: str,
               models: Mapping[str, str], size: tuple[int, int], mask: str) -> str:
    payload = ["sdedit", clip_id, content, mask, float(strength), float(w), int(seed), int(steps), sampler,
               dict(sorted(models.items())), [int(size[0]), int(size[1])]]
    return hashlib.sha1(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:20]


class SDEditStage:
    """Per-frame SDEdit (`gen1.baselines.sdedit_video`) of task rows; one `Gen1Models` per actor.

    A task row carries the pickled clip (``clip``), its prompt and settings; the output video is written to
    ``OUT/outputs/<clip_id>/<key>.mp4``. A task that fails becomes a row with ``error`` set.
    """

    def __init__(self, specs: ModelSpecs, out: str, device: str | None = None, models: Any = None):
        if models is None:
            from gen1.models import Gen1Models

            models = Gen1Models.load(specs, device=device)
        self.specs, self.models, self.out = specs, models, out
        self._clips: OrderedDict[str, tuple] = OrderedDict()

    def _load(self, row: Mapping[str, Any]):
        key = row["clip_id"]
        if key not in self._clips:
            self._clips[key] = pickle.loads(row["clip"]).load()
            while len(self._clips) > 4:
                self._clips.popitem(last=False)
        return self._clips[key]

    def __call__(self, batch) -> pd.DataFrame:
        from gen1.baselines import SDEditSettings, sdedit_video
        from gen1.sampling import Content
        from gen1.video import write_video

        out = []
        for row in _rows(batch):
            row = dict(row)
            try:
                clip = pickle.loads(row["clip"])
                frames, mask = self._load(row)
                settings = SDEditSettings(strength=float(row["sdedit_strength"]), guidance=float(row["w"]),
                                          steps=int(row["steps"]), seed=int(row["seed"]), sampler=row["sampler"])
                content = Content(text=row["prompt"]) if row.get("prompt") else Content(image=read_image(row["image_uri"]))
                result = sdedit_video(self.models, frames, content, settings, mask=mask)
                uri = posixpath.join(self.out, "outputs", row["clip_id"], f"{row['edit_key']}.mp4")
                write_video(result.frames, uri, clip.fps)
                row.update(output_uri=uri, seconds=float(result.seconds), error=None)
            except Exception as e:  # failures are data: the row says why, the job goes on
                log.exception("SDEdit of %s failed", row.get("clip_id"))
                row.update(output_uri=None, seconds=None, error=f"{type(e).__name__}: {e}")
            row.pop("clip", None)
            out.append(row)
        return pd.DataFrame(out)


class MetricsStage:
    """`gen1.metrics` of output videos, batched: one CLIP image call for every frame of the batch, one CLIP
    text call for its prompts, depth per video. Rows need ``output_uri``, ``prompt`` (or ``image_uri``)
    and the input clip (``clip`` pickled, or manifest columns to rebuild it)."""

    def __init__(self, specs: ModelSpecs, device: str | None = None, clip: Any = None, depth: Any = None):
        if clip is None:
            from gen1.clip import ClipEmbedder

            clip = ClipEmbedder(specs.clip, device=device)
        if depth is None:
            from gen1.depth import DepthEstimator

            depth = DepthEstimator(specs.depth, device=device)
        self.clip, self.depth = clip, depth
        self._inputs: OrderedDict[str, np.ndarray] = OrderedDict()

    def _input(self, row: Mapping[str, Any]) -> np.ndarray:
        key = row["clip_id"]
        if key not in self._inputs:
            clip = pickle.loads(row["clip"]) if row.get("clip") else input_clip(row)
            self._inputs[key] = clip.load_frames()
            while len(self._inputs) > 8:
                self._inputs.popitem(last=False)
        return self._inputs[key]

    def __call__(self, batch) -> pd.DataFrame:
        from gen1.metrics import (
            depth_fidelity,
            flow_warp_error,
            frame_consistency,
            frame_consistency_all_pairs,
            prompt_consistency,
        )

        rows = [dict(r) for r in _rows(batch)]
        videos: list[np.ndarray | None] = []
        for row in rows:
            try:
                videos.append(None if row.get("error") else read_video(row["output_uri"]))
            except Exception as e:
                row["error"] = f"read output: {type(e).__name__}: {e}"
                videos.append(None)
        ok = [i for i, v in enumerate(videos) if v is not None]
        if ok:
            emb = self.clip.embed_images(np.concatenate([videos[i] for i in ok])).float().cpu().numpy()
            splits = np.cumsum([len(videos[i]) for i in ok])[:-1]
            per_video = dict(zip(ok, np.split(emb, splits), strict=True))
            texts = [rows[i]["prompt"] for i in ok if rows[i].get("prompt")]
            text_emb = dict(zip(texts, self.clip.embed_texts(texts).float().cpu().numpy(), strict=True)) if texts else {}
        for i in ok:
            row, frames = rows[i], videos[i]
            try:
                source = self._input(row)
                if row.get("prompt"):
                    target = text_emb[row["prompt"]]
                else:
                    target = self.clip.embed_images(read_image(row["image_uri"])[None]).float().cpu().numpy()[0]
                e = per_video[i]
                row.update(
                    frame_consistency=frame_consistency(e),
                    frame_consistency_all_pairs=frame_consistency_all_pairs(e),
                    prompt_consistency=prompt_consistency(e, target),
                    flow_warp_error=flow_warp_error(frames),
                    input_flow_warp_error=flow_warp_error(source),
                    depth_fidelity=depth_fidelity(self.depth(source).float().cpu().numpy(),
                                                  self.depth(frames).float().cpu().numpy()),
                )
            except Exception as e:
                log.exception("metrics of %s failed", row.get("output_uri"))
                row["error"] = f"metrics: {type(e).__name__}: {e}"
        for row in rows:
            for m in METRICS:
                row.setdefault(m, None)
            row.pop("clip", None)
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class EvalSummary:
    run_name: str
    out: str
    tracking_uri: str
    run_id: str | None = None
    experiment_id: str | None = None
    videos: int = 0  # rows of the per-video table
    failed: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    table_uri: str | None = None
    artifact_uri: str | None = None
    samples: list[str] = field(default_factory=list)
    tiny_models: bool = False
    seconds: float = 0.0
    gate: dict[str, Any] = field(default_factory=dict)  # regression.GateResult.as_dict()
    gate_line: str = ""

    @property
    def regressed(self) -> bool:
        from pipelines.regression import REGRESSED

        return self.gate.get("status") == REGRESSED

    def line(self) -> str:
        tiny = " [TINY RANDOM MODELS: plumbing check, not results]" if self.tiny_models else ""
        head = ", ".join(f"{k} {self.metrics[k]:.4f}" for k in ("frame_consistency", "prompt_consistency")
                         if k in self.metrics)
        return (f"eval {self.run_name}: {self.videos} videos ({self.failed} failed; "
                f"{', '.join(f'{m} {n}' for m, n in sorted(self.by_method.items()))}) in {self.seconds:.1f}s; "
                f"{head}; MLflow run {self.run_id} at {self.tracking_uri}{tiny}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _actor_resources(cfg: EvalConfig) -> dict[str, float]:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        return {"num_gpus": min(cfg.num_gpus, gpus), "num_cpus": min(1.0, cfg.actor_num_cpus)}
    return {"num_gpus": 0.0, "num_cpus": cfg.actor_num_cpus}


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def _run_ours(cfg: EvalConfig, specs: ModelSpecs, clips: list, edits_dir: str) -> pd.DataFrame:
    """Our model and the per-frame baseline through the edit pipeline; returns its manifest rows."""
    from gen1.prompts import PromptSpec
    from pipelines.edit import EditJobConfig, read_manifest, run_edit

    edit_cfg = EditJobConfig(
        dst=edits_dir, clips=clips, models=cfg.models, grid=cfg.edit_grid(), steps=cfg.steps, sampler=cfg.sampler,
        prompts=tuple(PromptSpec.parse(p) for p in cfg.prompts), auto_prompts=0 if cfg.prompts else cfg.auto_prompts,
        metrics=False, previews=True, edit_concurrency=cfg.edit_concurrency, device=cfg.device,
        actor_num_cpus=cfg.actor_num_cpus, progress=cfg.progress, storage_options=cfg.storage_options,
        max_failure_fraction=1.0,
    )
    summary = run_edit(edit_cfg)
    log.info("%s", summary.line())
    return read_manifest(edits_dir, cfg.storage_options).to_pandas()


def _run_sdedit(cfg: EvalConfig, specs: ModelSpecs, clips: list, ours: pd.DataFrame, out_dir: str) -> pd.DataFrame:
    """SDEdit each (clip, prompt, w, seed) that our model edited, on an actor pool."""
    import ray

    from pipelines.edit import model_key

    by_id = {c.clip_id: c for c in clips}
    tasks, seen = [], set()
    for row in ours.to_dict("records"):
        clip = by_id.get(row["clip_id"])
        if clip is None:
            continue
        content = row["prompt"] if row["prompt"] else f"image:{row['image_uri']}"
        key = sdedit_key(row["clip_id"], content, cfg.sdedit_strength, row["w"], row["seed"], row["steps"],
                         row["sampler"], model_key(specs), (clip.width, clip.height), clip.mask_key)
        if key in seen:
            continue
        seen.add(key)
        tasks.append({
            "edit_key": key, "clip": pickle.dumps(clip), "clip_id": row["clip_id"], "source_uri": row["source_uri"],
            "start": row["start"], "stride": row["stride"], "frame_indices": list(row["frame_indices"]),
            "num_frames": row["num_frames"], "width": row["width"], "height": row["height"], "fps": row["fps"],
            "caption": row["caption"], "prompt": row["prompt"], "image_uri": row["image_uri"],
            "prompt_tag": row["prompt_tag"], "masked": row["masked"], "t_s": 7, "w": row["w"], "w_t": 0.0,
            "seed": row["seed"], "steps": row["steps"], "sampler": row["sampler"],
            "sdedit_strength": cfg.sdedit_strength, "preview_uri": None,
        })
    if not tasks:
        return pd.DataFrame()
    log.info("SDEdit baseline: %d edits (strength %.2f)", len(tasks), cfg.sdedit_strength)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(
        SDEditStage, fn_constructor_kwargs={"specs": specs, "out": out_dir, "device": cfg.device},
        batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.sdedit_concurrency),
        **_actor_resources(cfg),
    )
    return pd.DataFrame(ds.take_all())


def _measure(cfg: EvalConfig, specs: ModelSpecs, rows: list[dict[str, Any]]) -> pd.DataFrame:
    import ray

    if not rows:
        return pd.DataFrame()
    n = max(1, math.ceil(len(rows) / cfg.metrics_batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=n).map_batches(
        MetricsStage, fn_constructor_kwargs={"specs": specs, "device": cfg.device},
        batch_size=cfg.metrics_batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.metrics_concurrency), **_actor_resources(cfg),
    )
    return pd.DataFrame(ds.take_all())


TABLE_COLUMNS = (
    "video", "clip_id", "method", "setting", "prompt", "prompt_tag", "caption", "t_s", "w", "w_t", "sdedit_strength",
    "seed", "steps", "sampler", "masked", "num_frames", "width", "height", "fps", "output_uri", "preview_uri",
    "source_uri", "start", "stride", "frame_indices", *METRICS, "seconds", "error",
)


def per_video_table(measured: pd.DataFrame) -> pd.DataFrame:
    """Measured rows -> the per-video table (TABLE_COLUMNS), sorted by video, method, setting."""
    if measured.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    df = measured.copy()
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = None
    df["method"] = [method_of(w_t, "sdedit" if pd.notna(s) else None)
                    for w_t, s in zip(df["w_t"], df["sdedit_strength"], strict=True)]
    df["setting"] = [setting_label(m, t, w, wt, s) for m, t, w, wt, s in
                     zip(df["method"], df["t_s"], df["w"], df["w_t"], df["sdedit_strength"], strict=True)]
    df["video"] = [posixpath.basename(str(u).rstrip("/")) for u in df["source_uri"]]
    for m in METRICS:
        df[m] = pd.to_numeric(df[m], errors="coerce")
    df = df[list(TABLE_COLUMNS)].sort_values(["video", "method", "setting", "prompt"], kind="stable")
    return df.reset_index(drop=True)


def run_eval(cfg: EvalConfig) -> EvalSummary:
    """Edit ``cfg.dataset`` with our model and the baselines (or take ``cfg.edits``), measure, log to MLflow."""
    import ray

    from gen1.models import check_weights
    from pipelines.preprocess import init_ray

    specs = load_model_specs(cfg.models)
    check_weights(specs, ("vae", "unet", "clip", "depth", "prior"))
    kind = (cfg.dataset or "edits:").split(":", 1)[0]
    run_name = cfg.run_name or f"eval-{kind}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    run_dir = _join(cfg.out, run_name)
    log.info("eval %s -> %s, models %s\nconfig: %s", cfg.dataset or cfg.edits, run_dir, specs.label(),
             json.dumps(cfg.as_dict(), default=str))
    if specs.is_tiny:
        log.warning("tiny random models: the numbers are plumbing checks, not results")
    t0 = time.monotonic()
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        if cfg.dataset:
            clips = dataset_clips(cfg, specs)
            if not clips:
                raise ConfigError(f"{cfg.dataset}: no sequences selected")
            ours = _run_ours(cfg, specs, clips, _join(run_dir, "edits"))
            by_id = {c.clip_id: pickle.dumps(c) for c in clips}
            rows = [{**r, "clip": by_id.get(r["clip_id"]), "sdedit_strength": None} for r in ours.to_dict("records")]
            if "sdedit" in cfg.baselines:
                sd = _run_sdedit(cfg, specs, clips, ours, _join(run_dir, "sdedit"))
                rows += [{**r, "clip": by_id.get(r["clip_id"])} for r in sd.to_dict("records")]
        else:
            from pipelines.edit import read_manifest

            ours = read_manifest(cfg.edits, cfg.storage_options).to_pandas()
            if ours.empty:
                raise ConfigError(f"{cfg.edits}: no edit manifest rows to evaluate")
            rows = [{**r, "clip": None, "sdedit_strength": None} for r in ours.to_dict("records")]
        measured = _measure(cfg, specs, _plain(rows))
    finally:
        if started:
            ray.shutdown()
    table = per_video_table(measured)
    summary = _log_run(cfg, specs, table, run_name, run_dir)
    summary.seconds = time.monotonic() - t0
    log.info("%s", summary.line())
    return summary


def evaluate_edits(edits: str, out: str, models: str = "tiny", **kwargs: Any) -> EvalSummary:
    """Measure and log the edits of an earlier `gen1 edit` job under ``edits`` (its DST)."""
    return run_eval(EvalConfig(edits=edits, out=out, models=models, baselines=(), **kwargs))


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


# ----------------------------------------------------------------------------------------------- logging


def _log_run(cfg: EvalConfig, specs: ModelSpecs, table: pd.DataFrame, run_name: str, run_dir: str) -> EvalSummary:
    import fsspec

    from pipelines import tracking

    # the default local store: under OUT when OUT is local, else in the user's cache (never in a bucket)
    local_dir = tracking.local_path(cfg.out) if tracking.is_local(cfg.out) else Path("~/.cache/gen1/mlflow").expanduser()
    tracking_uri, artifact_location = tracking.resolve_tracking_uri(cfg.tracking_uri, local_dir)
    summary = EvalSummary(run_name=run_name, out=run_dir, tracking_uri=tracking_uri, tiny_models=specs.is_tiny)
    good = table[table["error"].isna()] if len(table) else table
    summary.videos = len(table)
    summary.failed = int(table["error"].notna().sum()) if len(table) else 0
    summary.by_method = {str(k): int(v) for k, v in good["method"].value_counts().items()} if len(good) else {}

    table_uri = _join(run_dir, TABLE_FILE)
    fs, path = fsspec.core.url_to_fs(table_uri, **cfg.storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        table.to_parquet(fh, index=False)
    summary.table_uri = table_uri

    tags = {"gen1.models": specs.label(), "gen1.tiny_models": str(specs.is_tiny).lower(),
            "gen1.dataset": cfg.dataset or f"edits:{cfg.edits}"}
    with tracking.start_run(tracking_uri, artifact_location, cfg.experiment, run_name, tags) as run:
        summary.run_id, summary.experiment_id = run.info.run_id, run.info.experiment_id
        summary.artifact_uri = run.info.artifact_uri
        tracking.log_params(_params(cfg, specs, good))
        methods = list(good["method"].unique()) if len(good) else []
        headline = "gen1" if "gen1" in methods or not methods else methods[0]
        summary.metrics = tracking.summary_metrics(good, METRICS, headline)
        summary.metrics["failed_videos"] = float(summary.failed)
        tracking.log_metrics(summary.metrics)
        tracking.log_table(table, "eval/per_video.json")
        tracking.log_text(table.to_csv(index=False), "eval/per_video.csv")
        label = specs.label()
        tracking.log_figure(consistency_scatter(good, label), "plots/frame_vs_prompt_consistency.png")
        tracking.log_figure(consistency_vs_wt(good, label), "plots/consistency_vs_wt.png")
        for sample in _samples(cfg, specs, good, run_dir):
            tracking.log_remote_file(sample, "samples")
            summary.samples.append(sample)
    _gate(cfg, summary, table)  # after the run ends: an accepted baseline must be a FINISHED run
    return summary


def _gate(cfg: EvalConfig, summary: EvalSummary, table: pd.DataFrame) -> None:
    """The regression gate of the logged run, and acceptance of the run as baseline when asked and passed."""
    from mlflow.tracking import MlflowClient

    from pipelines import regression

    result = regression.run_gate(MlflowClient(summary.tracking_uri), summary.run_id, summary.metrics, table, cfg.gate)
    summary.gate, summary.gate_line = result.as_dict(), result.line()
    if cfg.accept_baseline:
        if result.regressed:
            log.error("not accepting run %s as baseline: it regressed", summary.run_id)
        else:
            regression.accept_baseline(summary.tracking_uri, summary.run_id)


def _params(cfg: EvalConfig, specs: ModelSpecs, table: pd.DataFrame) -> dict[str, Any]:
    """Run params: the models, and the settings that produced the edits (from the grid for a dataset run,
    from the manifest rows for ``--edits``)."""

    def values(col: str) -> list:
        return sorted({v.item() if hasattr(v, "item") else v for v in table[col].dropna()}) if len(table) else []

    params: dict[str, Any] = {
        "dataset": cfg.dataset or f"edits:{cfg.edits}",
        "models": {"preset": specs.name, "label": specs.label(), "tiny": specs.is_tiny,
                   **{c: getattr(specs, c) for c in ("vae", "unet", "clip", "depth", "prior", "caption")}},
        "videos": int(table["video"].nunique()) if len(table) else 0,
        "config": json.dumps(cfg.as_dict(), default=str),
    }
    if cfg.dataset:
        grid = cfg.edit_grid()
        params.update(
            sampler=cfg.sampler, steps=cfg.steps, guidance=list(grid.w), temporal_guidance=list(grid.w_t),
            t_s=list(grid.t_s), seeds=list(grid.seeds), baselines=list(cfg.baselines),
            sdedit_strength=cfg.sdedit_strength, frames=cfg.frames or specs.frames, stride=cfg.stride,
            size=list(cfg.size or (specs.width, specs.height)), mask=cfg.mask, split=cfg.split, limit=cfg.limit,
            prompts=list(cfg.prompts) or f"auto_prompts={cfg.auto_prompts}",
        )
    else:
        ours = table[table["method"] != "sdedit"] if len(table) else table
        params.update(
            sampler=values("sampler"), steps=values("steps"), guidance=sorted({float(v) for v in values("w")}),
            temporal_guidance=sorted({float(v) for v in ours["w_t"]}) if len(ours) else [],
            t_s=values("t_s"), seeds=values("seed"), baselines=sorted(set(values("method")) - {"gen1"}),
        )
    return params


SAMPLE_ORDER = ("gen1", "per_frame", "sdedit")


def _samples(cfg: EvalConfig, specs: ModelSpecs, table: pd.DataFrame, run_dir: str) -> list[str]:
    """Up to ``cfg.sample_videos`` side-by-side videos: input | ours (first setting) | per-frame | SDEdit."""
    from gen1.preview import side_by_side
    from gen1.video import write_video

    if not len(table) or cfg.sample_videos <= 0:
        return []
    out = []
    for (clip_id, prompt), group in table.groupby(["clip_id", "prompt"], sort=True, dropna=False):
        if len(out) >= cfg.sample_videos:
            break
        try:
            first = group.iloc[0].to_dict()
            panels = [_label(input_clip(first).load_frames(), "input")]
            for method in SAMPLE_ORDER:
                rows = group[group["method"] == method]
                if len(rows):
                    row = rows.iloc[0]
                    panels.append(_label(read_video(row["output_uri"]), f"{method} {row['setting']}"))
            f = min(len(p) for p in panels)
            video = side_by_side(*[p[:f] for p in panels])
            if specs.is_tiny:
                video = _banner(video, "TINY RANDOM MODELS - not real results")
            name = f"{first['video']}-{hashlib.sha1(str(prompt).encode()).hexdigest()[:8]}.mp4"
            uri = _join(run_dir, "samples", name)
            write_video(video, uri, float(first["fps"] or 8.0))
            out.append(uri)
        except Exception:
            log.exception("sample video of %s failed", clip_id)
    return out


def _label(frames: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner of every frame (white on a dark box)."""
    import cv2

    frames = np.ascontiguousarray(frames.copy())
    scale = max(0.3, frames.shape[2] / 400)
    for frame in frames:
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(frame, (0, 0), (tw + 4, th + 6), (0, 0, 0), -1)
        cv2.putText(frame, text, (2, th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return frames


def _banner(video: np.ndarray, text: str) -> np.ndarray:
    """A red strip with ``text`` above every frame (height 16 px, a multiple of 8 for the codec)."""
    import cv2

    f, h, w, _ = video.shape
    strip = np.zeros((f, 16, w, 3), np.uint8)
    strip[..., 0] = 160
    for frame in strip:
        cv2.putText(frame, text, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, video], axis=1)


# ------------------------------------------------------------------------------------------------- plots


def _title(text: str, label: str) -> str:
    return f"{text}\n{label}"


def consistency_scatter(table: pd.DataFrame, label: str):
    """Fig. 6: frame consistency (y) against prompt consistency (x); one large marker per (method,
    setting) mean, small translucent markers per video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {"gen1": "tab:blue", "per_frame": "tab:orange", "sdedit": "tab:green"}
    for (method, setting), group in table.groupby(["method", "setting"], sort=True):
        color = colors.get(method, "tab:gray")
        ax.scatter(group["prompt_consistency"], group["frame_consistency"], s=10, alpha=0.3, color=color)
        ax.scatter(group["prompt_consistency"].mean(), group["frame_consistency"].mean(), s=70, color=color,
                   edgecolor="black", label=f"{method} {setting}")
    ax.set_xlabel("prompt consistency (CLIP text-image cosine)")
    ax.set_ylabel("frame consistency (consecutive CLIP cosine)")
    ax.set_title(_title("Frame vs prompt consistency (Fig. 6)", label), fontsize=9)
    if len(table):
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def consistency_vs_wt(table: pd.DataFrame, label: str):
    """Fig. 4: frame consistency and flow-warped MSE against temporal guidance w_t (w_t = 0 is the
    per-frame image model), averaged over videos and the other settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = table[table["method"].isin(["gen1", "per_frame"])] if len(table) else table
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(ours):
        means = ours.groupby("w_t", sort=True)[["frame_consistency", "flow_warp_error"]].mean()
        ax.plot(means.index, means["frame_consistency"], "o-", color="tab:blue", label="frame consistency")
        ax2 = ax.twinx()
        ax2.plot(means.index, means["flow_warp_error"], "s--", color="tab:red", label="flow-warped MSE")
        ax2.set_ylabel("flow-warped MSE between consecutive frames", color="tab:red")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")
    ax.set_xlabel("temporal guidance w_t (0 = image model per frame)")
    ax.set_ylabel("frame consistency", color="tab:blue")
    ax.set_title(_title("Consistency vs temporal guidance (Fig. 4)", label), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
