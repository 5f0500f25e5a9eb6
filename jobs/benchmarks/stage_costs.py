"""What each training stage costs at the paper's batch sizes, from sd15 (all four stages) or from sdiv
(stage 1 already done by the public checkpoint), as the README's table.

    python jobs/benchmarks/stage_costs.py [--peak-tflops 989] [--utilisation 0.4] [--models sd15]

FLOPs per optimizer step are counted with torch's ``FlopCounterMode`` on the real architecture: the
inflated video UNet (`gen1.architectures`, 12 input channels) built on the ``meta`` device, so nothing is
allocated; one forward + backward of one sample (a clip of 8 frames at 448x256, or one image at each
image size) is counted and scaled by the step's batch (FLOPs are linear in it). A step of a stage is a
video step (``global_batch_size`` clips) or, with probability ``image_batch_prob``, an image step of
``global_batch_size * frames`` images (9216) at a size drawn from the preset's buckets and their transposes:

    FLOPs/step = p_image * mean_size(images * F_image(size)) + (1 - p_image) * clips * F_video
    F = forward + backward (+ one more forward with gradient checkpointing, which recomputes it)
    GPU-hours  = max_steps * FLOPs/step / (peak * utilisation) / 3600

Counted: the UNet only. VAE latents, depth and CLIP embeddings come from the preprocessed shards (stored
latents; without them the VAE encoder runs per step too), the optimizer update is a few FLOPs per parameter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gen1.config import ModelSpecs, load_model_specs
from gen1.training import TrainConfig
from gen1.training.config import with_transposes
from jobs.process_exit import exit_process

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train"
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, bf16 tensor cores, dense (no sparsity)
UTILISATION = 0.4  # model FLOPs utilisation assumed for the GPU-hours
CHAINS = {"sd15": ("stage1", "stage2", "stage3", "stage4"), "sdiv": ("stage2-from-sdiv", "stage3", "stage4")}


def sample_flops(unet: torch.nn.Module, frames: int, width: int, height: int, checkpointing: bool) -> int:
    """FLOPs of one training sample, forward + backward (+ a recomputed forward with ``checkpointing``):
    ``frames`` > 1 a clip through the video model, 1 an image (temporal layers off). Pixel size
    ``width`` x ``height``; latents are 1/8 of it. The UNet may live on ``meta``."""
    device = next(unet.parameters()).device
    z = torch.randn(1, unet.in_channels, frames, height // 8, width // 8, device=device, requires_grad=False)
    t = torch.full((1,), 500, device=device)
    content = torch.randn(1, unet.cross_attention_dim, device=device)
    video = frames > 1
    with FlopCounterMode(display=False) as forward:
        out = unet(z, t, content, temporal=video)
    with FlopCounterMode(display=False) as backward:
        out.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    fwd = forward.get_total_flops()
    return fwd * (2 if checkpointing else 1) + backward.get_total_flops()


@dataclass(frozen=True)
class StageCost:
    config: str
    steps: int
    image_prob: float
    clips: int
    images: int
    flops_per_step: float

    def gpu_hours(self, peak_tflops: float, utilisation: float) -> float:
        return self.steps * self.flops_per_step / (peak_tflops * 1e12 * utilisation) / 3600


def stage_costs(specs: ModelSpecs, configs: tuple[str, ...], device: str = "meta") -> list[StageCost]:
    """The cost of each packaged stage config in ``configs`` for the architecture of ``specs``."""
    from gen1.architectures import build_component

    unet = build_component("video_unet", specs, device=device).train()
    sizes = with_transposes(specs.image_buckets)
    cache: dict[tuple[int, int, int, bool], int] = {}

    def flops(frames: int, width: int, height: int, checkpointing: bool) -> int:
        key = (frames, width, height, checkpointing)
        if key not in cache:
            cache[key] = sample_flops(unet, frames, width, height, checkpointing)
            log.info("%d frame(s) at %dx%d, checkpointing %s: %.3g FLOPs", *key, cache[key])
        return cache[key]

    out = []
    for name in configs:
        cfg = TrainConfig.from_yaml(CONFIG_DIR / f"{name}.yaml")
        clips = cfg.global_batch_size or cfg.batch_size
        images = clips * specs.frames  # an image step holds the frames of a video step: 1152 * 8 = 9216
        ckpt = bool(cfg.gradient_checkpointing)
        video = clips * flops(specs.frames, specs.width, specs.height, ckpt)
        image = images * sum(flops(1, w, h, ckpt) for w, h in sizes) / len(sizes)
        p = cfg.image_batch_prob
        out.append(StageCost(name, cfg.max_steps, p, clips, images, p * image + (1 - p) * video))
    return out


def markdown_table(costs: dict[str, list[StageCost]], peak_tflops: float, utilisation: float) -> str:
    lines = [
        "| start | stage (config) | steps | image steps | batch (clips / images) | PFLOPs per step | GPU-hours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for start, rows in costs.items():
        total = 0.0
        for r in rows:
            hours = r.gpu_hours(peak_tflops, utilisation)
            total += hours
            lines.append(f"| {start} | {r.config} | {r.steps:,} | {r.image_prob:.1%} | {r.clips:,} / {r.images:,} | "
                         f"{r.flops_per_step / 1e15:,.0f} | {hours:,.0f} |")
        lines.append(f"| {start} | **total** | | | | | **{total:,.0f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--utilisation", type=float, default=UTILISATION)
    parser.add_argument("--models", default="sd15", help="preset whose architecture and sizes are counted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    specs = load_model_specs(args.models)
    costs = {start: stage_costs(specs, configs) for start, configs in CHAINS.items()}
    print(f"UNet FLOPs counted with FlopCounterMode on {specs.name}'s architecture (meta device); GPU-hours at "
          f"{args.peak_tflops:g} TFLOP/s x {args.utilisation:.0%} utilisation")
    print(markdown_table(costs, args.peak_tflops, args.utilisation))
    return 0


if __name__ == "__main__":
    exit_process(main())
