"""What an evaluation reports: the MLflow run (`pipelines.tracking`), the regression gate's verdict, and the
`EvalSummary` that `run_eval` returns.

`eval_run` opens the MLflow run before the evaluation starts (its config as ``config.yaml``, system metrics
sampled while it runs) and ends it after the last artifact, so the run's duration is the evaluation's;
`log_run` logs into it: params, metrics, the evaluated clips as the run's input dataset (``eval``), the
per-video table (``eval/per_video.json``, a table in the UI's Artifacts tab, and ``.csv``), plots, sample
videos, the regression gate's tags and the summary line as the run's description. Acceptance as the
baseline (``accept_baseline``) waits for the run to end: a baseline must be a FINISHED run.

Written under the run directory ``OUT/<run_name>/``: ``per_video.parquet`` (the per-video table),
``samples/`` (side-by-side videos); `pipelines.evaluate.run` adds ``errors/`` (failed videos).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gen1.config import ModelSpecs
from gen1.urls import redact_url
from pipelines import regression, tracking
from pipelines.evaluate.config import METHODS, METRICS, EvalConfig
from pipelines.evaluate.stages import input_clip, read_video

log = logging.getLogger(__name__)

TABLE_FILE = "per_video.parquet"
CLIP_COLUMNS = ("clip_id", "video", "source_uri", "start", "stride", "num_frames", "width", "height", "fps")
METHOD_COLORS = {"gen1": "tab:blue", "per_frame": "tab:orange", "sdedit": "tab:green", "no_structure": "tab:purple",
                 "sd-depth": "tab:red", "animatediff-depth": "tab:brown", "wan-vace": "tab:cyan"}


def join_uri(base: str, *parts: str) -> str:
    """``parts`` joined onto a URI or path (its protocol untouched)."""
    return posixpath.join(base.rstrip("/"), *parts)


@dataclass
class EvalSummary:
    run_name: str
    out: str
    tracking_uri: str
    run_id: str | None = None
    experiment_id: str | None = None
    videos: int = 0  # videos measured or failed: rows of the per-video table + failed
    failed: int = 0  # rows of OUT/<run_name>/errors/
    by_method: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    table_uri: str | None = None
    artifact_uri: str | None = None
    samples: list[str] = field(default_factory=list)
    tiny_models: bool = False
    seconds: float = 0.0
    gate: dict[str, Any] = field(default_factory=dict)  # regression.GateResult.as_dict()
    gate_line: str = ""
    # writes after the results were committed that failed (the edit job's run record): exit code 6
    bookkeeping_errors: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.gate.get("status") == regression.REGRESSED

    @property
    def failure_fraction(self) -> float:
        """Failed over all videos of the dataset (each eval run edits all of them); 1.0 when there are none."""
        return self.failed / self.videos if self.videos else 1.0

    def line(self) -> str:
        tiny = " [TINY RANDOM MODELS: plumbing check, not results]" if self.tiny_models else ""
        head = ", ".join(f"{k} {self.metrics[k]:.4f}" for k in ("frame_consistency", "prompt_consistency")
                         if k in self.metrics)
        return (f"eval {self.run_name}: {self.videos} videos ({self.failed} failed; "
                f"{', '.join(f'{m} {n}' for m, n in sorted(self.by_method.items()))}) in {self.seconds:.1f}s; "
                f"{head}; MLflow run {self.run_id} at {redact_url(self.tracking_uri)}{tiny}")

    def as_dict(self) -> dict[str, Any]:
        """For the job's JSON output and records: the tracking URI redacted, the failed fraction added."""
        return {**dataclasses.asdict(self), "tracking_uri": redact_url(self.tracking_uri),
                "failure_fraction": self.failure_fraction}


