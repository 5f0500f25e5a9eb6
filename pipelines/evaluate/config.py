"""`EvalConfig`: one evaluation run (`pipelines.evaluate.run_eval`), loadable from YAML or a job spec; the
methods and metrics an evaluation reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen1.config import ConfigError, config_from_mapping, read_yaml_mapping
from gen1.editors import check_settings, editor_class
from gen1.urls import redact_url
from pipelines.edit import EditGrid
from pipelines.lease import check_lease_settings
from pipelines.regression import GateConfig
from pipelines.runtime import RetryConfig

# gen1: our video model (every point of the grid, w_t = 0 included: eq. 8 with w_t = 0); the baselines of
# gen1.baselines: per_frame (the image model alone), sdedit (SDEdit per frame), no_structure (~s ablation)
# gen1.editors: the public editors, run by the edit pipeline beside ours when named among the baselines
METHODS = ("gen1", "per_frame", "sdedit", "no_structure", "sd-depth", "animatediff-depth", "wan-vace")
BASELINES = ("per_frame", "sdedit", "no_structure")  # the default: gen1.baselines' three
EDITOR_BASELINES = ("sd-depth", "animatediff-depth", "wan-vace")
METRICS = (
    "frame_consistency",
    "frame_consistency_all_pairs",
    "prompt_consistency",
    "flow_warp_error",
    "input_flow_warp_error",
    "depth_fidelity",
)
MASK_MODES = ("none", "objects", "background")


@dataclass
class EvalConfig:
    """One evaluation run. Loadable from YAML (`from_yaml`, also the ``config:`` section of a job spec in
    ``jobs/specs/``); printed at start and logged to MLflow as params."""

    dataset: str | None = None  # "davis:URI" | "tgve:URI"
    edits: str | None = None  # or: the DST of an earlier `gen1 edit` job: evaluate its manifest only
    out: str = "gen1-eval"  # results: OUT/<run_name>/{edits, baselines, per_video.parquet, samples}
    models: str = "tiny"
    grid: dict[str, list] = field(default_factory=lambda: {"t_s": [3], "w": [7.5], "w_t": [1.0, 1.5], "seeds": [0]})
    baselines: tuple[str, ...] = BASELINES
    sdedit_strength: float = 0.6  # noise strength of the SDEdit-style baselines (sdedit, no_structure)
    steps: int = 50
    sampler: str = "ddim"
    # dataset selection and clips
    split: str | None = None  # DAVIS ImageSets split (train | val)
    sequences: tuple[str, ...] | None = None
    limit: int | None = None  # first N sequences
    frames: int | None = None  # frames per clip (None: the model's window)
    stride: int = 2  # source frames between edited frames (shrinks for short sequences)
    size: tuple[int, int] | None = None  # (w, h) edit size (None: the model's)
    mask: str = "none"  # none | objects (edit the annotated objects) | background (edit the rest)
    # prompts: TGVE brings its own; DAVIS uses these, else captions -> auto_prompts prompts
    prompts: tuple[str, ...] = ()
    auto_prompts: int = 1
    prompt_kinds: tuple[str, ...] | None = None  # TGVE: keep only these kinds (style, object, background, multiple)
    # tracking
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under OUT
    experiment: str = "gen1-eval"
    run_name: str | None = None  # None: eval-<dataset kind>-<UTC time>
    sample_videos: int = 3  # side-by-side sample videos logged
    # regression gate (pipelines.regression): compare with the experiment's accepted baseline run
    gate: GateConfig | dict[str, Any] | None = None  # None: the defaults; YAML: {thresholds: {...}, ...}
    accept_baseline: bool = False  # tag this run as the accepted baseline when its gate does not fail
    # execution
    metrics_batch_size: int = 4
    metrics_concurrency: int = 1
    baseline_concurrency: int = 1  # actors of the baseline stage (every method of `baselines`)
    actor_num_cpus: float = 0.5
    num_gpus: float = 0.5  # per metrics / baseline actor when the cluster has GPUs
    edit_concurrency: int | None = None
    device: str | None = None
    # Bounded retries of every Ray Data call, our edits' included (`pipelines.runtime.RetryConfig`; YAML: a
    # mapping of its fields). A row whose Ray worker or actor died on every attempt becomes an error row.
    retries: RetryConfig = field(default_factory=RetryConfig)
    # Concurrent drivers (`pipelines.lease`): a run holds the lease of OUT/<run_name> while it runs, and its
    # edit job that of OUT/<run_name>/edits (renewed every lease_ttl_s / 3; a driver that dies frees it after
    # lease_ttl_s, or at once seen from its own machine); a second eval of the same run name waits up to
    # lease_wait_s for it, then refuses (exit code 5). At start _tmp/ leftovers older than tmp_max_age_s go.
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 0.0
    tmp_max_age_s: float = 86400.0
    ray_address: str | None = None
    num_cpus: int | None = None
    progress: bool = True  # Ray Data progress of every pass: bars on a terminal, else a log line every 10 s
    # fsspec options (credentials, endpoint) of every read and write: the dataset, OUT, edits, images, samples
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.edits is None):
            raise ConfigError("eval needs exactly one of dataset (davis:URI | tgve:URI) or edits (an edit job's DST)")
        self.baselines = tuple(self.baselines)
        self.retries = RetryConfig.from_value(self.retries)
        unknown = set(self.baselines) - set(BASELINES) - set(EDITOR_BASELINES)
        if unknown:
            raise ConfigError(f"baselines: expected some of {BASELINES + EDITOR_BASELINES}, found {sorted(unknown)}")
        if self.mask not in MASK_MODES:
            raise ConfigError(f"mask: expected one of {MASK_MODES}, found {self.mask!r}")
        if self.mask != "none":  # masked edits: every editor named must take masks (wan-vace does)
            for name in self.editors:
                check_settings(editor_class(name), {"mask": f"mask {self.mask}"})
        if not 0 < self.sdedit_strength <= 1:
            raise ConfigError(f"sdedit_strength: expected a value in (0, 1], found {self.sdedit_strength}")
        self.prompts = tuple(self.prompts)
        if self.sequences is not None:
            self.sequences = tuple(self.sequences)
        if self.prompt_kinds is not None:
            self.prompt_kinds = tuple(self.prompt_kinds)
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        for name in ("steps", "stride", "metrics_batch_size", "metrics_concurrency", "baseline_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)!r}")
        self.gate = GateConfig.from_value(self.gate)
        check_lease_settings(self)
        self.edit_grid()  # validate now, not after minutes of work

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EvalConfig:
        """Fields from a YAML mapping (or a job spec's ``config:`` section), then non-None ``overrides``."""
        data = read_yaml_mapping(path, "eval settings")
        if "entrypoint" in data:  # a job spec (jobs/specs/*.yaml): its config section
            data = data.get("config") or {}
        return config_from_mapping(cls, data, path, overrides)

    @property
    def editors(self) -> tuple[str, ...]:
        """The editors of ``baselines`` (`gen1.editors`): they run in the edit pipeline beside ours."""
        return tuple(b for b in self.baselines if b in EDITOR_BASELINES)

    @property
    def image_baselines(self) -> tuple[str, ...]:
        """The `gen1.baselines` methods of ``baselines``: they run in the baseline stage."""
        return tuple(b for b in self.baselines if b in BASELINES)

    def edit_grid(self) -> EditGrid:
        """The edit pipeline's grid: our model's settings (a w_t of 0 in it is eq. 8 with w_t = 0, a point
        of our sweep; the per-frame baseline runs in the baseline stage), its editor axis gen1 and the editors
        of ``baselines``, each with the settings of the grid it takes."""
        grid = dict(self.grid)
        editors = grid.pop("editor", ("gen1",))
        if (editors,) != ("gen1",) and tuple(editors) != ("gen1",):
            raise ConfigError(f"grid editor {editors!r}: name the editors in baselines (--baselines sd-depth ...); "
                              "the eval grid is our model's")
        try:
            return EditGrid(**grid, editor=("gen1", *self.editors))
        except TypeError as e:
            raise ConfigError(f"grid: expected keys t_s, w, w_t, seeds, strength, controlnet_scale; found "
                              f"{sorted(self.grid)}") from e

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["storage_options"] = sorted(self.storage_options)  # keys only: values may be secrets
        d["tracking_uri"] = redact_url(self.tracking_uri) if self.tracking_uri else None
        return d
