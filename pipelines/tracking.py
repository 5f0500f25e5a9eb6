"""MLflow logging for evaluation runs: where runs go, and params / metrics / tables / plots / media.

Tracking URI precedence: the job config's ``tracking_uri``, then ``MLFLOW_TRACKING_URI``, then a local
store in a local folder (the eval's ``--out`` when local): ``sqlite:///<dir>/mlflow.db`` with artifacts in
``<dir>/mlartifacts``.
(MLflow 3.x refuses its plain ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; a SQLite file
plus an artifact folder is its local default, and `mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db`
opens it.)

Metric names follow ``<metric>`` for the headline (our video model, all settings averaged),
``<metric>/<method>`` per method and ``<metric>/<method>/<setting>`` per setting.

Training runs report through `MlflowTracker`, the `gen1.training.Tracker` that `gen1 train` hands in.

A tracking URI may carry a password or a token (``https://user:pass@host?token=...``): it is used to connect
and logged or recorded only through `gen1.urls.redact_url`; MLflow's own "View run at <URL>" line, which
would print it verbatim, is suppressed for such a URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gen1.destinations import destination
from gen1.urls import redact_url

log = logging.getLogger(__name__)

SUPPRESS_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # read by MLflow when a run ends
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value is 6000 characters


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().resolve()


def resolve_tracking_uri(configured: str | None, local_dir: str | Path) -> tuple[str, str | None]:
    """-> (tracking URI, artifact location for a new experiment or None to let the server decide).

    ``local_dir`` holds the default local store when neither the config nor ``MLFLOW_TRACKING_URI`` names one.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            return uri, (db.parent / LOCAL_ARTIFACTS).resolve().as_uri()
        return uri, None
    root = local_path(str(local_dir))
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / LOCAL_DB}", (root / LOCAL_ARTIFACTS).as_uri()


@contextlib.contextmanager
def _no_url_printing(tracking_uri: str) -> Iterator[None]:
    """While a run ends, keep MLflow from printing a URI that carries secrets (it prints it verbatim)."""
    if redact_url(tracking_uri) == tracking_uri:
        yield
        return
    previous = os.environ.get(SUPPRESS_URL_ENV)
    os.environ[SUPPRESS_URL_ENV] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SUPPRESS_URL_ENV, None)
        else:
            os.environ[SUPPRESS_URL_ENV] = previous


@contextlib.contextmanager
def start_run(
    tracking_uri: str, artifact_location: str | None, experiment: str, run_name: str, tags: Mapping[str, str]
) -> Iterator[Any]:
    """Get or create ``experiment`` at ``tracking_uri`` and run a block inside an MLflow run.

    MLflow's fluent API needs a process-global tracking URI, and ``mlflow.set_tracking_uri`` also exports
    it as ``MLFLOW_TRACKING_URI``; both are restored on exit so a job run in-process (tests, notebooks)
    does not send later MLflow calls to this run's server.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = found.experiment_id
        log.info("MLflow: tracking %s, experiment %r (%s)", redact_url(tracking_uri), experiment, experiment_id)
        with _no_url_printing(tracking_uri), mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=dict(tags)
        ) as run:
            yield run
    finally:
        mlflow.set_tracking_uri(previous)


def client(tracking_uri: str) -> Any:
    """An ``mlflow.tracking.MlflowClient`` of ``tracking_uri`` (it sets no process-global MLflow state)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``a.b`` keys; lists and other values -> JSON / str, cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text[:MAX_PARAM_CHARS]
    return out


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    flat = flatten_params(params)
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))


def metric_name(metric: str, method: str | None = None, setting: str | None = None) -> str:
    return "/".join(p for p in (metric, method, setting) if p)


def summary_metrics(
    table: pd.DataFrame, metrics: Sequence[str], headline_method: str
) -> dict[str, float]:
    """Means of ``metrics`` over the rows of ``table`` (columns method, setting): headline, per method,
    per (method, setting). NaNs (undefined metrics) are left out of means; an all-NaN group is skipped."""
    out: dict[str, float] = {}

    def add(name: str, values: pd.Series) -> None:
        v = values.dropna()
        if len(v):
            out[name] = float(v.mean())

    for m in metrics:
        add(metric_name(m), table.loc[table["method"] == headline_method, m])
        for method, group in table.groupby("method", sort=True):
            add(metric_name(m, method), group[m])
            for setting, sub in group.groupby("setting", sort=True):
                add(metric_name(m, method, setting), sub[m])
    out["videos"] = float(len(table))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_metrics(metrics: Mapping[str, float]) -> None:
    import mlflow

    mlflow.log_metrics(dict(metrics))


def log_table(table: pd.DataFrame, artifact_file: str) -> None:
    """The per-video table as an MLflow table artifact (JSON, viewable in the UI's evaluation view)."""
    import mlflow

    clean = table.copy()
    for col in clean.columns:  # MLflow's table JSON needs plain values
        if clean[col].dtype == object:
            clean[col] = clean[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict, np.ndarray)) else v)
    mlflow.log_table(clean, artifact_file=artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_remote_file(uri: str, artifact_path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Copy an fsspec URI (read with ``storage_options``) to a temp file and log it (MLflow logs local files)."""
    import fsspec

    with tempfile.TemporaryDirectory() as tmp:
        local = destination(Path(tmp), Path(uri.rstrip("/")).name, source=uri)  # not '..'
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as src, open(local, "wb") as dst:
            dst.write(src.read())
        log_file(local, artifact_path)


class MlflowTracker:
    """A training run in MLflow (a `gen1.training.Tracker`), through a client: no global MLflow state.

    The client is made in `start`, so an unstarted tracker pickles (Ray Train hands one to every worker;
    the main worker starts it).
    """

    def __init__(self, uri: str, experiment: str = "gen1-train", run_name: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._client = None

    def start(self, run_id: str | None = None) -> str:
        """Create a run in the experiment (``run_id`` None), or continue run ``run_id``."""
        self._client = client(self.uri)
        if run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
            run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
        self.run_id = run_id
        return run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def finish(self, status: str = "FINISHED") -> None:
        with _no_url_printing(self.uri):
            self._client.set_terminated(self.run_id, status=status)