@contextlib.contextmanager
def eval_run(cfg: EvalConfig, specs: ModelSpecs, run_name: str, run_dir: str) -> Iterator[EvalSummary]:
    """The MLflow run of one evaluation, open for the block (the evaluation): yields the `EvalSummary` that
    `log_run` fills. The run ends FAILED when the block raises; a run that `log_run` gated is accepted as the
    experiment's baseline after it ends, when ``cfg.accept_baseline`` asks and it did not regress."""
    # the default local store: under OUT when OUT is local, else in the user's cache (never in a bucket)
    local_dir = tracking.local_path(cfg.out) if tracking.is_local(cfg.out) else Path("~/.cache/gen1/mlflow").expanduser()
    tracking_uri, artifact_location = tracking.resolve_tracking_uri(cfg.tracking_uri, local_dir)
    summary = EvalSummary(run_name=run_name, out=run_dir, tracking_uri=tracking_uri, tiny_models=specs.is_tiny)
    what = cfg.dataset or f"edits:{cfg.edits}"
    tags = {"gen1.models": specs.label(), "gen1.tiny_models": str(specs.is_tiny).lower(), "gen1.dataset": what}
    description = f"eval {run_name}: {redact_url(what)} with models {specs.label()} (running)"
    with tracking.start_run(tracking_uri, artifact_location, cfg.experiment, run_name, tags, description) as run:
        summary.run_id, summary.experiment_id = run.info.run_id, run.info.experiment_id
        summary.artifact_uri = run.info.artifact_uri
        tracking.log_config(cfg.as_dict())
        yield summary
    if cfg.accept_baseline and summary.gate:
        if summary.regressed:
            log.error("not accepting run %s as baseline: it regressed", summary.run_id)
        else:
            regression.accept_baseline(summary.tracking_uri, summary.run_id)


