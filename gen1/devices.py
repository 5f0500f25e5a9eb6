"""Where models run and at which precision when the caller does not say: CUDA when present, else the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The edit models' (`gen1.models.Gen1Models`): bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def encoder_dtype(device: str | torch.device) -> torch.dtype:
    """The frozen feature models' (CLIP, DPT, BLIP): fp16 on CUDA, fp32 on CPU."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@contextmanager
def inference(device: str | torch.device) -> Iterator[None]:
    """Model calls that need no gradients: `torch.inference_mode`, plus autocast on CUDA (bf16 where the
    GPU has it, else fp16; `default_dtype`). On the CPU, inference mode alone (fp32)."""
    with torch.inference_mode():
        if str(device).startswith("cuda"):
            with torch.autocast("cuda", dtype=default_dtype(str(device))):
                yield
        else:
            yield


def to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A host tensor onto ``device``: through pinned memory with a non-blocking copy on CUDA (the copy
    overlaps the work queued before it), a plain ``.to`` elsewhere."""
    if str(device).startswith("cuda") and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
