"""What every job shares at run time: connecting to Ray, run ids, sizing actor pools, run records.

- `init_ray`: connect to ``--ray-address`` / ``$RAY_ADDRESS`` (forwarding `FORWARDED_ENV` to a remote
  cluster), else start a local Ray. S3 retries with backoff are installed on import of `pipelines`
  (`pipelines.storage`), so every driver and worker has them.
- `new_run_id`: ``<UTC time>-<6 hex>``, the name of a run's parts, records and temp folders.
- `plan_resources`: the one resource planner. Model actors take ``num_gpus`` each when the cluster has
  GPUs and a CPU fraction otherwise; the pools must leave room for Ray Data's CPU tasks, since an actor
  pool that holds every CPU starves them and hangs the job (measured on 2 CPUs, and after a worker node
  dies and its actors restart on the head).
- `task_pool` and `actor_pool`: the ``map_batches`` arguments of every stage, its pool (``compute=``) and
  its bounded retries (`RetryConfig`, the ``retries`` of every job config); `bounded_pass` lets a pass
  finish when some blocks fail on every attempt, and stops one that makes no progress. What the driver
  makes of a lost block: `pipelines.failures.WorkerLost`.
- `write_run_record`: ``DST/runs/<name>.json``, the config and summary of a run, written through
  `bookkeeping`: a failed write is reported in the summary and makes the command exit 6.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from gen1.config import ConfigError
from pipelines.schema import RUNS_DIR, TableStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Non-secret settings a job submitted to a remote cluster takes along (a local cluster inherits them).
FORWARDED_ENV = (
    "GEN1_TINY_DIR",
    "GEN1_CACHE_DIR",
    "GEN1_LIBAV_LOG",  # gen1.libav_logging: `gen1 -v` makes the workers' FFmpeg log too
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
)


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray; no-op if already connected.

    Returns True when this call connected (the caller shuts down what it started).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # never re-run workers through `uv run`
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        env = forwarded_env()
        logger.info("connecting to Ray at %s (forwarding %s)", address, ", ".join(env) or "no env vars")
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    return True


def forwarded_env() -> dict[str, str]:
    """The `FORWARDED_ENV` variables set here, for a remote cluster's runtime_env."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


# --------------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ActorPool:
    """One model-actor pool of a Ray Data pass: ``concurrency`` actors of ``num_gpus`` each on a GPU cluster."""

    name: str
    concurrency: int
    num_gpus: float


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


def plan_resources(pools: Sequence[ActorPool], actor_num_cpus: float,
                   task_num_cpus: float) -> dict[str, dict[str, float]]:
    """``{pool name: {"num_cpus": ..., "num_gpus": ...}}`` for actor pools that run at the same time.

    With GPUs each actor takes its ``num_gpus`` (the pools together must fit) and at most one CPU; without,
    ``actor_num_cpus`` each. `ConfigError` when the actors leave less than ``task_num_cpus`` for Ray
    Data's CPU tasks (the job would hang).
    """
    cpus, gpus = cluster_resources()
    out: dict[str, dict[str, float]] = {}
    if gpus > 0:
        need = sum(p.num_gpus * p.concurrency for p in pools)
        if need > gpus:
            raise ConfigError(
                f"model pools need {need:g} GPUs ({', '.join(f'{p.name}: {p.concurrency} x {p.num_gpus:g}' for p in pools)}) "
                f"but the cluster has {gpus:g}; lower *_concurrency or *_num_gpus"
            )
        for p in pools:
            out[p.name] = {"num_gpus": p.num_gpus, "num_cpus": min(1.0, actor_num_cpus)}
    else:
        for p in pools:
            out[p.name] = {"num_gpus": 0.0, "num_cpus": actor_num_cpus}
    actor_cpus = sum(out[p.name]["num_cpus"] * p.concurrency for p in pools)
    if actor_cpus + task_num_cpus > cpus:
        raise ConfigError(
            f"model actors ({', '.join(f'{p.name}: {p.concurrency}' for p in pools)}) claim {actor_cpus:g} of "
            f"the cluster's {cpus:g} CPUs, leaving less than task_num_cpus={task_num_cpus:g} for Ray Data's "
            f"tasks (the job would hang); lower actor_num_cpus or *_concurrency"
        )
    if task_num_cpus > 0 and actor_cpus + task_num_cpus > min(_node_cpus()):
        logger.warning(
            "model actors claim %g CPUs and task_num_cpus=%g: if nodes are lost and the actors restart on a "
            "node of %g CPUs, CPU tasks can starve; task_num_cpus=0 avoids that",
            actor_cpus, task_num_cpus, min(_node_cpus()),
        )
    return out


def _node_cpus() -> list[float]:
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [0.0]


# ---------------------------------------------------------------------------------------------- retries