def log_run(cfg: EvalConfig, specs: ModelSpecs, table: pd.DataFrame, summary: EvalSummary,
            errors: Sequence[Mapping[str, Any]] = (), seconds: float = 0.0) -> None:
    """Write the per-video ``table`` (measured videos) under the run directory and log it, the evaluated clips,
    metrics, plots and samples into the open run of `eval_run` (``summary``), gate it, and describe it with
    the summary line (``seconds``: the evaluation's so far); ``errors``: the error records of the videos that
    failed (logged as ``eval/errors.json``)."""
    import fsspec

    summary.failed = len(errors)
    summary.videos = len(table) + summary.failed
    summary.by_method = {str(k): int(v) for k, v in table["method"].value_counts().items()} if len(table) else {}

    table_uri = join_uri(summary.out, TABLE_FILE)
    fs, path = fsspec.core.url_to_fs(table_uri, **cfg.storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        table.to_parquet(fh, index=False)
    summary.table_uri = table_uri

    tracking.log_params(_params(cfg, specs, table))
    name, source = dataset_name(cfg)
    tracking.log_dataset(clip_table(table, errors), name, source, context="eval")
    methods = list(table["method"].unique()) if len(table) else []
    headline = "gen1" if "gen1" in methods or not methods else methods[0]
    summary.metrics = tracking.summary_metrics(table, METRICS, headline)
    summary.metrics["failed_videos"] = float(summary.failed)
    tracking.log_metrics(summary.metrics)
    tracking.log_table(table, regression.TABLE_ARTIFACT)
    tracking.log_text(table.to_csv(index=False), "eval/per_video.csv")
    if errors:
        tracking.log_table(pd.DataFrame(list(errors)), "eval/errors.json")
    label = specs.label()
    tracking.log_figure(consistency_scatter(table, label), "plots/frame_vs_prompt_consistency.png")
    tracking.log_figure(consistency_vs_wt(table, label), "plots/consistency_vs_wt.png")
    for sample in _samples(cfg, specs, table, summary.out):
        tracking.log_remote_file(sample, "samples", cfg.storage_options)
        summary.samples.append(sample)
    _gate(cfg, summary, table)
    summary.seconds = seconds
    tracking.describe(f"{summary.line()}\n\n{summary.gate_line}")


def dataset_name(cfg: EvalConfig) -> tuple[str, str]:
    """(name, source URI) of what an eval evaluates: ``davis:DAVIS`` and the dataset's root, or
    ``edits:<DST name>`` and the edit job's DST."""
    kind, uri = cfg.dataset.split(":", 1) if cfg.dataset else ("edits", cfg.edits)
    return f"{kind}:{posixpath.basename(uri.rstrip('/')) or uri}", uri


def clip_table(table: pd.DataFrame, errors: Sequence[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """The evaluated clips, one row each (CLIP_COLUMNS, then ``outputs``: rows of the per-video ``table``,
    ``failed``: outputs that failed, from their error records ``errors``), sorted by clip id."""
    clips: dict[str, dict[str, Any]] = {}
    for row in table.to_dict("records"):
        clip = clips.setdefault(row["clip_id"], {**{c: row[c] for c in CLIP_COLUMNS}, "outputs": 0, "failed": 0})
        clip["outputs"] += 1
    for error in errors:
        uri = error["uri"]
        clip = clips.setdefault(error["clip_id"], {
            **dict.fromkeys(CLIP_COLUMNS), "clip_id": error["clip_id"], "source_uri": uri, "start": error["start"],
            "video": posixpath.basename(str(uri).rstrip("/")), "outputs": 0, "failed": 0})
        clip["failed"] += 1
    return pd.DataFrame([clips[k] for k in sorted(clips)], columns=[*CLIP_COLUMNS, "outputs", "failed"])


def _gate(cfg: EvalConfig, summary: EvalSummary, table: pd.DataFrame) -> None:
    """The regression gate of the logged run: its verdict as tags (and, when it regressed, the worst videos)."""
    result = regression.run_gate(tracking.client(summary.tracking_uri), summary.run_id, summary.metrics, table, cfg.gate)
    summary.gate, summary.gate_line = result.as_dict(), result.line()


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
        ours = table[table["method"] == "gen1"] if len(table) else table
        params.update(
            sampler=values("sampler"), steps=values("steps"), guidance=sorted({float(v) for v in values("w")}),
            temporal_guidance=sorted({float(v) for v in ours["w_t"]}) if len(ours) else [],
            t_s=values("t_s"), seeds=values("seed"), baselines=sorted(set(values("method")) - {"gen1"}),
        )
    return params


def _samples(cfg: EvalConfig, specs: ModelSpecs, table: pd.DataFrame, run_dir: str) -> list[str]:
    """Up to ``cfg.sample_videos`` side-by-side videos: input | ours (first setting) | each baseline present
    (per-frame, SDEdit, no structure)."""
    from gen1.preview import side_by_side
    from gen1.video import write_video

    if not len(table) or cfg.sample_videos <= 0:
        return []
    opts = cfg.storage_options
    out = []
    for (clip_id, prompt), group in table.groupby(["clip_id", "prompt"], sort=True, dropna=False):
        if len(out) >= cfg.sample_videos:
            break
        try:
            first = group.iloc[0].to_dict()
            panels = [_label(input_clip(first, opts).load_frames(opts), "input")]
            for method in METHODS:
                rows = group[group["method"] == method]
                if len(rows):
                    row = rows.iloc[0]
                    panels.append(_label(read_video(row["output_uri"], opts), f"{method} {row['setting']}"))
            f = min(len(p) for p in panels)
            video = side_by_side(*[p[:f] for p in panels])
            if specs.is_tiny:
                video = _banner(video, "TINY RANDOM MODELS - not real results")
            name = f"{first['video']}-{hashlib.sha1(str(prompt).encode()).hexdigest()[:8]}.mp4"
            uri = join_uri(run_dir, "samples", name)
            write_video(video, uri, float(first["fps"] or 8.0), storage_options=opts)
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
    for (method, setting), group in table.groupby(["method", "setting"], sort=True):
        color = METHOD_COLORS.get(method, "tab:gray")
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
    """Fig. 4: our model's frame consistency and flow-warped MSE against temporal guidance w_t, averaged over
    videos and the other settings; a w_t = 0 point is labelled as what it is, eq. 8 with w_t = 0 (its content
    term is the video model's; it is not the image model alone). The baselines have no w_t: each is a
    horizontal line at its mean frame consistency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = table[table["method"] == "gen1"] if len(table) else table
    fig, ax = plt.subplots(figsize=(6, 4.5))
    twin = []
    if len(ours):
        means = ours.groupby("w_t", sort=True)[["frame_consistency", "flow_warp_error"]].mean()
        ax.plot(means.index, means["frame_consistency"], "o-", color="tab:blue", label="frame consistency")
        if 0.0 in means.index:
            ax.annotate("eq. 8, w_t = 0", (0.0, means.loc[0.0, "frame_consistency"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(means.index, means["flow_warp_error"], "s--", color="tab:red", label="flow-warped MSE")
        ax2.set_ylabel("flow-warped MSE between consecutive frames", color="tab:red")
        twin = ax2.get_lines()
    baselines = table[table["method"] != "gen1"] if len(table) else table
    for method, group in baselines.groupby("method", sort=True):
        mean = group["frame_consistency"].mean()
        if np.isfinite(mean):
            ax.axhline(mean, color=METHOD_COLORS.get(method, "tab:gray"), ls=":",
                       label=f"{method} frame consistency (no w_t)")
    lines = ax.get_lines() + twin
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")
    ax.set_xlabel("temporal guidance w_t (eq. 8)")
    ax.set_ylabel("frame consistency", color="tab:blue")
    ax.set_title(_title("Consistency vs temporal guidance (Fig. 4)", label), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
