"""Data-parallel training: this worker's `Runtime`, the DDP / FSDP wrapper and the collectives around it.

With one worker every helper here is a no-op or returns its input, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gen1.config import ConfigError
from gen1.devices import default_device
from gen1.training.config import TrainConfig

FSDP_MIN_UNIT_PARAMS = 10_000_000  # FSDP shards units of at least this many parameters


@dataclass
class Runtime:
    """Where this process trains: its device and its place among data-parallel workers."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    report: Callable[[dict], None] | None = None  # e.g. ray.train.report, called by every worker

    @classmethod
    def current(cls, device: str | torch.device | None = None, report: Callable[[dict], None] | None = None) -> Runtime:
        """This process's runtime: rank and world size from torch.distributed when it is initialised."""
        if device is None:
            device = default_device()
        initialised = dist.is_available() and dist.is_initialized()
        return cls(
            device=torch.device(device),
            rank=dist.get_rank() if initialised else 0,
            world_size=dist.get_world_size() if initialised else 1,
            report=report,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over workers of each value."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_grads(self, parameters: Sequence[nn.Parameter]) -> None:
        """Average gradients over workers (for models not wrapped in DDP)."""
        if not self.distributed:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad if p.grad.device == self._comm_device() else p.grad.to(self._comm_device())
            dist.all_reduce(grad)
            grad /= self.world_size
            if grad is not p.grad:
                p.grad.copy_(grad)


def wrap_model(model: nn.Module, cfg: TrainConfig, runtime: Runtime, find_unused: bool) -> nn.Module:
    """DDP (or FSDP) around ``model`` when several workers train; the model itself otherwise."""
    if not runtime.distributed:
        return model
    if cfg.strategy == "fsdp":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        if "conv_in_structure" in cfg.trainable and not {"all", "spatial"} & set(cfg.trainable):
            raise ConfigError("trainable conv_in_structure (a masked parameter) is not supported with fsdp; use ddp")
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=FSDP_MIN_UNIT_PARAMS)
        return FullyShardedDataParallel(  # sync_module_states: every worker starts from rank 0's weights, as DDP does
            model, use_orig_params=True, auto_wrap_policy=policy, device_id=runtime.device, sync_module_states=True
        )
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter requires a gradient")
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


@contextlib.contextmanager
def full_weights(model: nn.Module, runtime: Runtime):
    """Inside: the unwrapped module holds full weights on the main worker (FSDP gathers them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True):
            yield
    else:
        yield


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer``'s state dict; under FSDP the full one, gathered from every shard (a collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.optim_state_dict(model, optimizer)
    return optimizer.state_dict()


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """Every worker's ``obj``, by rank (a collective)."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out
