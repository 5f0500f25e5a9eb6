"""MLflow logging for evaluation and training runs: where runs go, and what a run records.

A run reads well in the MLflow UI: it spans the work (opened before the first step, ended after the last
artifact, so its duration is true), names its input as an ``mlflow.data`` dataset (name, source URI, digest),
records system metrics (CPU, memory, disk, network; GPU when ``pynvml`` is installed), carries a description
(the job's summary line), the whole config as the ``config.yaml`` artifact (`log_config`; params keep the
short settings one can filter and compare runs by) and, for an eval, the per-video table as a table artifact.

Tracking URI precedence: the job config's ``tracking_uri``, then ``MLFLOW_TRACKING_URI``, then a local
store in a local folder (the eval's ``--out`` when local): ``sqlite:///<dir>/mlflow.db`` with artifacts in
``<dir>/mlartifacts``.
(MLflow 3.x refuses its plain ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; a SQLite file
plus an artifact folder is its local default, and `mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db`
opens it.)

Metric names follow ``<metric>`` for the headline (our video model, all settings averaged),
``<metric>/<method>`` per method and ``<metric>/<method>/<setting>`` per setting.

Training runs report through `MlflowTracker`, the `gen1.training.Tracker` that `gen1 train` hands in; its input
dataset is the `gen1.training.TrainingData` that `pipelines.train` describes (the feature shards).

A tracking URI may carry a password or a token (``https://user:pass@host?token=...``): it is used to connect
and logged or recorded only through `gen1.urls.redact_url`; MLflow's own "View run at <URL>" line, which
would print it verbatim, is suppressed for such a URI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gen1.destinations import destination
from gen1.urls import redact_url

if TYPE_CHECKING:
    from gen1.training.tracking import TrainingData

log = logging.getLogger(__name__)

SUPPRESS_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # read by MLflow when a run ends
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value is 6000 characters
CONFIG_ARTIFACT = "config.yaml"  # the whole config of a run (`log_config`)
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as the run's description


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().resolve()


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment of ``tracking_uri`` keeps its artifacts: beside a local SQLite store
    (``<its folder>/mlartifacts``); None for a server, which decides (MLflow's own default for a SQLite
    store would be ``./mlruns`` of whatever the working directory is)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / LOCAL_ARTIFACTS).resolve().as_uri()
    return None


def resolve_tracking_uri(configured: str | None, local_dir: str | Path) -> tuple[str, str | None]:
    """-> (tracking URI, artifact location for a new experiment or None to let the server decide).

    ``local_dir`` holds the default local store when neither the config nor ``MLFLOW_TRACKING_URI`` names one.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, artifact_location(uri)
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
    tracking_uri: str, artifact_location: str | None, experiment: str, run_name: str, tags: Mapping[str, str],
    description: str | None = None,
) -> Iterator[Any]:
    """Get or create ``experiment`` at ``tracking_uri`` and run a block inside an MLflow run, with system
    metrics sampled while it runs; the run ends FINISHED, or FAILED when the block raises.

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
            experiment_id=experiment_id, run_name=run_name, tags=dict(tags), description=description,
            log_system_metrics=True,
        ) as run:
            yield run
    finally:
        mlflow.set_tracking_uri(previous)


def client(tracking_uri: str) -> Any:
    """An ``mlflow.tracking.MlflowClient`` of ``tracking_uri`` (it sets no process-global MLflow state)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``a.b`` keys; lists and other values -> JSON / str. A value longer than MLflow's limit
    is left out with a warning (cut, it would read as a different value, or as invalid JSON): the whole
    config is the run's ``config.yaml`` (`log_config`)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_CHARS:
            log.warning("MLflow param %r left out: %d characters, over MLflow's limit of %d; its value is in "
                        "the run's %s", name, len(text), MAX_PARAM_CHARS, CONFIG_ARTIFACT)
            continue
        out[name] = text
    return out


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    flat = flatten_params(params)
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as plain YAML values (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(dict(config), default=str))


