"""Benchmark one edit (`gen1.sampling.edit_video`): batched vs unbatched eq. 8 guidance, in one run.

    python jobs/benchmarks/edit_bench.py [--models tiny] [--steps 20] [--repeats 3] [--json OUT]
    python jobs/benchmarks/edit_bench.py --full-size            # on a GPU: the sd15 architecture

With eq. 8 temporal guidance (w_t != 1) every denoising step needs three UNet evaluations (image model
per frame unconditional, video model unconditional, video model conditional). ``batched`` runs them as
one forward with a per-sample temporal mask; ``unbatched`` as three calls. Both edit the same real clip
with the same seed; the run prints seconds per edit for each, their ratio (unbatched / batched) and the
largest difference between the two outputs (they must agree to float tolerance).

- Default (CPU or GPU): the models of ``--models`` (``tiny`` = tiny random models; their outputs are not
  meaningful images, only the timing is).
- ``--full-size`` (needs CUDA): the full-size sd15 architecture (VideoUNet inflated from SD 1.5's UNet
  config, SD VAE, DPT-Large, CLIP ViT-L/14) with RANDOM weights, in bf16 (fp16 where bf16 is missing)
  with PyTorch SDPA attention, editing 8 frames at 448x256 with 50 DDIM steps: the seconds per edit a
  user with the real weights would see. Absolute times are only meaningful with the device named; the
  JSON carries the device name.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from jobs.process_exit import exit_process

log = logging.getLogger("edit_bench")

OPENCV_CLIP = Path("/usr/share/doc/opencv-doc/examples/data/Megamind.avi")


def load_input(uri: str | None, frames: int, stride: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 (f, h, w, 3): a real clip when available, else a synthetic moving gradient (labelled)."""
    from gen1.decoding import load_clip

    if uri is None and OPENCV_CLIP.exists():
        uri = str(OPENCV_CLIP)
    if uri is None:
        log.warning("no input clip (install opencv-doc or pass --input); using a synthetic clip")
        w, h = size
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        return np.stack([np.broadcast_to((x + 8 * i) % 256, (h, w, 3)) for i in range(frames)]).astype(np.uint8)
    return load_clip(uri, n=frames, stride=stride, size=size).frames


def full_size_models(device: str, dtype: torch.dtype):
    """`Gen1Models` of the full-size sd15 architecture with random weights (no prior: content is given
    as an embedding). Works on ``meta`` too, which is how the tests check this path without a GPU."""
    from transformers import DPTImageProcessor

    from gen1.architectures import build_component
    from gen1.clip import ClipEmbedder
    from gen1.config import SD15
    from gen1.content import ContentEncoder
    from gen1.depth import DepthEstimator
    from gen1.models import Gen1Models
    from gen1.structure import StructureEncoder

    build = lambda name: build_component(name, SD15, device=device).to(dtype).eval()  # noqa: E731
    vae, unet = build("vae"), build("video_unet")
    # DPT-Large's released processor settings (Intel/dpt-large preprocessor_config.json).
    processor = DPTImageProcessor(
        size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    depth = DepthEstimator.from_model(build("depth"), processor, device=device)
    clip = ClipEmbedder.from_model(build("clip"), tokenizer=None, device=device)
    if clip.dim != unet.cross_attention_dim:
        raise ValueError(f"CLIP width {clip.dim} != UNet cross-attention width {unet.cross_attention_dim}")
    return Gen1Models(
        specs=SD15, vae=vae, unet=unet, structure=StructureEncoder(depth, vae),
        content=ContentEncoder(clip, None), device=device, dtype=dtype,
    )


def attention_processors(unet) -> list[str]:
    """Distinct attention processor classes of the wrapped diffusers UNet (SDPA = AttnProcessor2_0)."""
    return sorted({type(p).__name__ for p in unet.image_unet.attn_processors.values()})


def time_edit(models, video, content, settings, sync) -> tuple[float, np.ndarray, int]:
    from gen1.sampling import edit_video

    sync()
    t0 = time.perf_counter()
    result = edit_video(models, video, content, settings)
    sync()
    return time.perf_counter() - t0, result.frames, result.unet_forwards


def run(args: argparse.Namespace) -> dict:
    from gen1.config import load_model_specs
    from gen1.devices import default_device, default_dtype
    from gen1.models import Gen1Models
    from gen1.sampling import EditSettings

    device = args.device or default_device()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.full_size:
        if not cuda:
            raise SystemExit("--full-size needs a CUDA GPU (the sd15 architecture at 448x256 is hours per edit on CPU)")
        dtype = default_dtype(device)
        models = full_size_models(device, dtype)
        label = "sd15 architecture, RANDOM weights (timing only)"
    else:
        specs = load_model_specs(args.models)
        models = Gen1Models.load(specs, device=device)
        dtype = models.dtype
        label = specs.label()

    width, height = args.size
    video = load_input(args.input, args.frames, args.stride, (width, height))
    gen = torch.Generator().manual_seed(0)
    content = torch.nn.functional.normalize(torch.randn(models.content.dim, generator=gen), dim=0)

    def settings(batched: bool, steps: int) -> EditSettings:
        return EditSettings(
            structure_strength=args.ts, guidance=args.w, temporal_guidance=args.wt, steps=steps,
            seed=0, sampler=args.sampler, batch_branches=batched,
        )

    log.info("warm-up edit (%s, %s, %s)", label, device, dtype)
    time_edit(models, video, content, settings(True, 2), sync)
    seconds = {"batched": [], "unbatched": []}
    outputs, forwards = {}, {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for mode in ("batched", "unbatched"):
            s, frames, n = time_edit(models, video, content, settings(mode == "batched", args.steps), sync)
            seconds[mode].append(s)
            outputs[mode], forwards[mode] = frames, n
            log.info("%s: %.2f s/edit", mode, s)
    diff = np.abs(outputs["batched"].astype(int) - outputs["unbatched"].astype(int)).max()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "models": label,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "attention": attention_processors(models.unet),
        "video": f"{args.frames}x{width}x{height}",
        "steps": args.steps,
        "sampler": args.sampler,
        "settings": {"ts": args.ts, "w": args.w, "wt": args.wt},
        "repeats": args.repeats,
        "seconds_per_edit": med,
        "unet_forwards": forwards,
        "unbatched_over_batched": med["unbatched"] / med["batched"],
        "max_abs_pixel_diff_batched_vs_unbatched": int(diff),
    }
    if cuda:
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny", help="preset or YAML of weight specs (default tiny)")
    p.add_argument("--full-size", action="store_true", help="sd15 architecture, random weights (CUDA only)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--input", default=None, help="input video URI (default: opencv-doc's Megamind.avi)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=(448, 256), metavar=("W", "H"))
    p.add_argument("--steps", type=int, default=None, help="default: 50 with --full-size, 20 otherwise")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp"))
    p.add_argument("--ts", type=int, default=3)
    p.add_argument("--w", type=float, default=7.5)
    p.add_argument("--wt", type=float, default=1.5, help="!= 1 so all three eq. 8 branches run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 50 if args.full_size else 20
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    exit_process(main())
