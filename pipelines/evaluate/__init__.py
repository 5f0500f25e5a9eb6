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
structure conditioning). Metrics (`gen1.metrics.video_metrics`), measured on the written videos for every
method alike: ``frame_consistency`` (consecutive frames, the paper's), ``frame_consistency_all_pairs``
(TGVE's), ``prompt_consistency``, ``flow_warp_error`` (Fig. 4; also of the input, for reference) and
``depth_fidelity``.

Layout under ``OUT/<run_name>/``::

    edits/                  the edit pipeline's DST for our model and the per-frame baseline (pipelines.edit)
    sdedit/outputs/<clip_id>/<key>.mp4   SDEdit baseline outputs
    per_video.parquet       one row per measured output video (TABLE_COLUMNS)
    errors/part-*.parquet   one row per output that failed (SDEdit, reading it, measuring it; ERRORS_SCHEMA),
                            counted in the summary's ``failed``
    samples/*.mp4           side-by-side sample videos (input | ours | per-frame | SDEdit)

Modules: `config` (`EvalConfig`, methods, metrics), `stages` (`SDEditStage`, `MetricsStage`), `run` (the
driver, the per-video table), `report` (MLflow logging via `pipelines.tracking`, the gate, samples, plots).
"""

from pipelines.evaluate.config import BASELINES, METHODS, METRICS, EvalConfig
from pipelines.evaluate.report import EvalSummary, consistency_scatter, consistency_vs_wt, log_run
from pipelines.evaluate.run import evaluate_edits, method_of, per_video_table, run_eval, setting_label
from pipelines.evaluate.stages import MetricsStage, SDEditStage, read_video

__all__ = [
    "BASELINES",
    "METHODS",
    "METRICS",
    "EvalConfig",
    "EvalSummary",
    "MetricsStage",
    "SDEditStage",
    "consistency_scatter",
    "consistency_vs_wt",
    "evaluate_edits",
    "log_run",
    "method_of",
    "per_video_table",
    "read_video",
    "run_eval",
    "setting_label",
]
