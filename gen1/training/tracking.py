"""Where a run's metrics go."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Tracking:
    """Where metrics go: an MLflow tracking URI (None: no MLflow), experiment and run name."""

    uri: str | None = None
    experiment: str = "gen1-train"
    run_name: str | None = None


class MlflowTracker:
    """Loss, learning rate and throughput to an MLflow run (through a client: no global MLflow state)."""

    def __init__(self, tracking: Tracking, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking.uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(tracking.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(tracking.experiment)
            run_id = self.client.create_run(exp_id, run_name=tracking.run_name).info.run_id
            self.resumed = False
        else:
            self.resumed = True
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
