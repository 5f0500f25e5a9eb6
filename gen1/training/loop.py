"""The training loop: `train` runs a config on a batch source, writing checkpoints and the exported weights.

`train` sets a run up (model from a checkpoint or ``init_from``, a `TrainState`, the DDP / FSDP wrapper,
the tracker) and runs optimizer steps to ``max_steps``, or until ``max_seconds`` of steps have passed; a step is ``accumulation`` micro-batches, all image
or all video (an image step's images all at the one size drawn for the step), then one update. Every
``log_every`` steps a line gives the loss, the throughput since the last line (steps/s, samples/s,
frames/s) and the ETA of ``max_steps`` at that rate::

    step 40/1000: loss 0.12345, lr 1e-05, 1.92 steps/s, 15.4 samples/s, 123.1 frames/s, ETA 8m20s
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gen1.config import ModelSpecs
from gen1.train_data import BatchSource
from gen1.training.checkpoints import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    CheckpointStore,
    check_output,
    export_final,
    load_checkpoint,
    save_checkpoint,
)
from gen1.training.config import TrainConfig, resolve_init
from gen1.training.distributed import Runtime, wrap_model
from gen1.training.objective import draw_image_size, draw_image_step
from gen1.training.state import TrainState, seed_everything
from gen1.training.tasks import PriorTask, UNetTask, build_task
from gen1.training.tracking import Tracker, TrainingData

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: str
    steps: int  # optimizer steps completed (global)
    losses: list[float]  # this worker's loss per optimizer step run in this call
    start_step: int  # step it started (or resumed) from
    final: str | None  # exported weights
    init_from: str  # what the model was loaded from: init spec, or the checkpoint resumed
    run_id: str | None = None  # the tracker's run (the main worker's), None without a tracker
    seconds: float = 0.0


StepCallback = Callable[[int, dict], None]  # (step, metrics), after every optimizer step


@dataclass
class StepStats:
    """One optimizer step, as this worker ran it."""

    loss: float  # mean over the micro-batches
    samples: int
    frames: int
    image_step: bool
    grad_norm: float | None  # before clipping; None without max_grad_norm
    image_size: tuple[int, int] | None = None  # (width, height) of an image step from image data

    def metrics(self, lr: float) -> dict[str, float]:
        out = {"loss": self.loss, "lr": lr, "image_step": float(self.image_step)}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        if self.image_size is not None:
            out["image_width"], out["image_height"] = map(float, self.image_size)
        return out


def format_duration(seconds: float) -> str:
    """``3725.0`` -> ``1h02m05s``, ``125.0`` -> ``2m05s``, ``7.4`` -> ``7s``; ``inf`` -> ``?``."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class ThroughputWindow:
    """Loss and throughput over the steps since the last log line, averaged over workers when reported."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.samples, self.frames, self.image_steps = 0.0, 0, 0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.steps += 1
        self.samples += stats.samples
        self.frames += stats.frames
        self.image_steps += int(stats.image_step)

    def report(self, step: int, max_steps: int, lr: float, runtime: Runtime, tracker: Tracker | None,
               seconds_left: float | None = None) -> None:
        """Log the window with the ETA of ``max_steps`` at its rate, or of the time budget (``seconds_left``)
        when that comes first (every worker takes part in the mean), send it on, start the next one."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        loss, samples, frames = runtime.mean([self.loss / self.steps, self.samples, self.frames])
        metrics = {
            "loss": loss,
            "lr": lr,
            "steps_per_s": self.steps / elapsed,
            "samples_per_s": samples * runtime.world_size / elapsed,
            "frames_per_s": frames * runtime.world_size / elapsed,
            "image_step_fraction": self.image_steps / self.steps,
        }
        eta = (max_steps - step) / metrics["steps_per_s"]
        if seconds_left is not None:
            eta = min(eta, max(seconds_left, 0.0))
        log.info("step %d/%d: loss %.5f, lr %.3g, %.2f steps/s, %.1f samples/s, %.1f frames/s, ETA %s", step,
                 max_steps, metrics["loss"], metrics["lr"], metrics["steps_per_s"], metrics["samples_per_s"],
                 metrics["frames_per_s"], format_duration(eta))
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        if runtime.report is not None:
            runtime.report({**metrics, "step": step})
        self._reset()


