"""The training loop: `train` runs a config on a batch source, writing checkpoints and the exported weights."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gen1.config import ModelSpecs
from gen1.ema import EMA
from gen1.train_data import BatchSource
from gen1.training.checkpoints import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    STATE_FILE,
    CheckpointStore,
    check_output,
    export_final,
    save_checkpoint,
)
from gen1.training.config import TrainConfig, resolve_init
from gen1.training.distributed import Runtime, wrap_model
from gen1.training.state import set_rng_state
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

    torch.manual_seed(cfg.seed + runtime.rank)
    np.random.seed((cfg.seed + runtime.rank) % 2**32)
    random.seed(cfg.seed + runtime.rank)
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

    gens = {
        "sample": torch.Generator().manual_seed(cfg.seed * 1_000_003 + runtime.rank),  # noise, t, t_s, dropout
        "kind": torch.Generator().manual_seed(cfg.seed),  # image or video step: the same on every worker
    }
    trainable = task.trainable
    optimizer = torch.optim.AdamW(
        trainable.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = max(cfg.warmup_steps, 0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=task.amp_dtype == torch.float16)
    ema = EMA(trainable.parameters, cfg.ema_decay) if cfg.ema_decay is not None else None
    step, run_id = 0, None
    if ckpt is not None:
        state = store.read_torch(CHECKPOINTS_DIR, ckpt, STATE_FILE)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"checkpoint {ckpt} has no EMA state but ema_decay is set")
            ema.load_state_dict(state["ema"])
        task.load_data_state(state["data"][runtime.rank] if runtime.rank in state["data"] else state["data"][0])
        step, run_id = int(state["step"]), state.get("mlflow_run_id")
        rng_file = f"rng-{runtime.rank}.pt"
        if store.exists(CHECKPOINTS_DIR, ckpt, rng_file):
            set_rng_state(store.read_torch(CHECKPOINTS_DIR, ckpt, rng_file), gens)
        else:
            log.warning("checkpoint %s has no %s (different worker count): random streams restart", ckpt, rng_file)
        log.info("resumed from %s at step %d", store.uri(CHECKPOINTS_DIR, ckpt), step)
    start_step = step

    model = wrap_model(task.model, cfg, runtime, task.find_unused_parameters)
    wrapped = model is not task.model
    if runtime.is_main and ckpt is None:
        store.write_bytes(cfg.to_yaml().encode(), "config.yaml")
    tracker = tracker if runtime.is_main else None  # the main worker reports for all
    if tracker is None:
        run_id = None  # later checkpoints name no run
    else:
        resumed = run_id is not None
        run_id = tracker.start(run_id)
        if not resumed:
            tracker.log_params({**cfg.as_params(), "models": specs.name, "world_size": str(runtime.world_size)})

    accum = cfg.accumulation(runtime.world_size)
    log.info("batch: %d per worker x %d accumulation x %d workers = %d clips per step", cfg.batch_size, accum,
             runtime.world_size, cfg.batch_size * accum * runtime.world_size)
    losses: list[float] = []
    window = {"loss": 0.0, "steps": 0, "samples": 0, "frames": 0, "image_steps": 0, "t0": time.perf_counter()}
    status = "FAILED"
    try:
        while step < cfg.max_steps:
            task.model.train()
            image_step = bool(torch.rand((), generator=gens["kind"]) < cfg.image_batch_prob)
            step_loss, samples, frames = 0.0, 0, 0
            for micro in range(accum):
                last = micro == accum - 1
                sync = contextlib.nullcontext() if last or not wrapped else model.no_sync()
                with sync:
                    loss, info = task.loss(model, image_step, gens["sample"])
                    scaler.scale(loss / accum).backward()
                step_loss += loss.item() / accum
                samples += info["samples"]
                frames += info["frames"]
            if not wrapped:
                runtime.all_reduce_grads(trainable.parameters)
            scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.max_grad_norm is not None:
                if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over every shard
                    grad_norm = float(model.clip_grad_norm_(cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable.parameters, cfg.max_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
            if ema is not None:
                ema.update()
            step += 1
            losses.append(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}")
            window["loss"] += step_loss
            window["steps"] += 1
            window["samples"] += samples
            window["frames"] += frames
            window["image_steps"] += int(image_step)
            metrics = {"loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "image_step": float(image_step)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _log_window(step, window, optimizer, runtime, tracker)
            for callback in callbacks:
                callback(step, metrics)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(store, step, task, model, optimizer, lr_schedule, scaler, ema, gens, runtime,
                                cfg, run_id)
        final = export_final(store, task, model, ema, runtime)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(status)
    seconds = time.perf_counter() - started
    log.info("trained %s: steps %d -> %d in %.1fs; weights in %s", cfg.stage, start_step, step, seconds, final)
    return TrainResult(
        output=output, steps=step, losses=losses, start_step=start_step, final=final, init_from=init_from,
        run_id=run_id, seconds=seconds,
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
