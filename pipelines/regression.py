"""The eval regression gate: compare a run's metrics with the last accepted baseline run in MLflow.

A baseline is a run of the same experiment tagged ``gen1.baseline = accepted`` (`accept_baseline`, i.e.
``gen1 eval --accept RUN_ID``, or ``gen1 eval ... --accept-baseline`` for a run that passes its gate); the
most recently accepted one (tag ``gen1.baseline.accepted_at``) is the reference. For every gated metric the
*drop* is how much worse the run is than the baseline, in the metric's direction (lower is better for
flow-warp errors, higher for the rest), absolute or relative to the baseline value. A drop beyond the
allowed one regresses the run: it is tagged ``gen1.regression = regressed``, its worst videos (largest
per-video drop against the baseline's per-video table, else its lowest scores) are logged as a table
artifact for review, and the job exits non-zero. No baseline: the run passes, tagged ``no_baseline``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gen1.config import ConfigError
from gen1.urls import redact_url
from pipelines import tracking

log = logging.getLogger(__name__)

BASELINE_TAG = "gen1.baseline"
BASELINE_ACCEPTED = "accepted"
ACCEPTED_AT_TAG = "gen1.baseline.accepted_at"
STATUS_TAG = "gen1.regression"
BASELINE_RUN_TAG = "gen1.regression.baseline_run"
PASSED, REGRESSED, NO_BASELINE, DISABLED = "passed", "regressed", "no_baseline", "disabled"
LOWER_IS_BETTER = frozenset({"flow_warp_error", "input_flow_warp_error"})
TABLE_ARTIFACT = "eval/per_video.json"  # where pipelines.evaluate logs the per-video table
WORST_ARTIFACT = "eval/regression/worst_videos.json"
REPORT_ARTIFACT = "eval/regression/report.json"
FLOAT_SLACK = 1e-9  # a drop of exactly the threshold passes, whatever the float rounding of the subtraction
KEY_COLUMNS = ("video", "clip_id", "method", "setting", "prompt")


@dataclass
class Threshold:
    """The drop of one metric allowed before the gate fails: ``max_drop`` in the metric's units, or as a
    fraction of the baseline value when ``relative``."""

    max_drop: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0 and math.isfinite(self.max_drop)):
            raise ConfigError(f"max_drop: expected a finite number >= 0, found {self.max_drop!r}")
        self.max_drop = float(self.max_drop)


def default_thresholds() -> dict[str, Threshold]:
    # CLIP cosines of real models: frame consistency ~0.95 (a 0.01 drop is a visible flicker change),
    # prompt consistency ~0.3 (0.005 is ~2% of it); flow-warp error in its own units, so relative.
    return {
        "frame_consistency": Threshold(0.01),
        "prompt_consistency": Threshold(0.005),
        "flow_warp_error": Threshold(0.10, relative=True),
    }


@dataclass
class GateConfig:
    """Which metrics are gated and by how much (names as logged: ``metric`` headline, or
    ``metric/method[/setting]``); loadable from the ``gate:`` mapping of an eval config, where a threshold is
    ``{max_drop: 0.02, relative: false}`` or a bare number (absolute)."""

    enabled: bool = True
    thresholds: dict[str, Threshold] = field(default_factory=default_thresholds)
    worst_videos: int = 10  # rows per regressed metric in the worst-videos table

    def __post_init__(self) -> None:
        parsed: dict[str, Threshold] = {}
        for name, value in dict(self.thresholds).items():
            if isinstance(value, Threshold):
                parsed[name] = value
            elif isinstance(value, (int, float)):
                parsed[name] = Threshold(float(value))
            elif isinstance(value, Mapping):
                unknown = set(value) - {"max_drop", "relative"}
                if unknown or "max_drop" not in value:
                    raise ConfigError(f"gate threshold {name!r}: expected keys max_drop[, relative], found "
                                      f"{sorted(value)}")
                parsed[name] = Threshold(**value)
            else:
                raise ConfigError(f"gate threshold {name!r}: expected a number or a mapping, found {value!r}")
        self.thresholds = parsed
        if int(self.worst_videos) < 1:
            raise ConfigError(f"worst_videos: expected an integer >= 1, found {self.worst_videos!r}")

    @classmethod
    def from_value(cls, value: GateConfig | Mapping[str, Any] | None) -> GateConfig:
        if value is None:
            return cls()
        if isinstance(value, GateConfig):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"gate: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        data = dict(value)
        if "thresholds" in data:  # a partial mapping overrides the defaults metric by metric
            data["thresholds"] = {**default_thresholds(), **(data["thresholds"] or {})}
        return cls(**data)


def lower_is_better(metric: str) -> bool:
    return metric.split("/", 1)[0] in LOWER_IS_BETTER


def drop(metric: str, baseline: float, current: float, relative: bool) -> float:
    """How much worse ``current`` is than ``baseline`` (negative: better), in the metric's direction."""
    worse = current - baseline if lower_is_better(metric) else baseline - current
    if not relative:
        return worse
    return worse / abs(baseline) if baseline else (math.inf if worse > 0 else 0.0)


