"""Benchmark the preprocess pipeline on real footage, in one run, against the decode floor and a plain loop.

    python jobs/benchmarks/preprocess_bench.py [--src DIR] [--min-clips 500] [--models tiny] [--repeats N] [--json OUT]

The corpus is the videos under ``--src`` (default: opencv-doc's clips), copied under new names until
their planned clips (the preset's frames, stride and size; every non-overlapping clip, or
``--clips-per-video``) reach ``--min-clips``. Measured, one after another on an otherwise idle machine:

- ``floor``: decode every frame of every video once, one pass each (PyAV, FFmpeg threads): what any design
  pays at least;
- ``plain``: a plain single-process loop: decode each video once, cutting its clips as they complete
  (`gen1.decoding.decode_clips`), run the same depth and CLIP models (loaded beforehand), JPEG the frames,
  write one Parquet file;
- ``pipeline``: `pipelines.preprocess.run_preprocess` on a local Ray, end to end (planning, actor start and
  model loading included: the number a user sees), into a fresh temp DST, with Ray Data's per-operator times.

It prints clips/s of each, pipeline / plain, and the decode stage's summed task time against the floor.
``--repeats N`` measures plain, plain (fresh) and pipeline N times, interleaved (a slow spell of a shared
machine then hits every arm), and reports the median of each and the range of the per-round ratios; the
operator table is the median pipeline round's.
With a GPU it also measures frames/s of the full-size DPT-Large and CLIP ViT-L/14 (random weights,
`gen1.architectures.build_component` on the GPU) and the fraction of the measured matmul ceiling their
FLOPs reach.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jobs.process_exit import exit_process

log = logging.getLogger("preprocess_bench")

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def build_corpus(uris: list[str], min_clips: int, frames: int, stride: int, clips_per_video, size, root: Path):
    """Copies of ``uris`` under ``root`` (symlinks, distinct names, so distinct clip ids) until their plans
    reach ``min_clips``; returns {copy: its ClipPlans}."""
    from pipelines.sources import plan_video

    originals = {u: plan_video(u, frames, stride, clips_per_video, size) for u in uris}
    if not any(originals.values()):
        raise ValueError("no video under --src yields a clip")
    corpus: dict[str, list] = {}
    k = 0
    while sum(len(p) for p in corpus.values()) < min_clips:
        for u in uris:
            copy = root / f"r{k:03d}-{Path(u).name}"
            copy.symlink_to(u)
            corpus[str(copy)] = plan_video(str(copy), frames, stride, clips_per_video, size)
        k += 1
    return corpus


def bench_floor(uris: list[str]) -> float:
    """Seconds to decode every frame of every video once (PyAV, one pass, frame and slice threads)."""
    import av

    t0 = time.perf_counter()
    for u in uris:
        with av.open(u) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
    return time.perf_counter() - t0


def bench_plain(corpus: dict, depth_spec: str, clip_spec: str) -> float:
    """Seconds of one process doing the work: decode each video once, depth, CLIP, JPEG, one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gen1.clip import ClipEmbedder
    from gen1.decoding import ClipRequest, decode_clips
    from gen1.depth import DepthEstimator
    from pipelines.schema import encode_array, encode_frames

    depth, clip = DepthEstimator(depth_spec), ClipEmbedder(clip_spec)
    t0 = time.perf_counter()
    rows = []
    for uri, plans in corpus.items():
        requests = [ClipRequest(tuple(p.frame_indices), (p.width, p.height)) for p in plans]
        for i, frames in decode_clips(uri, requests):
            rows.append({
                "clip_id": plans[i].clip_id,
                "depth": encode_array(depth(frames).float().cpu().numpy())[0],
                "clip_embedding": encode_array(clip.embed_images(frames).float().cpu().numpy())[0],
                "frames": encode_frames(frames, "jpeg"),
            })
    pq.write_table(pa.Table.from_pylist(rows), io.BytesIO(), compression="zstd")
    return time.perf_counter() - t0


