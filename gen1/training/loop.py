"""The training loop: `train` runs a config on a batch source, writing checkpoints and the exported weights."""

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
from gen1.training.state import TrainState, seed_everything
from gen1.training.tasks import build_task
from gen1.training.tracking import Tracker

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


StepCallback = Callable[[int, dict], None]


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
) -> TrainResult:
    """Train ``cfg`` on ``data`` (clip batches, or prior pairs for ``task: prior``), writing under ``output``.

    With ``resume`` the run continues from ``output``'s latest checkpoint (model, optimizer, LR schedule,
    EMA, data position, RNG states) when there is one. Every worker of a data-parallel run calls this with
    its own ``runtime`` and its own shard of the data. The main worker reports params and metrics to
    ``tracker`` (a resumed run continues the run its checkpoint names).
    """
    started = time.perf_counter()
    runtime = runtime or Runtime.current()
    store = CheckpointStore(output)
    check_output(output, resume)
    ckpt = store.latest() if resume else None
    if resume and ckpt is None:
        log.info("--resume: no checkpoint under %s yet, starting fresh", output)
    log.info("training %s (%s) on %s, worker %d/%d:\n%s", cfg.stage, specs.label(), runtime.device,
             runtime.rank, runtime.world_size, cfg.to_yaml())

    seed_everything(cfg.seed + runtime.rank)
    if ckpt is not None:
        init_from = store.uri(CHECKPOINTS_DIR, ckpt, MODEL_DIR)
        with store.local_dir(CHECKPOINTS_DIR, ckpt, MODEL_DIR) as model_dir:
            task = build_task(cfg, specs, runtime, str(model_dir), data)
    else:
        init_from = resolve_init(cfg, specs, output)
        log.info("initialising from %s", init_from)
        task = build_task(cfg, specs, runtime, init_from, data)
        if cfg.task == "prior" and cfg.fit_clip_stats:
            task.fit_clip_stats()

    state = TrainState.create(cfg, task, runtime.rank)
    if ckpt is not None:
        load_checkpoint(store, ckpt, state, runtime)
    start_step = state.step

    model = state.model = wrap_model(task.model, cfg, runtime, task.find_unused_parameters)
    wrapped = model is not task.model
    if runtime.is_main and ckpt is None:
        store.write_bytes(cfg.to_yaml().encode(), "config.yaml")
    tracker = tracker if runtime.is_main else None  # the main worker reports for all
    if tracker is None:
        state.run_id = None  # later checkpoints name no run
    else:
        resumed = state.run_id is not None
        state.run_id = tracker.start(state.run_id)
        if not resumed:
            tracker.log_params({**cfg.as_params(), "models": specs.name, "world_size": str(runtime.world_size)})

    accum = cfg.accumulation(runtime.world_size)
    log.info("batch: %d per worker x %d accumulation x %d workers = %d clips per step", cfg.batch_size, accum,
             runtime.world_size, cfg.batch_size * accum * runtime.world_size)
    losses: list[float] = []
    window = {"loss": 0.0, "steps": 0, "samples": 0, "frames": 0, "image_steps": 0, "t0": time.perf_counter()}
    status = "FAILED"
    try:
        while state.step < cfg.max_steps:
            task.model.train()
            image_step = bool(torch.rand((), generator=state.generators["kind"]) < cfg.image_batch_prob)
            step_loss, samples, frames = 0.0, 0, 0
            for micro in range(accum):
                last = micro == accum - 1
                sync = contextlib.nullcontext() if last or not wrapped else model.no_sync()
                with sync:
                    loss, info = task.loss(model, image_step, state.generators["sample"])
                    state.scaler.scale(loss / accum).backward()
                step_loss += loss.item() / accum
                samples += info["samples"]
                frames += info["frames"]
            if not wrapped:
                runtime.all_reduce_grads(task.trainable.parameters)
            state.scaler.unscale_(state.optimizer)
            grad_norm = None
            if cfg.max_grad_norm is not None:
                if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over every shard
                    grad_norm = float(model.clip_grad_norm_(cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(task.trainable.parameters, cfg.max_grad_norm))
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.lr_schedule.step()
            if state.ema is not None:
                state.ema.update()
            state.step += 1
            step = state.step
            losses.append(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}")
            window["loss"] += step_loss
            window["steps"] += 1
            window["samples"] += samples
            window["frames"] += frames
            window["image_steps"] += int(image_step)
            metrics = {"loss": step_loss, "lr": state.optimizer.param_groups[0]["lr"], "image_step": float(image_step)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _log_window(step, window, state.optimizer, runtime, tracker)
            for callback in callbacks:
                callback(step, metrics)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(store, state, task, runtime, cfg)
        final = export_final(store, task, state, runtime)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(status)
    seconds = time.perf_counter() - started
    log.info("trained %s: steps %d -> %d in %.1fs; weights in %s", cfg.stage, start_step, state.step, seconds, final)
    return TrainResult(
        output=output, steps=state.step, losses=losses, start_step=start_step, final=final, init_from=init_from,
        run_id=state.run_id, seconds=seconds,
    )


def _log_window(step: int, window: dict, optimizer, runtime: Runtime, tracker: Tracker | None) -> None:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    loss, samples, frames = runtime.mean([window["loss"] / window["steps"], window["samples"], window["frames"]])
    metrics = {
        "loss": loss,
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_s": samples * runtime.world_size / elapsed,
        "frames_per_s": frames * runtime.world_size / elapsed,
        "image_step_fraction": window["image_steps"] / window["steps"],
    }
    log.info("step %d: loss %.5f, lr %.3g, %.1f samples/s, %.1f frames/s", step, metrics["loss"], metrics["lr"],
             metrics["samples_per_s"], metrics["frames_per_s"])
    if tracker is not None:
        tracker.log_metrics(metrics, step)
    if runtime.report is not None:
        runtime.report({**metrics, "step": step})
    window.update(loss=0.0, steps=0, samples=0, frames=0, image_steps=0, t0=time.perf_counter())
