"""The mass-edit pipeline: clips -> captions -> edit prompts -> (clip x prompt x settings x seed) edits ->
mp4 + side-by-side preview + one manifest row per output, with the paper's metrics computed in the pass.

Three Ray Data passes, each over plain stage classes (``__call__(batch) -> pyarrow.Table``, callable
without Ray)::

    plan     list videos (driver) -> PlanStage (CPU tasks: probe, pick clips)      [pipelines.sources]
             (or an injected clip list: `EditClip`s, e.g. DAVIS sequences with their masks)
    prompts  clips lacking prompts -> CaptionStage (actor pool: BLIP on the middle frame)
             -> PromptStage (CPU tasks: templates; actors for a chat endpoint, each with a circuit
                breaker that falls back to templates) -> DST/prompts (driver commits)
    edits    clips x prompts x editors x grid x seeds -> drop edit keys already in DST/manifest (driver)
             -> EditStage (actor pool, one Gen1Models per actor, and the job's other editors, gen1.editors:
                edit, metrics, write mp4 + preview)
             -> DST/manifest and DST/errors (driver commits)

Why prompts are a pass of their own whose output is committed: an edit's identity, its `edit_key`,
hashes the prompt text, and a chat model does not write the same prompts twice. Committing the prompts
of each clip before editing lets a rerun find them, and so find the edits already made.

Every read and write of the three passes (listing, probes, decodes, the prompts file, masks, reference
images, outputs, tables) goes through the job's fsspec ``storage_options`` (`EditJobConfig`), handed to each
stage as a constructor argument.

Layout under ``DST`` (any fsspec URI)::

    DST/outputs/<clip_id>/<edit_key>.mp4           edited videos
    DST/outputs/<clip_id>/<edit_key>.preview.mp4   input | depth | output
    DST/outputs/_tmp/<run_id>/...                  outputs being written (then renamed)
    DST/manifest/part-<run>-<n>-<uuid>.parquet     one row per output (MANIFEST_SCHEMA)
    DST/prompts/part-<run>-<n>-<uuid>.parquet      one row per (clip, prompt) written by a writer (PROMPTS_SCHEMA)
    DST/errors/part-<run>-<n>-<uuid>.parquet       failures (pipelines.schema.ERRORS_SCHEMA; shared with preprocess)
    DST/_index/manifest/...                        the manifest's edit keys, hashed (`pipelines.commit_index`)
    DST/runs/edit-<run_id>.json                    config and summary of each run
    DST/_lease/lease-<generation>.json             who writes into DST now (`pipelines.lease`)

Commit order makes reruns exact: an output is renamed into place before its manifest row exists, and
the driver commits manifest rows (`pipelines.commits.Committer`, once per edit key) only after an actor
has returned them, so a committed row always has its mp4. A rerun skips committed edit keys (read at start
from the manifest's key index, not from its parts); an edit
killed midway is redone (its half-written files live under ``_tmp`` and are replaced). Failures are data:
a video that cannot be probed, a clip that cannot be captioned, an edit that raises become `errors` rows
and the job goes on; so does work whose Ray worker or actor died on every attempt its bounded ``retries``
allow (error_type ``crash``); edits neither committed nor failed when a broken stream ends become
``pipeline`` errors. An edit past ``edit_timeout_s`` writes nothing more and retires its actor: the next
edit runs in a fresh process (`pipelines.timeouts`).
A run holds DST's lease from start to end (`pipelines.lease`): a second driver waits for it or refuses.

Modules: `clips` (what is edited), `keys` (grid, edit keys, task rows), `config` (`EditJobConfig`),
`stages` (the stage classes), `tables` (reading the manifest and prompts), `run` (`run_edit`, `EditRun`).
"""

from pipelines.edit.clips import EditClip, read_source_table
from pipelines.edit.config import EditJobConfig
from pipelines.edit.keys import EditGrid, baseline_key, edit_key, model_key, plan_tasks
from pipelines.edit.run import EditRun, EditSummary, run_edit
from pipelines.edit.stages import PROMPT_PLAN_SCHEMA, RESULT_SCHEMA, CaptionStage, EditStage, PromptStage
from pipelines.edit.tables import read_manifest, read_prompts

__all__ = [
    "PROMPT_PLAN_SCHEMA",
    "RESULT_SCHEMA",
    "CaptionStage",
    "EditClip",
    "EditGrid",
    "EditJobConfig",
    "EditRun",
    "EditStage",
    "EditSummary",
    "PromptStage",
    "baseline_key",
    "edit_key",
    "model_key",
    "plan_tasks",
    "read_manifest",
    "read_prompts",
    "read_source_table",
    "run_edit",
]
