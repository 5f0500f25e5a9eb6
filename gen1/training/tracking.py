"""Where a training run reports: a `Tracker` the caller hands to `train`.

The library imports no tracking client; `pipelines.tracking.MlflowTracker` is the project's (MLflow). Only
the main worker calls a tracker: `start` once, with the run id a resumed checkpoint saved (so a resumed run
continues its run), `log_params` for a new run, `log_metrics` every ``log_every`` steps and `finish` at the
end. Ray Train hands every worker a pickled copy, so a tracker must pickle until it is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Tracker(Protocol):
    def start(self, run_id: str | None) -> str:
        """Open a new run (``run_id`` None) or continue run ``run_id``; returns the run's id."""
        ...

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, status: str) -> None:
        """End the run: ``"FINISHED"``, or ``"FAILED"`` when training raised."""
        ...
