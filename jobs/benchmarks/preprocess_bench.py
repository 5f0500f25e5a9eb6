"""Benchmark the preprocess pipeline on real footage, in one run, against two baselines.

    python jobs/benchmarks/preprocess_bench.py [--src DIR] [--clips-per-video 16] [--models tiny]

Measures clips/s of
- ``decode``: decode + resize every clip, one after another (the floor: every design pays it);
- ``naive``: a sequential loop over the same clips doing what the pipeline does (decode, depth, CLIP,
  float16 encoding, Parquet write), models loaded once beforehand;
- ``pipeline``: `pipelines.preprocess.run_preprocess` on a local Ray, end to end (planning, actor start
  and model loading included: the number a user sees), into a fresh temp DST;
and prints pipeline/naive and pipeline/decode. With a GPU it also measures frames/s of the full-size
DPT-Large and CLIP ViT-L/14 (random weights, `gen1.architectures.build_component` on the GPU) and the
fraction of the measured matmul ceiling their FLOPs reach.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("preprocess_bench")

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def _plans(uris, frames, stride, clips_per_video, size):
    from pipelines.sources import plan_video

    return [p for u in uris for p in plan_video(u, frames, stride, clips_per_video, size)]


def _decode(plan) -> np.ndarray:
    from gen1.decoding import read_frames
    from gen1.video import resize_center_crop

    return resize_center_crop(read_frames(plan.source_uri, plan.frame_indices), plan.width, plan.height)


def bench_decode(plans) -> float:
    t0 = time.perf_counter()
    for p in plans:
        _decode(p)
    return len(plans) / (time.perf_counter() - t0)


def bench_naive(plans, depth_spec: str, clip_spec: str) -> float:
    """One process, one clip at a time: decode -> depth -> CLIP -> float16 -> one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gen1.clip import ClipEmbedder
    from gen1.depth import DepthEstimator
    from pipelines.schema import encode_array, encode_frames

    depth, clip = DepthEstimator(depth_spec), ClipEmbedder(clip_spec)
    t0 = time.perf_counter()
    rows = []
    for p in plans:
        frames = _decode(p)
        rows.append({
            "clip_id": p.clip_id,
            "depth": encode_array(depth(frames).float().cpu().numpy())[0],
            "clip_embedding": encode_array(clip.embed_images(frames).float().cpu().numpy())[0],
            "frames": encode_frames(frames, "jpeg"),
        })
    pq.write_table(pa.Table.from_pylist(rows), io.BytesIO(), compression="zstd")
    return len(plans) / (time.perf_counter() - t0)


def bench_pipeline(uris, cfg) -> tuple[float, dict]:
    from pipelines.preprocess import run_preprocess

    with tempfile.TemporaryDirectory(prefix="gen1-bench-") as tmp:
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text("uri\n" + "\n".join(uris) + "\n")
        summary = run_preprocess(str(manifest), str(Path(tmp) / "dst"), cfg)
    if summary.failed:
        raise RuntimeError(f"the pipeline failed {summary.failed} clips: {summary.line()}")
    return summary.clips_per_second, summary.as_dict()