# A pass's stall limit past its longest call limit: time for queued blocks to move once a call returns.
STALL_MARGIN_S = 120.0


@dataclass(frozen=True)
class RetryConfig:
    """How often Ray re-runs the work of a stage whose process died: the ``retries`` of every job config
    (``retries: {task_retries: 1}`` in ``--config``). Ray Data 2.60 re-runs it forever by default
    (``max_retries=-1`` for tasks; ``max_restarts=-1`` and ``max_task_retries=-1`` for actor pools), so
    one clip that kills its process would stall a job.

    - ``task_retries``: times a CPU task is re-run after its worker process died (``max_retries``).
    - ``actor_task_retries``: times an actor call is re-run after its actor died (``max_task_retries``).
      At least 1: an actor retired after a time limit (`pipelines.timeouts.Retirement`) ends its process at
      the start of its next call, which its restarted actor then runs.
    - ``actor_restarts``: times each actor is restarted (``max_restarts``; a retirement is a restart too);
      -1, the default: no limit of its own, which is the contract of Ray Data 2.60's actor pools (its
      operator expects pool actors to be "restarted indefinitely until execution finishes"). Measured: an
      actor past a finite ``max_restarts`` is never replaced and its pass stalls. What bounds the work
      instead: a call is re-run at most ``actor_task_retries`` times (one poison clip costs an actor at most
      that many restarts and then becomes a ``crash`` row), and a pass that makes no progress for
      ``stall_timeout_s`` is stopped (an actor that dies in its constructor every time, e.g. out of memory
      while loading, restarts until then), its unfinished work recorded as ``pipeline`` errors.
    - ``stall_timeout_s``: seconds a pass may go without progress (no block into or out of any stage)
      before it is stopped (Ray Data's ``execution_no_progress_timeout_s``). None, the default: the job's
      longest per-call time limit plus `STALL_MARGIN_S`, since a call within its limit is progress still to
      come; Ray Data's own 30 minutes when some call has no limit.
    - ``max_lost_blocks``: blocks a pass may lose (their work failed on every attempt) and still finish
      (``DataContext.max_errored_blocks``); -1, the default: any number. Past it the pass stops.
    """

    task_retries: int = 2
    actor_task_retries: int = 2
    actor_restarts: int = -1
    stall_timeout_s: float | None = None
    max_lost_blocks: int = -1

    def __post_init__(self) -> None:
        # (name, what it may be): counts from a lower bound, or -1 for "no limit"
        for name, low, unlimited in (("task_retries", 0, False), ("actor_task_retries", 1, False),
                                     ("actor_restarts", 1, True), ("max_lost_blocks", 0, True)):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= low or unlimited and value == -1)
            if not ok:
                allowed = f"an integer >= {low}" + (" or -1 (no limit)" if unlimited else "")
                raise ConfigError(f"retries.{name}: expected {allowed}; found {value!r}")
        stall = self.stall_timeout_s
        if stall is not None and (isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall <= 0):
            raise ConfigError(f"retries.stall_timeout_s: expected seconds > 0 or null (derived); found {stall!r}")

    def stall_timeout(self, call_limits_s: Sequence[float | None]) -> float:
        """Seconds a pass of a job whose calls have the time limits ``call_limits_s`` (None or 0: no limit) may
        make no progress: ``stall_timeout_s`` when set, else the longest limit plus `STALL_MARGIN_S`, else
        (a call without a limit) Ray Data's default."""
        if self.stall_timeout_s is not None:
            return float(self.stall_timeout_s)
        if not call_limits_s or any(not limit for limit in call_limits_s):
            from ray.data.context import DEFAULT_EXECUTION_NO_PROGRESS_TIMEOUT_S

            return float(DEFAULT_EXECUTION_NO_PROGRESS_TIMEOUT_S)
        return float(max(call_limits_s)) + STALL_MARGIN_S

    @classmethod
    def from_value(cls, value: RetryConfig | Mapping[str, Any] | None) -> RetryConfig:
        """A job config's ``retries``: a RetryConfig, a mapping of its fields (YAML), or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"retries: expected a mapping of {[f.name for f in fields(cls)]}; found {value!r}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"retries: unknown keys {sorted(unknown)}; expected some of {[f.name for f in fields(cls)]}")
        return cls(**value)


def _ray_remote_args_accepted() -> None:
    """Ray 2.60 has no named ``map_batches`` parameter for ``max_retries``, ``max_restarts`` or
    ``max_task_retries`` (its named remote parameters are label_selector, fallback_strategy, max_calls,
    resources, accelerator_type and runtime_env): they go through ``**ray_remote_args``, which it deprecates
    for removal in Ray 2.64 with a warning at every call site. Silence that one warning, since the pin is
    ray 2.60.0; a Ray without ``**ray_remote_args`` fails every call loudly, and this is the place to change."""
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)


def task_pool(retries: RetryConfig, configured: int | None = None, cap: int | None = None) -> dict[str, Any]:
    """``map_batches`` arguments of a CPU-task stage: at most ``configured`` tasks at once (default: the
    cluster's CPUs), and at most ``cap`` (e.g. max_concurrent_decodes) when given; each task re-run at most
    ``retries.task_retries`` times after its worker died.

    Pools are given as ``compute=`` strategies, the API of Ray 2.60: its ``concurrency=`` argument is
    deprecated since Ray 2.51 and logs a warning on every call.
    """
    import ray

    _ray_remote_args_accepted()
    size = configured or max(1, int(cluster_resources()[0] or 1))
    return {"compute": ray.data.TaskPoolStrategy(size=min(size, cap) if cap else size),
            "max_retries": retries.task_retries}


def actor_pool(retries: RetryConfig, size: int, tasks_per_actor: int | None = None) -> dict[str, Any]:
    """``map_batches`` arguments of a model stage: ``size`` actors, each loading its model once, with at most
    ``tasks_per_actor`` tasks queued on each (None: Ray Data's default); a call re-run at most
    ``retries.actor_task_retries`` times after its actor died, an actor restarted at most
    ``retries.actor_restarts`` times."""
    import ray

    _ray_remote_args_accepted()
    if tasks_per_actor is None:
        compute = ray.data.ActorPoolStrategy(size=size)
    else:
        compute = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=tasks_per_actor)
    return {"compute": compute, "max_restarts": retries.actor_restarts,
            "max_task_retries": retries.actor_task_retries}


def bounded_pass(ds: Any, retries: RetryConfig, call_limits_s: Sequence[float | None] = ()) -> Any:
    """``ds``, whose pass now finishes with up to ``retries.max_lost_blocks`` blocks lost (their work failed
    on every attempt; Ray Data logs each and drops its rows), and is stopped with Ray Data's
    ``ExecutionTimeoutError`` after `RetryConfig.stall_timeout` seconds without progress (the job's calls
    have the time limits ``call_limits_s``). Set on the dataset's own context, so other datasets keep their
    settings. Returns ``ds``."""
    ds.context.max_errored_blocks = retries.max_lost_blocks
    ds.context.execution_no_progress_timeout_s = retries.stall_timeout(call_limits_s)
    return ds


def operator_seconds(ds: Any) -> dict[str, dict[str, float]]:
    """Per Ray Data operator of an executed dataset (its parents included): the summed time of its UDF
    calls (``function_body_s``), its tasks' wall time (``task_wall_s``), the rows it put out and the
    seconds from its first task's start to its last task's end (``active_s``), by operator name (e.g. ``MapBatches(DecodeStage)``). Empty when Ray Data kept no stats."""
    out: dict[str, dict[str, float]] = {}
    try:
        todo = [ds._get_stats_summary()]
    except Exception:  # stats are a diagnostic: never fail a run over them
        logger.debug("no Ray Data stats for this dataset", exc_info=True)
        return out
    while todo:
        summary = todo.pop()
        todo.extend(summary.parents)
        for op in summary.operators_stats:
            entry = out.setdefault(op.operator_name, {"function_body_s": 0.0, "task_wall_s": 0.0, "rows": 0.0,
                                                      "active_s": 0.0})
            for key, stat in (("function_body_s", op.function_body_time), ("task_wall_s", op.wall_time),
                              ("rows", op.output_num_rows)):
                if stat is not None:
                    entry[key] += float(stat.sum)
            if op.earliest_start_time and op.latest_end_time:  # from its first task's start to its last's end
                entry["active_s"] += float(op.latest_end_time - op.earliest_start_time)
    return out


# -------------------------------------------------------------------------------------------- run records


def write_run_record(store: TableStore, name: str, record: Mapping[str, Any]) -> str:
    """Write ``record`` (config, summary, ...) as ``DST/runs/<name>.json``; returns its URI. A failed write
    raises: call it through `bookkeeping`."""
    path = store.path(RUNS_DIR, f"{name}.json")
    store.fs.makedirs(store.path(RUNS_DIR), exist_ok=True)
    store.fs.pipe_file(path, json.dumps(dict(record), indent=2, default=str).encode())
    return store.uri(path)


def bookkeeping(errors: list[str], what: str, write: Callable[[], T]) -> T | None:
    """``write()``: a write about a run whose results are committed by then (its run record, the quarantine
    list). When it fails, the error is logged with its traceback and ``"could not write WHAT: Type: message"``
    appended to ``errors`` (a summary's ``bookkeeping_errors``: the command exits `EXIT_BOOKKEEPING`, 6),
    and None is returned; the results stay committed."""
    try:
        return write()
    except Exception as e:
        message = f"could not write {what}: {type(e).__name__}: {e}"
        logger.exception("%s", message)
        errors.append(message)
        return None