def log_config(config: Mapping[str, Any]) -> None:
    """The whole config as the active run's ``config.yaml`` artifact (the UI shows it as a document)."""
    import mlflow

    mlflow.log_dict(plain_config(config), CONFIG_ARTIFACT)


def describe(text: str) -> None:
    """The active run's description (the UI shows it on the run page)."""
    import mlflow

    mlflow.set_tag(DESCRIPTION_TAG, text)


def dataset_source(uri: str) -> Any:
    """MLflow's dataset source of ``uri`` (a local path, ``s3://``, ``gs://``, ``http(s)://``...), or a source
    that records the URI only for a scheme MLflow has no source for (``memory://``)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    uri = redact_url(uri)
    with warnings.catch_warnings():
        # a local path matches two registered local sources (schemes "" and "file"), both the same class
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            return _uri_source_class()(uri)


@functools.cache
def _uri_source_class() -> type:
    """A `mlflow.data.dataset_source.DatasetSource` that records a URI (built on first use: MLflow loads late)."""
    from mlflow.data.dataset_source import DatasetSource

    class UriDatasetSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self) -> Any:
            raise NotImplementedError(f"{self.uri}: read it with fsspec")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False  # never chosen by MLflow's resolver: only built by `dataset_source`

        @classmethod
        def _resolve(cls, raw_source: Any) -> DatasetSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[str, Any]) -> DatasetSource:
            return cls(source_dict["uri"])

    return UriDatasetSource


def log_dataset(table: pd.DataFrame, name: str, source: str, context: str) -> None:
    """``table`` (one row per input item) as the active run's input dataset ``name`` from ``source`` (a URI),
    used as ``context`` (``eval``); its digest is MLflow's hash of the table."""
    import mlflow

    with warnings.catch_warnings():
        # from_pandas infers a schema as for a model's inputs and warns that integer columns cannot hold
        # missing values at inference time: there is no inference here
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_pandas(_plain_table(table), source=dataset_source(source), name=name)
        mlflow.log_input(dataset, context=context)  # the schema is inferred here


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


def _plain_table(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with list / dict / array cells as JSON text (MLflow's table JSON and dataset schemas need
    plain values)."""
    clean = table.copy()
    for col in clean.columns:
        if clean[col].dtype == object:
            clean[col] = clean[col].map(lambda v: json.dumps(v.tolist() if isinstance(v, np.ndarray) else v)
                                        if isinstance(v, (list, dict, np.ndarray)) else v)
    return clean


def log_table(table: pd.DataFrame, artifact_file: str) -> None:
    """A table as an MLflow table artifact (JSON; the UI's Artifacts tab shows it as a table)."""
    import mlflow

    mlflow.log_table(_plain_table(table), artifact_file=artifact_file)


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

    The run is created in `start` and ended in `finish`, so its duration is the training's; between the two
    a monitor thread samples system metrics (``system/...``; a resumed run continues their steps). The client
    is made in `start`, so an unstarted tracker pickles (Ray Train hands one to every worker; the main worker
    starts it).
    """

    def __init__(self, uri: str, experiment: str = "gen1-train", run_name: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._client = None
        self._monitor = None

    def start(self, run_id: str | None = None) -> str:
        """Create a run in the experiment (``run_id`` None), or continue run ``run_id``."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._client = client(self.uri)
        resumed = run_id is not None
        if run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.uri))
            run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()
        return run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._client.log_dict(self.run_id, plain_config(config), CONFIG_ARTIFACT)

    def log_dataset(self, data: TrainingData) -> None:
        """The run's input: ``data`` (name, source URI, digest), used as ``train``."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = MetaDataset(dataset_source(data.source), name=data.name, digest=data.digest)
        self._client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                           [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def finish(self, status: str, summary: str) -> None:
        """End the run with ``status``; ``summary`` (what the run did) becomes its description."""
        if self._monitor is not None:
            self._monitor.finish()  # its last samples are logged while the run is still RUNNING
            self._monitor = None
        self._client.set_tag(self.run_id, DESCRIPTION_TAG, summary)
        with _no_url_printing(self.uri):
            self._client.set_terminated(self.run_id, status=status)
