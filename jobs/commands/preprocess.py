"""`gen1 preprocess SRC DST`: build training feature shards (depth, CLIP embeddings, frames) with Ray Data.

Runs on a local Ray by default, on a cluster with ``--ray-address`` / ``$RAY_ADDRESS``, and as a Ray Job
with the same entry point::

    ray job submit --working-dir . -- python -m jobs.commands.preprocess s3://corpus s3://features
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import HelpFormatter, parse_size, report_bookkeeping
from jobs.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_BOOKKEEPING,
    EXIT_DST_BUSY,
    EXIT_FAILED_FRACTION,
    EXIT_OK,
    help_epilog,
)
from jobs.process_exit import exit_process

log = logging.getLogger(__name__)


EPILOG = help_epilog(EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED_FRACTION, EXIT_DST_BUSY, EXIT_BOOKKEEPING)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jobs.cli import add_models_argument

    p = sub.add_parser(
        "preprocess",
        help="videos -> Parquet feature shards (depth, CLIP embeddings, frames) with Ray Data",
        description="Sample clips from every video under SRC (a directory or prefix at any fsspec location, "
        "one video, or a CSV/Parquet manifest with a 'uri' column), compute per-frame depth and CLIP image "
        "embeddings (and optionally VAE latents), and write Parquet shards under DST/shards. Failed videos "
        "and clips go to DST/errors; a rerun over the same DST writes only the missing clips. Exits 4 when "
        "the failed fraction (this run's failed clips over the clips committed in DST plus those; "
        "quarantined ones not counted) exceeds --max-failure-fraction. One driver at a time writes into DST: "
        "a second one waits --lease-wait seconds for the first, then exits 5.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    _add_arguments(p)
    add_models_argument(p)
    p.set_defaults(func=run, models=None)  # None: the config file's models, else PreprocessConfig's (tiny)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="videos: directory/prefix, one video, or a .csv/.parquet manifest")
    p.add_argument("dst", metavar="DST", help="output location (local path or fsspec URI such as s3://...)")
    p.add_argument("--config", metavar="YAML", help="preprocess settings (fields of PreprocessConfig); "
                   "command-line options override them")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to use (default: $RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the preset's; 8 for sd15)")
    p.add_argument("--stride", type=int, help="source frames between sampled frames (default: preset's; 4)")
    p.add_argument("--clips-per-video", type=int, help="clips per video, evenly spread (default: all)")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="landscape output size; portrait is transposed "
                   "(default: the preset's, 448x256)")
    p.add_argument("--shard-size", type=int, help="clips per shard file (default 64)")
    p.add_argument("--latents", action="store_true", default=None, help="also store VAE latents of the frames")
    p.add_argument("--no-frames", dest="store_frames", action="store_false", default=None,
                   help="do not store the resized frames")
    p.add_argument("--frames-format", choices=("jpeg", "raw"), help="how frames are stored (default jpeg)")
    p.add_argument("--max-failure-fraction", type=float, help="exit 4 when failed / (committed in DST + failed) "
                   "is above this (default 0.1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no Ray Data progress bars")
    p.add_argument("--decode-timeout", dest="decode_timeout_s", type=float, metavar="S",
                   help="seconds per probe and per clip decode before the clip is recorded as a 'timeout' "
                   "error (default 120; 0: no limit)")
    p.add_argument("--model-timeout", dest="model_timeout_s", type=float, metavar="S",
                   help="seconds per model call (default 600; 0: no limit)")
    p.add_argument("--max-concurrent-decodes", type=int, metavar="N",
                   help="decode tasks in flight at once (default: the task pool's size)")
    p.add_argument("--target-shard-bytes", type=int, metavar="BYTES",
                   help="size shard files by bytes (about this many, uncompressed) instead of --shard-size clips")
    p.add_argument("--retry-quarantined", action="store_true", default=None,
                   help="process inputs that failed in two runs again (default: skip them; see DST/quarantine)")
    p.add_argument("--lease-wait", dest="lease_wait_s", type=float, metavar="S",
                   help="when another driver is writing into DST (holds its lease), wait up to S seconds for it "
                   "to finish before exiting 5 (default 0: exit at once)")


_HARDENING_OPTIONS = ("decode_timeout_s", "model_timeout_s", "max_concurrent_decodes", "retry_quarantined",
                      "target_shard_bytes", "lease_wait_s")


def config_from_args(args: argparse.Namespace):
    from pipelines.preprocess import PreprocessConfig

    overrides = {
        "models": args.models, "ray_address": args.ray_address, "num_cpus": args.num_cpus,
        "frames": args.frames, "stride": args.stride, "clips_per_video": args.clips_per_video,
        "size": args.size, "shard_size": args.shard_size, "latents": args.latents,
        "store_frames": args.store_frames, "frames_format": args.frames_format,
        "max_failure_fraction": args.max_failure_fraction, "progress": args.progress,
    }
    for name in _HARDENING_OPTIONS:  # getattr: callers that build args by hand may predate these options
        overrides[name] = getattr(args, name, None)
    if args.config:
        return PreprocessConfig.from_yaml(args.config, **overrides)
    return PreprocessConfig(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from pipelines.preprocess import run_preprocess

    cfg = config_from_args(args)
    summary = run_preprocess(args.src, args.dst, cfg)
    print(summary.line())
    code = EXIT_BOOKKEEPING if report_bookkeeping(summary.bookkeeping_errors, args.dst) else EXIT_OK
    if summary.failure_fraction > cfg.max_failure_fraction:
        print(
            f"FAILED: {summary.failed} clips failed in this run, {summary.committed} are committed in {args.dst} "
            f"({summary.failure_fraction:.1%} > max {cfg.max_failure_fraction:.1%}); see {args.dst}/errors",
            file=sys.stderr,
        )
        return EXIT_FAILED_FRACTION
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m jobs.commands.preprocess` (e.g. `ray job submit`)."""
    from jobs.cli import standalone_main

    return standalone_main("gen1 preprocess", __doc__.splitlines()[0], _add_arguments, run, argv, EPILOG)


if __name__ == "__main__":
    exit_process(main())