def bench_plain_fresh(corpus: dict, depth_spec: str, clip_spec: str, root: Path) -> float:
    """Seconds of `bench_plain` in a fresh Python process, imports and model loading included (what the
    pipeline's actors pay too): wall time of the whole process."""
    import subprocess

    plans = root / "plans.json"
    plans.write_text(json.dumps({u: [p.as_dict() for p in ps] for u, ps in corpus.items()}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--plain-only", str(plans), "--depth", depth_spec, "--clip", clip_spec],
                   check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                       str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))})
    return time.perf_counter() - t0


def _plain_only(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("plans")
    parser.add_argument("--depth", required=True)
    parser.add_argument("--clip", required=True)
    args = parser.parse_args(argv)
    from pipelines.sources import ClipPlan

    corpus = {u: [ClipPlan(**p) for p in ps] for u, ps in json.loads(Path(args.plans).read_text()).items()}
    bench_plain(corpus, args.depth, args.clip)
    return 0


def bench_pipeline(uris: list[str], cfg) -> tuple[float, dict]:
    from pipelines.preprocess import run_preprocess

    with tempfile.TemporaryDirectory(prefix="gen1-bench-") as tmp:
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text("uri\n" + "\n".join(uris) + "\n")
        summary = run_preprocess(str(manifest), str(Path(tmp) / "dst"), cfg)
    if summary.failed:
        raise RuntimeError(f"the pipeline failed {summary.failed} clips: {summary.line()}")
    return summary.seconds, summary.as_dict()


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


def combine_rounds(rounds: list[dict], clips: int, floor_s: float) -> dict:
    """The report's figures from the timed rounds (each ``plain_s``, ``plain_fresh_s``, ``pipeline_s`` and the
    pipeline's Ray Data ``summary``): the median of each arm, the ratios of the medians with the range of the
    per-round ratios, and the steady state and decode figures of the median pipeline round's operators."""
    results: dict = {"floor_s": floor_s}
    for key in ("plain_s", "plain_fresh_s", "pipeline_s"):
        results[key] = statistics.median(r[key] for r in rounds)
    summary = sorted(rounds, key=lambda r: r["pipeline_s"])[(len(rounds) - 1) // 2]["summary"]
    results["rounds"] = [{k: v for k, v in r.items() if k != "summary"} for r in rounds]
    results["pipeline_summary"] = summary
    for name in ("floor", "plain", "plain_fresh", "pipeline"):
        results[f"{name}_clips_per_s"] = clips / results[f"{name}_s"]
    results["pipeline_vs_plain"] = results["plain_s"] / results["pipeline_s"]
    results["pipeline_vs_plain_fresh"] = results["plain_fresh_s"] / results["pipeline_s"]
    for name, key in (("pipeline_vs_plain", "plain_s"), ("pipeline_vs_plain_fresh", "plain_fresh_s")):
        ratios = [r[key] / r["pipeline_s"] for r in rounds]
        results[f"{name}_range"] = [min(ratios), max(ratios)]
    ops = summary["stage_seconds"]
    # steady state: clips over the busiest stage's active window (actor start and drain left out)
    busiest = max((v for k, v in ops.items() if k.startswith("MapBatches")), key=lambda v: v["function_body_s"])
    results["pipeline_steady_clips_per_s"] = clips / busiest["active_s"]
    results["steady_vs_plain"] = results["pipeline_steady_clips_per_s"] / results["plain_clips_per_s"]
    decode = next((v for k, v in ops.items() if "DecodeStage" in k), {})
    results["decode_task_s"] = decode.get("function_body_s", float("nan"))
    results["decode_vs_floor"] = results["decode_task_s"] / results["floor_s"]
    return results


def main(argv: list[str] | None = None) -> int:  # long: argument parsing, three measurements, the report
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(OPENCV_DATA), help="directory of videos (default: opencv-doc's)")
    parser.add_argument("--models", default="tiny", help="model preset or YAML (default tiny)")
    parser.add_argument("--min-clips", type=int, default=500, help="repeat the videos until this many clips")
    parser.add_argument("--clips-per-video", type=int, default=None, help="default: every non-overlapping clip")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--config", metavar="YAML", help="preprocess settings of the pipeline run (as gen1 preprocess --config)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of plain, plain (fresh), pipeline (medians)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipelines.preprocess import PreprocessConfig
    from pipelines.runtime import init_ray
    from pipelines.sources import list_videos

    originals = list_videos(args.src)
    if not originals:
        print(f"no videos under {args.src}", file=sys.stderr)
        return 2
    settings = dict(models=args.models, clips_per_video=args.clips_per_video, progress=False, num_cpus=args.num_cpus)
    cfg = PreprocessConfig.from_yaml(args.config, **settings) if args.config else PreprocessConfig(**settings)
    res = cfg.resolved()
    with tempfile.TemporaryDirectory(prefix="gen1-bench-corpus-") as tmp:
        corpus = build_corpus(originals, args.min_clips, res.frames, res.stride, cfg.clips_per_video, res.size,
                              Path(tmp))
        uris, clips = list(corpus), sum(len(p) for p in corpus.values())
        print(f"corpus: {len(uris)} videos ({len(originals)} from {args.src}, repeated), {clips} clips of "
              f"{res.frames} frames (stride {res.stride}) at {res.size[0]}x{res.size[1]}; models "
              f"{res.specs.label()}; {os.cpu_count()} CPUs")
        results: dict = {"videos": len(uris), "clips": clips, "models": res.specs.label(), "cpus": os.cpu_count()}
        results["floor_s"] = bench_floor(uris)
        rounds = []
        for r in range(max(1, args.repeats)):
            plain = bench_plain(corpus, res.depth_model, res.clip_model)
            fresh = bench_plain_fresh(corpus, res.depth_model, res.clip_model, Path(tmp))
            if r == 0:
                t0 = time.perf_counter()
                init_ray(num_cpus=args.num_cpus)
                results["ray_init_s"] = time.perf_counter() - t0
            pipeline, summary = bench_pipeline(uris, cfg)
            rounds.append({"plain_s": plain, "plain_fresh_s": fresh, "pipeline_s": pipeline, "summary": summary})
            if args.repeats > 1:
                print(f"round {r + 1}: plain {plain:.1f} s, plain (fresh) {fresh:.1f} s, pipeline {pipeline:.1f} s: "
                      f"{plain / pipeline:.2f}x / {fresh / pipeline:.2f}x")
    results.update(combine_rounds(rounds, clips, results["floor_s"]))
    print(f"decode floor (one pass):   {results['floor_s']:7.1f} s  {results['floor_clips_per_s']:7.2f} clips/s")
    print(f"plain decode-once loop:    {results['plain_s']:7.1f} s  {results['plain_clips_per_s']:7.2f} clips/s")
    print(f"pipeline (Ray Data):       {results['pipeline_s']:7.1f} s  {results['pipeline_clips_per_s']:7.2f} clips/s "
          f"(end to end; Ray start {results['ray_init_s']:.1f} s not included)")
    print(f"plain loop, fresh process: {results['plain_fresh_s']:7.1f} s  {results['plain_fresh_clips_per_s']:7.2f} clips/s "
          "(imports and model loading included)")
    def spread(name: str) -> str:
        return "" if len(rounds) == 1 else " (rounds {:.2f}-{:.2f}x)".format(*results[f"{name}_range"])

    print(f"pipeline / plain:          {results['pipeline_vs_plain']:7.2f}x throughput (plain with models preloaded)"
          + spread("pipeline_vs_plain"))
    print(f"pipeline / plain (fresh):  {results['pipeline_vs_plain_fresh']:7.2f}x throughput (both end to end)"
          + spread("pipeline_vs_plain_fresh"))
    print(f"pipeline steady state:     {results['pipeline_steady_clips_per_s']:7.2f} clips/s over its busiest stage's "
          f"active window = {results['steady_vs_plain']:.2f}x the plain loop")
    print(f"decode stage / floor:      {results['decode_vs_floor']:7.2f}x ({results['decode_task_s']:.1f} s of task time)")
    print("Ray Data operators (summed over tasks): UDF s, task wall s, active s, rows out")
    for name, v in results["pipeline_summary"]["stage_seconds"].items():
        print(f"  {name:34s} {v['function_body_s']:8.1f} {v['task_wall_s']:8.1f} {v['active_s']:8.1f} {int(v['rows']):6d}")

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
    exit_process(_plain_only(sys.argv[2:]) if sys.argv[1:2] == ["--plain-only"] else main())