# -------------------------------------------------------------------------------------------- GPU


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_ceiling_tflops(dtype, device: str = "cuda", n: int = 8192, iters: int = 20) -> float:
    """Dense (n x n) @ (n x n) throughput in TFLOP/s: what the device can do at best in ``dtype``."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _rate(fn, x, iters: int, device: str) -> float:
    """Items/s of ``fn(x)`` for a batch ``x`` (after warm-up)."""
    import torch

    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        _sync(device)
    return len(x) * iters / (time.perf_counter() - t0)


def _flops_per_item(fn, x) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / len(x)


def _entry(model_fps: float, flops: float, wrapper_fps: float, input_shape, ceiling: float) -> dict:
    return {
        "model_input": list(input_shape),
        "model_frames_per_s": model_fps,
        "wrapper_frames_per_s": wrapper_fps,  # uint8 frames in, preprocessing included
        "gflops_per_frame": flops / 1e9,
        "fraction_of_ceiling": model_fps * flops / 1e12 / ceiling,
    }


def bench_depth(specs, dtype, device: str, batch: int, iters: int, frame_hw=(256, 448)) -> tuple:
    """DPT through `gen1.depth.DepthEstimator` (MiDaS-style, aspect kept) on ``batch`` frames per call."""
    import torch
    from transformers import DPTImageProcessor

    from gen1.architectures import build_component
    from gen1.depth import DepthEstimator, dpt_predict

    model = build_component("depth", specs, device=device).to(dtype).eval()
    est = DepthEstimator.from_model(model, DPTImageProcessor(), device=device, batch_size=batch)
    frames = torch.randint(0, 256, (batch, *frame_hw, 3), dtype=torch.uint8)
    x = est.preprocess(frames)
    model_fps = _rate(lambda t: dpt_predict(model, t), x, iters, device)
    flops = _flops_per_item(lambda t: dpt_predict(model, t), x)
    return model_fps, flops, _rate(est, frames, iters, device), x.shape[1:]


def bench_clip(specs, dtype, device: str, batch: int, iters: int, frame_hw=(256, 448)) -> tuple:
    """CLIP image tower through `gen1.clip.ClipEmbedder` on ``batch`` frames per call."""
    import torch

    from gen1.architectures import build_component
    from gen1.clip import ClipEmbedder

    model = build_component("clip", specs, device=device).to(dtype).eval()
    emb = ClipEmbedder.from_model(model, None, device=device, batch_size=batch)
    frames = torch.randint(0, 256, (batch, *frame_hw, 3), dtype=torch.uint8)
    x = emb.preprocess(frames)
    model_fps = _rate(model.encode_image, x, iters, device)
    flops = _flops_per_item(model.encode_image, x)
    return model_fps, flops, _rate(emb.embed_images, frames, iters, device), x.shape[1:]


def bench_gpu_models(specs=None, device: str = "cuda", batch: int = 32, iters: int = 10,
                     matmul_n: int = 8192) -> dict:
    """Full-size DPT-Large and CLIP ViT-L/14 (random weights, `gen1.architectures.build_component` on
    ``device``) in bf16 (fp16 without bf16): frames/s of the bare model and of the gen1 wrapper (uint8
    448x256 frames in), and the model's FLOP rate as a fraction of the measured matmul ceiling."""
    import torch

    from gen1.config import SD15

    specs = specs or SD15
    if str(device).startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = torch.cuda.get_device_name()
    else:
        dtype, name = torch.float32, "cpu"
    ceiling = matmul_ceiling_tflops(dtype, device, n=matmul_n)
    out = {"device": name, "dtype": str(dtype), "matmul_ceiling_tflops": ceiling}
    out["dpt_large"] = _entry(*bench_depth(specs, dtype, device, batch, iters), ceiling)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    out["clip_vit_l14"] = _entry(*bench_clip(specs, dtype, device, batch, iters), ceiling)
    return out


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(OPENCV_DATA), help="directory of videos (default: opencv-doc's)")
    parser.add_argument("--models", default="tiny", help="model preset or YAML (default tiny)")
    parser.add_argument("--clips-per-video", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipelines.preprocess import PreprocessConfig
    from pipelines.runtime import init_ray
    from pipelines.sources import list_videos

    uris = list_videos(args.src)
    if not uris:
        print(f"no videos under {args.src}", file=sys.stderr)
        return 2
    cfg = PreprocessConfig(models=args.models, clips_per_video=args.clips_per_video, progress=False)
    res = cfg.resolved()
    plans = _plans(uris, res.frames, res.stride, cfg.clips_per_video, res.size)
    print(f"corpus: {len(uris)} videos from {args.src}, {len(plans)} clips of {res.frames} frames "
          f"(stride {res.stride}) at {res.size[0]}x{res.size[1]}; models {res.specs.label()}; "
          f"{os.cpu_count()} CPUs")

    results: dict = {"videos": len(uris), "clips": len(plans), "models": res.specs.label()}
    results["decode_clips_per_s"] = bench_decode(plans)
    results["naive_clips_per_s"] = bench_naive(plans, res.depth_model, res.clip_model)
    t0 = time.perf_counter()
    init_ray(num_cpus=args.num_cpus)
    results["ray_init_s"] = time.perf_counter() - t0
    results["pipeline_clips_per_s"], results["pipeline_summary"] = bench_pipeline(uris, cfg)
    results["pipeline_vs_naive"] = results["pipeline_clips_per_s"] / results["naive_clips_per_s"]
    results["pipeline_vs_decode"] = results["pipeline_clips_per_s"] / results["decode_clips_per_s"]
    print(f"decode only (floor):  {results['decode_clips_per_s']:8.2f} clips/s")
    print(f"naive sequential:     {results['naive_clips_per_s']:8.2f} clips/s")
    print(f"pipeline (Ray Data):  {results['pipeline_clips_per_s']:8.2f} clips/s  "
          f"(end to end; Ray start {results['ray_init_s']:.1f}s not included)")
    print(f"pipeline / naive:     {results['pipeline_vs_naive']:8.2f}x")
    print(f"pipeline / decode:    {results['pipeline_vs_decode']:8.2f}x")

    import torch

    if torch.cuda.is_available():
        gpu = bench_gpu_models()
        results["gpu"] = gpu
        print(f"GPU {gpu['device']} ({gpu['dtype']}): matmul ceiling {gpu['matmul_ceiling_tflops']:.0f} TFLOP/s")
        for name in ("dpt_large", "clip_vit_l14"):
            m = gpu[name]
            print(f"  {name:13s} model {m['model_frames_per_s']:8.1f} frames/s at {m['model_input']}, "
                  f"{m['gflops_per_frame']:.0f} GFLOP/frame = {m['fraction_of_ceiling']:.0%} of the matmul "
                  f"ceiling; wrapper (uint8 448x256 in) {m['wrapper_frames_per_s']:.1f} frames/s")
    else:
        print("no GPU: full-size model throughput not measured")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
