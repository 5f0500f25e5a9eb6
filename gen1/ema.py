"""Exponential moving average of model weights: ``shadow <- decay * shadow + (1 - decay) * param``.

Only the trainable parameters are tracked (a frozen parameter's average is itself). The averaged weights
are what a training run exports as its inference weights when EMA is on; `swapped` puts them into the
model for the duration of a save and restores the raw weights afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


class EMA:
    """An EMA of ``parameters`` (kept in float32, on the parameters' device)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.parameters = list(parameters)
        self.shadow = [p.detach().float().clone() for p in self.parameters]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step; call after every optimizer step."""
        current = [p.detach().float() for p in self.parameters]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Sequence[nn.Parameter] | None = None) -> None:
        """Write the averaged weights into ``parameters`` (default: the tracked ones)."""
        targets = self.parameters if parameters is None else list(parameters)
        if len(targets) != len(self.shadow):
            raise ValueError(f"expected {len(self.shadow)} parameters, found {len(targets)}")
        for p, s in zip(targets, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the tracked parameters hold the averaged weights; afterwards the raw ones."""
        raw = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.parameters, raw, strict=True):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(
                f"EMA state holds {len(shadow)} tensors, the model has {len(self.shadow)} trainable parameters"
            )
        for s, loaded in zip(self.shadow, shadow, strict=True):
            if s.shape != loaded.shape:
                raise ValueError(f"EMA tensor shape {tuple(loaded.shape)} does not match parameter {tuple(s.shape)}")
            s.copy_(loaded.to(s.device))
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
