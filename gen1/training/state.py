"""What a resumed run restores besides the weights: one `TrainState`, saved and loaded as one dict.

The state is the step, the optimizer, the LR schedule, the loss scaler, the EMA, the data position, every
random stream a step draws from and the tracker's run id. `gen1.training.checkpoints` decides the files:
``state.pt`` holds the shared part with every worker's data position, ``rng-<rank>.pt`` each worker's
random streams. Everything in it is tensors and plain Python values (numpy's and Python's random states
are stored as integer tensors), so a checkpoint loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from gen1.ema import EMA
from gen1.training.config import TrainConfig
from gen1.training.distributed import optimizer_state_dict

if TYPE_CHECKING:
    from gen1.training.tasks import PriorTask, UNetTask


class DataPosition(Protocol):
    """Where a task's data streams stand (`UNetTask`, `PriorTask`)."""

    def data_state(self) -> dict: ...

    def load_data_state(self, state: dict) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and Python streams (model initialisation, libraries' own draws)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def make_generators(seed: int, rank: int) -> dict[str, torch.Generator]:
    """The loop's own CPU streams: ``sample`` (this worker's), ``kind`` (the same on every worker)."""
    return {
        "sample": torch.Generator().manual_seed(seed * 1_000_003 + rank),  # noise, t, t_s, dropout, flips
        "kind": torch.Generator().manual_seed(seed),  # image or video step, image size: alike on every worker
    }


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a step depends on, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    for k, g in generators.items():
        g.set_state(state["generators"][k])


@dataclass
class TrainState:
    """Everything the next optimizer step depends on besides the weights.

    ``model`` is the module the optimizer steps through: the task's model, or its DDP / FSDP wrapper once
    the loop has wrapped it (FSDP gathers the optimizer state through the wrapper).
    """

    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    generators: dict[str, torch.Generator]
    data: DataPosition
    model: nn.Module
    step: int = 0
    run_id: str | None = None  # the tracker's run, so a resumed run continues it

    @classmethod
    def create(cls, cfg: TrainConfig, task: UNetTask | PriorTask, rank: int) -> TrainState:
        """A fresh state for ``task``: AdamW over its trainable parameters, linear warmup, EMA if configured."""
        trainable = task.trainable
        optimizer = torch.optim.AdamW(
            trainable.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
        )
        warmup = max(cfg.warmup_steps, 0)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        return cls(
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            scaler=torch.amp.GradScaler("cuda", enabled=task.amp_dtype == torch.float16),
            ema=EMA(trainable.parameters, cfg.ema_decay) if cfg.ema_decay is not None else None,
            generators=make_generators(cfg.seed, rank),
            data=task,
            model=task.model,
        )

    def state_dict(self, *, shared: bool = True) -> dict[str, Any]:
        """This worker's state. Under FSDP a collective (the optimizer state is gathered): every worker calls it.

        ``shared=False`` leaves out the LR schedule, loss scaler and EMA, which every worker holds alike, for a
        worker whose copy of them is not saved (the EMA would be copied off the GPU for nothing).
        """
        state = {
            "step": self.step,
            "optimizer": optimizer_state_dict(self.model, self.optimizer),
            "data": self.data.data_state(),
            "rng": rng_state(self.generators),
            "mlflow_run_id": self.run_id,  # the checkpoint format's name for the tracker's run id
        }
        if shared:
            state["lr_schedule"] = self.lr_schedule.state_dict()
            state["scaler"] = self.scaler.state_dict()
            state["ema"] = self.ema.state_dict() if self.ema is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "the state") -> None:
        """Restore what `state_dict` returned. ``rng`` None keeps the fresh random streams; ``source`` names
        the state in errors."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{source} has no EMA state but ema_decay is set")
            self.ema.load_state_dict(state["ema"])
        self.data.load_data_state(state["data"])
        self.step, self.run_id = int(state["step"]), state.get("mlflow_run_id")
        if state.get("rng") is not None:
            set_rng_state(state["rng"], self.generators)