def train(
    cfg: TrainConfig,
    specs: ModelSpecs,
    data: BatchSource,
    output: str,
    *,
    resume: bool = False,
    runtime: Runtime | None = None,
    tracker: Tracker | None = None,
    callbacks: Sequence[StepCallback] = (),
    dataset: TrainingData | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (clip batches, or prior pairs for ``task: prior``), writing under ``output``.

    With ``resume`` the run continues from ``output``'s latest checkpoint (model, optimizer, LR schedule,
    EMA, data position, RNG states) when there is one. Every worker of a data-parallel run calls this with
    its own ``runtime`` and its own shard of the data. The main worker reports to ``tracker`` (a resumed run
    continues the run its checkpoint names): for a new run params, the config and ``dataset`` (what ``data``
    reads, as the caller describes it), metrics every ``log_every`` steps, and at the end the summary line.
    """
    started = time.perf_counter()
    runtime = runtime or Runtime.current()
    store = CheckpointStore(output)
    check_output(output, resume)
    ckpt = store.latest() if resume else None
    if resume and ckpt is None:
        log.info("--resume: no checkpoint under %s yet, starting fresh", output)
    log.info("training %s (%s) on %s, worker %d/%d (config: %s/config.yaml)", cfg.stage, specs.label(),
             runtime.device, runtime.rank, runtime.world_size, output)

    seed_everything(cfg.seed + runtime.rank)
    task, init_from = _load_task(cfg, specs, runtime, data, store, ckpt, output)
    state = TrainState.create(cfg, task, runtime.rank)
    if ckpt is not None:
        load_checkpoint(store, ckpt, state, runtime)
    start_step = state.step
    state.model = wrap_model(task.model, cfg, runtime, task.find_unused_parameters)
    if runtime.is_main and ckpt is None:
        store.write_bytes(cfg.to_yaml().encode(), "config.yaml")
    tracker = _start_tracker(tracker, state, cfg, specs, runtime, dataset)

    status, summary = "FAILED", ""
    try:
        losses = _run_steps(cfg, task, state, store, runtime, tracker, callbacks)
        final = export_final(store, task, state, runtime)
        status = "FINISHED"
        summary = (f"trained {cfg.stage}: steps {start_step} -> {state.step} in "
                   f"{time.perf_counter() - started:.1f}s; weights in {final}")
    except KeyboardInterrupt:
        status = "KILLED"
        summary = f"{cfg.stage}: interrupted at step {state.step} of {cfg.max_steps}"
        raise
    except BaseException as e:
        summary = f"{cfg.stage}: failed at step {state.step} of {cfg.max_steps}: {type(e).__name__}: {e}"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status, summary)
    seconds = time.perf_counter() - started
    log.info("%s", summary)
    return TrainResult(
        output=output, steps=state.step, losses=losses, start_step=start_step, final=final, init_from=init_from,
        run_id=state.run_id, seconds=seconds,
    )


def _load_task(
    cfg: TrainConfig,
    specs: ModelSpecs,
    runtime: Runtime,
    data: BatchSource,
    store: CheckpointStore,
    ckpt: str | None,
    output: str,
) -> tuple[UNetTask | PriorTask, str]:
    """The task with its model loaded from checkpoint ``ckpt``, or for a fresh run from ``init_from`` (or the
    preset's); and what it was loaded from."""
    if ckpt is not None:
        with store.local_dir(CHECKPOINTS_DIR, ckpt, MODEL_DIR) as model_dir:
            task = build_task(cfg, specs, runtime, str(model_dir), data)
        return task, store.uri(CHECKPOINTS_DIR, ckpt, MODEL_DIR)
    init_from = resolve_init(cfg, specs, output)
    log.info("initialising from %s", init_from)
    task = build_task(cfg, specs, runtime, init_from, data)
    if cfg.task == "prior" and cfg.fit_clip_stats:
        task.fit_clip_stats()
    return task, init_from


def _start_tracker(
    tracker: Tracker | None, state: TrainState, cfg: TrainConfig, specs: ModelSpecs, runtime: Runtime,
    dataset: TrainingData | None,
) -> Tracker | None:
    """The main worker's tracker, started: the run ``state`` names (resumed) or a new one, its params, config
    and ``dataset`` logged."""
    if tracker is None or not runtime.is_main:
        state.run_id = None  # later checkpoints name no run
        return None
    resumed = state.run_id is not None
    state.run_id = tracker.start(state.run_id)
    if not resumed:
        tracker.log_params({**cfg.as_params(), "models": specs.name, "world_size": str(runtime.world_size)})
        tracker.log_config(cfg.as_dict())
        if dataset is not None:
            tracker.log_dataset(dataset)
    return tracker


def _run_steps(
    cfg: TrainConfig,
    task: UNetTask | PriorTask,
    state: TrainState,
    store: CheckpointStore,
    runtime: Runtime,
    tracker: Tracker | None,
    callbacks: Sequence[StepCallback],
) -> list[float]:
    """Optimizer steps up to ``cfg.max_steps`` (or ``cfg.max_seconds``), logging, calling back and
    checkpointing; this worker's losses.

    The time budget is decided on the main worker and shared (`Runtime.mean`), so every worker of a
    data-parallel run stops after the same step.
    """
    accum = cfg.accumulation(runtime.world_size)
    log.info("batch: %d per worker x %d accumulation x %d workers = %d clips per step", cfg.batch_size, accum,
             runtime.world_size, cfg.batch_size * accum * runtime.world_size)
    losses: list[float] = []
    window = ThroughputWindow()
    started = time.perf_counter()
    while state.step < cfg.max_steps:
        stats = _optimizer_step(cfg, task, state, runtime, accum)
        step, lr = state.step, state.optimizer.param_groups[0]["lr"]
        losses.append(stats.loss)
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"loss is {stats.loss} at step {step}")
        last = step == cfg.max_steps or _out_of_time(cfg, started, runtime)
        window.add(stats)
        if step % cfg.log_every == 0 or last:
            left = None if cfg.max_seconds is None else cfg.max_seconds - (time.perf_counter() - started)
            window.report(step, cfg.max_steps, lr, runtime, tracker, left)
        for callback in callbacks:
            callback(step, stats.metrics(lr))
        if step % cfg.checkpoint_every == 0 or last:
            save_checkpoint(store, state, task, runtime, cfg)
        if last:
            break
    if state.step < cfg.max_steps:
        log.info("%s: time budget of %.0fs reached at step %d", cfg.stage, cfg.max_seconds, state.step)
    return losses