@dataclass
class MetricCheck:
    metric: str
    baseline: float | None
    current: float | None
    drop: float | None  # None when the metric is missing on either side
    max_drop: float
    relative: bool
    regressed: bool
    note: str = ""


@dataclass
class GateResult:
    status: str  # passed | regressed | no_baseline | disabled
    baseline_run_id: str | None = None
    checks: list[MetricCheck] = field(default_factory=list)
    worst_videos: pd.DataFrame | None = None

    @property
    def regressed(self) -> bool:
        return self.status == REGRESSED

    def line(self) -> str:
        if self.status in (NO_BASELINE, DISABLED):
            return f"regression gate: {self.status}"
        parts = []
        for c in self.checks:
            if c.drop is None:
                parts.append(f"{c.metric}: {c.note}")
            else:
                unit = "%" if c.relative else ""
                scale = 100 if c.relative else 1
                parts.append(f"{c.metric} {c.baseline:.4f} -> {c.current:.4f} (drop {c.drop * scale:.4g}{unit}, "
                             f"allowed {c.max_drop * scale:.4g}{unit}){' REGRESSED' if c.regressed else ''}")
        return f"regression gate vs baseline run {self.baseline_run_id}: {self.status}; " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "baseline_run_id": self.baseline_run_id,
                "checks": [dataclasses.asdict(c) for c in self.checks],
                "worst_videos": 0 if self.worst_videos is None else len(self.worst_videos)}


def compare(current: Mapping[str, float], baseline: Mapping[str, float],
            thresholds: Mapping[str, Threshold]) -> list[MetricCheck]:
    """One check per gated metric. Missing in the baseline: not checked (noted). Missing in the run while
    the baseline has it (e.g. every video failed): regressed."""
    checks = []
    for metric, t in thresholds.items():
        b, c = baseline.get(metric), current.get(metric)
        if b is None or not math.isfinite(b):
            checks.append(MetricCheck(metric, b, c, None, t.max_drop, t.relative, False, "not in the baseline"))
        elif c is None or not math.isfinite(c):
            checks.append(MetricCheck(metric, b, c, None, t.max_drop, t.relative, True, "missing in this run"))
        else:
            d = drop(metric, b, c, t.relative)
            checks.append(MetricCheck(metric, b, c, d, t.max_drop, t.relative, d - t.max_drop > FLOAT_SLACK))
    return checks


def worst_videos(current: pd.DataFrame, baseline: pd.DataFrame | None, checks: list[MetricCheck],
                 n: int) -> pd.DataFrame:
    """Up to ``n`` rows per regressed metric: the videos of the run with the largest drop against the same
    (video, clip, method, setting, prompt) of the baseline table, or, without a match, the lowest scores.

    A headline metric (``frame_consistency``) looks at our model's rows (method ``gen1``); ``metric/method``
    at that method's and ``metric/method/setting`` at that setting's."""
    out = []
    for check in (c for c in checks if c.regressed):
        base, method, setting = (check.metric.split("/") + [None, None])[:3]
        rows = _select(current, base, method or "gen1", setting)
        if rows.empty:
            continue
        rows = rows.assign(metric=check.metric, current=rows[base].astype(float))
        matched = None
        if baseline is not None and len(baseline) and base in baseline:
            ref = _select(baseline, base, method or "gen1", setting)[list(KEY_COLUMNS) + [base]]
            ref = ref.drop_duplicates(list(KEY_COLUMNS)).rename(columns={base: "baseline"})
            matched = rows.merge(ref, on=list(KEY_COLUMNS), how="left")
        if matched is not None and matched["baseline"].notna().any():
            matched["drop"] = [drop(base, b, c, False) if pd.notna(b) else math.nan
                               for b, c in zip(matched["baseline"], matched["current"], strict=True)]
            matched["basis"] = "drop vs baseline"
            ranked = matched.sort_values("drop", ascending=False, na_position="last", kind="stable")
        else:
            matched = rows.assign(baseline=math.nan, drop=math.nan, basis="lowest score")
            ranked = matched.sort_values("current", ascending=not lower_is_better(base), kind="stable")  # worst first
        keep = ["metric", *KEY_COLUMNS, "baseline", "current", "drop", "basis", "output_uri"]
        out.append(ranked.head(n)[[c for c in keep if c in ranked]])
    if not out:
        return pd.DataFrame(columns=["metric", *KEY_COLUMNS, "baseline", "current", "drop", "basis", "output_uri"])
    return pd.concat(out, ignore_index=True)


