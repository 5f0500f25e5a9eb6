"""Where models run and at which precision when the caller does not say: CUDA when present, else the CPU."""

from __future__ import annotations

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
