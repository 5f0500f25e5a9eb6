"""Evaluation: edit a dataset with our video model and the baselines, measure, and log to MLflow.

`run_eval` (``gen1 eval --dataset davis:URI``)::

    MLflow run opened (eval_run: config.yaml, system metrics; it spans everything below)
    read_dataset (driver: DAVIS / TGVE sequences) -> SequenceClips (with object masks if asked)
      -> pipelines.edit.run_edit over the grid   t_s x w x w_t (ours, method gen1), and the editors named in
         --baselines (gen1.editors: sd-depth, animatediff-depth, wan-vace; each its editor's method)
      -> BaselineStage (actor pool: gen1.baselines, one task per method)  on the same clips and prompts
      -> MetricsStage (actor pool: CLIP + depth, batched)  on every output video
      -> per-video table (Parquet under OUT/<run>/) -> log_run: params, metrics, the clips as the input
         dataset, the table, plots, samples, the gate, the summary line as the description; run ended

`evaluate_edits` (``gen1 eval --edits DST``, and `gen1 demo`) runs only the last two steps over the manifest
of an earlier `gen1 edit` job (every row's method its ``editor``: ``gen1`` unless another editor made it).

Methods in the table (``--baselines`` picks the baselines, default all three):

- ``gen1``: our video model at every point of the grid, eq. 8 with its w_t; a w_t of 0 in the grid is a
  point of that sweep (setting ``...-wt0``: eq. 8 with w_t = 0, whose content term is still the video
  model's), not a baseline;
- ``per_frame``: the image model alone on every frame, ``mu_pi(0) + w (mu_pi(c) - mu_pi(0))``, temporal
  layers off, depth structure at the grid's t_s (`gen1.baselines.per_frame_video`; setting ``ts3-w7.5``);
- ``sdedit``: SDEdit per frame with the image model, the input noised to ``sdedit_strength``, structure
  channels empty as in training stages 1-2 (`gen1.baselines.sdedit_video`; setting ``s0.6-w7.5``);
- ``no_structure``: the ~s ablation, the same SDEdit-style denoising of the whole clip with the video model,
  temporal layers on, structure channels empty (`gen1.baselines.no_structure_video`);
- ``sd-depth``, ``animatediff-depth``, ``wan-vace`` (only when named): the public editors of `gen1.editors`
  with our DPT's depth, the grid's w and their defaults (settings ``s0.8-w7.5``, ``s0.8-cn1-w7.5``,
  ``cn1-w7.5``).

Metrics (`gen1.metrics.video_metrics`), measured on the written videos for every method alike:
``frame_consistency`` (consecutive frames, the paper's), ``frame_consistency_all_pairs`` (TGVE's),
``prompt_consistency``, ``flow_warp_error`` (Fig. 4; also of the input, for reference) and ``depth_fidelity``.

Every read and write (the dataset's listing, frames, masks and split files, reference images, outputs,
the table, errors, samples) goes through the job's fsspec ``storage_options`` (`EvalConfig`); the edit
pipeline gets them too.

Layout under ``OUT/<run_name>/``::

    edits/                  the edit pipeline's DST for our model (pipelines.edit)
    baselines/outputs/<clip_id>/<key>.mp4   baseline outputs (every method; keys: pipelines.edit.baseline_key)
    per_video.parquet       one row per measured output video (TABLE_COLUMNS)
    errors/part-*.parquet   one row per output that failed (a baseline, reading it, measuring it; ERRORS_SCHEMA),
                            counted in the summary's ``failed``
    samples/*.mp4           side-by-side sample videos (input | ours | per-frame | SDEdit | no structure)

Modules: `config` (`EvalConfig`, methods, metrics), `stages` (`BaselineStage`, `MetricsStage`), `run` (the
driver, the per-video table), `report` (MLflow logging via `pipelines.tracking`, the gate, samples, plots).
"""

from pipelines.evaluate.config import BASELINES, METHODS, METRICS, EvalConfig
from pipelines.evaluate.report import EvalSummary, consistency_scatter, consistency_vs_wt, eval_run, log_run
from pipelines.evaluate.run import evaluate_edits, per_video_table, run_eval, setting_label
from pipelines.evaluate.stages import BaselineStage, MetricsStage, read_video

__all__ = [
    "BASELINES",
    "BaselineStage",
    "METHODS",
    "METRICS",
    "EvalConfig",
    "EvalSummary",
    "MetricsStage",
    "consistency_scatter",
    "consistency_vs_wt",
    "eval_run",
    "evaluate_edits",
    "log_run",
    "per_video_table",
    "read_video",
    "run_eval",
    "setting_label",
]