def _out_of_time(cfg: TrainConfig, started: float, runtime: Runtime) -> bool:
    """True once ``cfg.max_seconds`` have passed since ``started`` on the main worker (every worker agrees)."""
    if cfg.max_seconds is None:
        return False
    over = float(runtime.is_main and time.perf_counter() - started >= cfg.max_seconds)
    if runtime.world_size == 1:
        return bool(over)
    return runtime.mean([over])[0] > 0


def _optimizer_step(
    cfg: TrainConfig, task: UNetTask | PriorTask, state: TrainState, runtime: Runtime, accum: int
) -> StepStats:
    """``accum`` micro-batches (all image or all video) and one update; ``state.step`` advances by one.

    Whether the step is an image step, and an image step's size, come from the ``kind`` generator every
    worker holds alike (and a checkpoint restores), so all workers and micro-batches of a step agree.
    """
    task.model.train()
    image_step = draw_image_step(cfg.image_batch_prob, state.generators["kind"])
    size = draw_image_size(task.image_sizes, state.generators["kind"]) if image_step and task.image_sizes else None
    model, wrapped = state.model, state.model is not task.model
    loss, samples, frames = 0.0, 0, 0
    for micro in range(accum):
        last = micro == accum - 1
        sync = contextlib.nullcontext() if last or not wrapped else model.no_sync()  # DDP syncs on the last only
        with sync:
            micro_loss, info = task.loss(model, image_step, state.generators["sample"], size)
            state.scaler.scale(micro_loss / accum).backward()
        loss += micro_loss.item() / accum
        samples += info["samples"]
        frames += info["frames"]
    if not wrapped:
        runtime.all_reduce_grads(task.trainable.parameters)
    grad_norm = _apply_gradients(state, task.trainable.parameters, cfg.max_grad_norm)
    return StepStats(loss=loss, samples=samples, frames=frames, image_step=image_step, grad_norm=grad_norm,
                     image_size=size)


def _apply_gradients(state: TrainState, parameters: Sequence[torch.nn.Parameter], max_norm: float | None) -> float | None:
    """Unscale, clip to ``max_norm``, step the optimizer, LR schedule and EMA; returns the norm before clipping."""
    state.scaler.unscale_(state.optimizer)
    grad_norm = None
    if max_norm is not None:
        if hasattr(state.model, "clip_grad_norm_"):  # FSDP: the norm over every shard
            grad_norm = float(state.model.clip_grad_norm_(max_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.lr_schedule.step()
    if state.ema is not None:
        state.ema.update()
    state.step += 1
    return grad_norm