def _select(table: pd.DataFrame, metric: str, method: str, setting: str | None) -> pd.DataFrame:
    if metric not in table or "method" not in table:
        return table.iloc[0:0]
    rows = table[(table["method"] == method) & pd.to_numeric(table[metric], errors="coerce").notna()]
    if "error" in rows:
        rows = rows[rows["error"].isna()]
    if setting is not None:
        rows = rows[rows["setting"] == setting]
    return rows.assign(**{metric: pd.to_numeric(rows[metric], errors="coerce")})


# ------------------------------------------------------------------------------------------- MLflow


def find_baseline(client, experiment_id: str, exclude_run_id: str | None = None):
    """The most recently accepted baseline run of the experiment (a FINISHED run), or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{BASELINE_TAG}` = '{BASELINE_ACCEPTED}'", max_results=1000,
    )
    runs = [r for r in runs if r.info.run_id != exclude_run_id and r.info.status == "FINISHED"]
    if not runs:
        return None
    return max(runs, key=lambda r: (r.data.tags.get(ACCEPTED_AT_TAG, ""), r.info.start_time or 0))


def accept_baseline(tracking_uri: str, run_id: str) -> None:
    """Tag ``run_id`` as the accepted baseline of its experiment (the gate of later runs compares with it)."""
    client = tracking.client(tracking_uri)
    run = client.get_run(run_id)  # raises if there is no such run: the message names the id
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id}: expected a FINISHED run to accept as baseline, found {run.info.status}")
    client.set_tag(run_id, BASELINE_TAG, BASELINE_ACCEPTED)
    client.set_tag(run_id, ACCEPTED_AT_TAG, dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"))
    log.info("run %s (%s) accepted as the baseline of experiment %s at %s", run_id, run.info.run_name,
             run.info.experiment_id, redact_url(tracking_uri))


def load_run_table(client, run_id: str, artifact: str = TABLE_ARTIFACT) -> pd.DataFrame | None:
    """A run's per-video table (an `mlflow.log_table` JSON artifact), or None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, artifact, tmp)
        except Exception as e:  # an old run without the table: the gate falls back to lowest scores
            log.warning("baseline run %s has no %s (%s: %s); ranking worst videos by score", run_id, artifact,
                        type(e).__name__, e)
            return None
        data = json.loads(Path(path).read_text())
    return pd.DataFrame(data["data"], columns=data["columns"])


def run_gate(client, run_id: str, metrics: Mapping[str, float], table: pd.DataFrame, cfg: GateConfig) -> GateResult:
    """Compare run ``run_id`` (its ``metrics`` and per-video ``table``) with the experiment's accepted
    baseline; tag the run with the outcome and, when it regressed, log the worst videos and a report."""
    if not cfg.enabled:
        client.set_tag(run_id, STATUS_TAG, DISABLED)
        return GateResult(DISABLED)
    run = client.get_run(run_id)
    baseline = find_baseline(client, run.info.experiment_id, exclude_run_id=run_id)
    if baseline is None:
        log.info("regression gate: no accepted baseline in experiment %s; passing (accept one with "
                 "`gen1 eval --accept RUN_ID`)", run.info.experiment_id)
        client.set_tag(run_id, STATUS_TAG, NO_BASELINE)
        return GateResult(NO_BASELINE)
    checks = compare(metrics, baseline.data.metrics, cfg.thresholds)
    result = GateResult(REGRESSED if any(c.regressed for c in checks) else PASSED, baseline.info.run_id, checks)
    client.set_tag(run_id, STATUS_TAG, result.status)
    client.set_tag(run_id, BASELINE_RUN_TAG, baseline.info.run_id)
    if result.regressed:
        result.worst_videos = worst_videos(table, load_run_table(client, baseline.info.run_id), checks,
                                           cfg.worst_videos)
        clean = result.worst_videos.astype(object).where(result.worst_videos.notna(), None)
        client.log_table(run_id, clean, WORST_ARTIFACT)
        log.error("%s; worst videos logged to %s", result.line(), WORST_ARTIFACT)
    else:
        log.info("%s", result.line())
    client.log_text(run_id, json.dumps(result.as_dict(), indent=2, default=str), REPORT_ARTIFACT)
    return result
