"""Where a training run reports: a `Tracker` the caller hands to `train`, and the `TrainingData` it names as
the run's input.

The library imports no tracking client; `pipelines.tracking.MlflowTracker` is the project's (MLflow). Only
the main worker calls a tracker: `start` once, with the run id a resumed checkpoint saved (so a resumed run
continues its run); for a new run `log_params` (short settings), `log_config` (the whole config) and
`log_dataset` (when the caller described the data); `log_metrics` every ``log_every`` steps; `finish` at the
end with the run's summary line. Ray Train hands every worker a pickled copy, so a tracker must pickle until
it is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on, as a tracker records it: ``name``, ``source`` (a URI), ``digest`` (changes when
    the content does) and ``rows`` (clips, or images)."""

    name: str
    source: str
    digest: str
    rows: int


class Tracker(Protocol):
    def start(self, run_id: str | None) -> str:
        """Open a new run (``run_id`` None) or continue run ``run_id``; returns the run's id."""
        ...

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The whole config, as one document."""
        ...

    def log_dataset(self, data: TrainingData) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, status: str, summary: str) -> None:
        """End the run: ``"FINISHED"``, ``"FAILED"`` when training raised or ``"KILLED"`` when it was
        interrupted; ``summary``: one line on what the run did (the run's description)."""
        ...
