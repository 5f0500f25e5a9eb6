"""`EditJobConfig`: everything one `pipelines.edit.run_edit` needs, loadable from YAML."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen1.config import ConfigError, config_from_mapping, read_yaml_mapping
from gen1.editors import check_settings, editor_class
from gen1.prompts import ChatConfig, PromptSpec, read_prompt_file
from pipelines.edit.clips import EditClip
from pipelines.edit.keys import EditGrid, check_editors
from pipelines.lease import check_lease_settings
from pipelines.runtime import RetryConfig
from pipelines.sources import VIDEO_EXTENSIONS, is_manifest
from pipelines.timeouts import check_time_limits

# The fields holding per-call time limits (seconds; 0 or None: none): checked, and a pass's stall limit
# derived from them.
TIME_LIMITS = ("decode_timeout_s", "caption_timeout_s", "edit_timeout_s")


@dataclass
class EditJobConfig:
    """Everything one `run_edit` needs. ``clips`` (an injected clip list, e.g.
    `pipelines.datasets.SequenceClip`s for evaluation) replaces listing ``src``. Loadable with `from_yaml`;
    printed at job start."""

    dst: str
    src: str | None = None  # a directory/prefix, one video, or a CSV/Parquet manifest (pipelines.sources)
    models: str = "tiny"  # preset or YAML of weight specs
    prompts: tuple[
        PromptSpec, ...
    ] = ()  # every clip's prompts (a --prompts file), unless the clip has its own
    prompts_file: str | None = None  # read into ``prompts`` when set
    auto_prompts: int = 0  # N: caption each clip and write N prompts for it (clips without prompts)
    grid: EditGrid = field(default_factory=EditGrid)  # its ``editor`` axis: gen1.editors names
    # editor -> role -> weight spec, over the editors' own (`gen1.editors.editor_weights`)
    editor_weights: dict[str, dict[str, str]] = field(default_factory=dict)
    steps: int = 50
    sampler: str = "ddim"
    frames: int | None = None  # frames per clip (None: the model's window)
    stride: int = 1  # source frames between edited frames
    clips_per_video: int | None = 1  # clips per source video (None: every non-overlapping clip)
    size: tuple[int, int] | None = None  # (w, h) for landscape sources (None: the model's)
    limit: int | None = None  # edit only the first N clips
    clips: Sequence[EditClip] | None = None  # injected clips; ``src`` is then ignored
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    llm: ChatConfig | None = None  # chat endpoint for prompts (None: $GEN1_LLM_BASE_URL, else templates)
    prompt_seed: int = 0  # template writer variety
    previews: bool = True  # also write input | depth | output previews
    metrics: bool = True  # compute per-output metrics in the same pass
    # execution
    caption_batch_size: int = 8
    caption_concurrency: int = 1
    prompt_concurrency: int = 2  # chat requests in flight (chat: that many actors, each with its own breaker)
    edit_batch_size: int = 1  # edits per actor call (the unit that is redone after a kill)
    edit_concurrency: int | None = None  # edit actors (None: one per GPU, else one per 4 CPUs)
    edit_num_gpus: float = 1.0  # per edit actor when the cluster has GPUs
    caption_num_gpus: float = 0.25
    actor_num_cpus: float = 0.5  # per model actor on a CPU-only cluster (< 1 so tasks are not starved)
    task_num_cpus: float = 0.25
    device: str | None = None  # None: cuda when the actor has a GPU, else cpu
    commit_every: int = 8  # manifest rows per committed part (a kill redoes at most this many edits)
    commit_interval_s: float = 60.0  # ... or fewer, once the oldest uncommitted row is this old
    max_failure_fraction: float = 0.1  # `gen1 edit` exits non-zero above this
    # Time limits (seconds; 0 or None: none). A call past its limit fails its clip or edit task alone with
    # error_type "timeout" (`pipelines.timeouts`) and the run goes on.
    decode_timeout_s: float | None = 120.0  # per probe (planning) and per clip decode (the edit's frames, the caption's middle frame)
    caption_timeout_s: float | None = 600.0  # per BLIP call (a batch, or one clip's on retry)
    edit_timeout_s: float | None = 3600.0  # per edit task: decode, sampling, metrics, writing
    # Bounded retries of every Ray Data call (`pipelines.runtime.RetryConfig`; YAML: a mapping of its fields).
    # An edit (or a clip, while planning and prompting) whose Ray worker or actor died on every attempt
    # becomes an error row with error_type "crash".
    retries: RetryConfig = field(default_factory=RetryConfig)
    # Concurrent drivers (`pipelines.lease`): a run holds DST's lease while it runs (renewed every
    # lease_ttl_s / 3; a driver that dies frees it after lease_ttl_s, or at once seen from its own machine); a
    # second driver waits up to lease_wait_s for it, then refuses (exit code 5). At start the run removes
    # DST's _tmp/ leftovers older than tmp_max_age_s (what runs that died wrote and never committed).
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 0.0
    tmp_max_age_s: float = 86400.0
    ray_address: str | None = None
    num_cpus: int | None = None  # of a local Ray
    progress: bool = True
    # fsspec options (credentials, endpoint) of every read and write: SRC, DST, prompts file, masks, images
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.grid, Mapping):
            self.grid = EditGrid(**self.grid)
        elif isinstance(self.grid, (list, tuple)):
            self.grid = EditGrid.parse(self.grid)
        self.prompts = tuple(
            p if isinstance(p, PromptSpec) else PromptSpec.parse(str(p)) for p in self.prompts
        )
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        if isinstance(self.llm, Mapping):
            self.llm = ChatConfig(**self.llm)
        self.extensions = tuple(self.extensions)
        self.retries = RetryConfig.from_value(self.retries)
        if self.auto_prompts < 0:
            raise ConfigError(f"auto_prompts: expected N >= 0, found {self.auto_prompts}")
        for name in (
            "steps",
            "stride",
            "caption_batch_size",
            "caption_concurrency",
            "prompt_concurrency",
            "edit_batch_size",
            "commit_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)!r}")
        check_time_limits(self, TIME_LIMITS)
        check_lease_settings(self)
        if self.auto_prompts and (self.prompts or self.prompts_file):
            raise ConfigError("give prompts (a file or a list) or auto_prompts, not both")
        if self.src is None and self.clips is None:
            raise ConfigError("nothing to edit: give src (videos or a manifest) or clips")
        check_editors(self.grid, self.sampler)  # a setting no editor takes fails now, before any work
        for name in self.editor_weights:
            editor_class(name)

    def load_prompts(self) -> None:
        """Read ``prompts_file`` (with ``storage_options``) into ``prompts``; `ConfigError` when no clip could
        get a prompt."""
        if self.prompts_file:
            self.prompts = tuple(read_prompt_file(self.prompts_file, self.storage_options))
        images = [p.image_uri for p in self.prompts if p.image_uri]
        if images:
            for name in self.grid.editor:
                check_settings(editor_class(name), {"reference_image": images[0]})
        if not (
            self.prompts
            or self.auto_prompts
            or self.clips is not None
            or (self.src and is_manifest(self.src))
        ):
            raise ConfigError(
                "no prompts: pass a prompts file, auto_prompts N, or a source manifest with prompts"
            )

    @property
    def call_limits_s(self) -> tuple[float | None, ...]:
        """Every per-call time limit of the job: a pass's stall limit is derived from them
        (`pipelines.runtime.RetryConfig.stall_timeout`)."""
        return tuple(getattr(self, name) for name in TIME_LIMITS)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EditJobConfig:
        """Fields from a YAML mapping, then ``overrides`` (None values ignored)."""
        return config_from_mapping(cls, read_yaml_mapping(path, "edit settings"), path, overrides)

    def as_dict(self) -> dict[str, Any]:
        """For logs and run records: no secrets, no pixels."""
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("clips", "llm", "prompts", "grid", "retries", "storage_options")
        }
        d["grid"] = dataclasses.asdict(self.grid)
        d["retries"] = dataclasses.asdict(self.retries)
        d["prompts"] = [p.key for p in self.prompts]
        d["clips"] = None if self.clips is None else f"{len(self.clips)} injected clips"
        d["llm"] = self.llm.describe() if self.llm else None
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        return d
