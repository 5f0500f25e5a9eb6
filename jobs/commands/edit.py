"""`gen1 edit SRC DST`: mass-edit a footage library with Ray Data (`pipelines.edit`).

Every clip x prompt x settings grid x seed becomes an mp4, a side-by-side preview and a manifest row with
its metrics. Runs on a local Ray by default, on a cluster with ``--ray-address`` / ``$RAY_ADDRESS``, and
as a Ray Job with the same entry point::

    ray job submit --working-dir . -- python -m jobs.commands.edit s3://footage s3://edits --auto-prompts 3
"""

from __future__ import annotations

import argparse
import json
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
        "edit",
        help="mass-edit a footage library (Ray Data)",
        description="Edit every clip of SRC with every prompt and every combination of the settings grid. "
        "Writes DST/outputs/<clip>/<edit>.mp4 with a preview (input | depth | output) beside it, and one row "
        "per output in DST/manifest (Parquet: settings, metrics, model ids). Reruns skip finished edits; "
        "failures land in DST/errors. Prompts: --prompts FILE, --auto-prompts N (BLIP caption -> N prompts, "
        "by templates, or by an OpenAI-compatible endpoint when --llm-base-url or $GEN1_LLM_BASE_URL is "
        "set), or 'prompt'/'image' columns of a SRC manifest. Exits 4 when the failed fraction (this run's "
        "failed edits and clips over the edits committed in DST plus those) exceeds --max-failure-fraction, "
        "or when the edit stream stopped early. One driver at a time writes into DST: a second one waits "
        "--lease-wait seconds for the first, then exits 5.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    _add_arguments(p)
    add_models_argument(p)
    p.set_defaults(func=run, models=None)  # None: the config file's models, else EditJobConfig's (tiny)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # long: one add_argument call per option of `gen1 edit`, in the order --help lists them
    p.add_argument(
        "src",
        metavar="SRC",
        help="videos: a directory/prefix (any fsspec URI), one video, or a "
        ".csv/.parquet manifest with a 'uri' column (optional 'prompt', 'image', 'mask', 'caption')",
    )
    p.add_argument("dst", metavar="DST", help="output location (local path or fsspec URI such as s3://...)")
    p.add_argument(
        "--config",
        metavar="YAML",
        help="edit settings (fields of pipelines.edit.EditJobConfig); command-line options override them",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--prompts", metavar="FILE", help="one prompt per line; 'image:URI' names a reference image"
    )
    what.add_argument(
        "--auto-prompts",
        type=int,
        metavar="N",
        help="caption each clip (BLIP) and write N edit prompts from the caption",
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="one axis of the settings grid per use: ts= (structure strength 0..7; more = less structure "
        "kept), w= (content guidance), wt= (temporal guidance), seed=, editor= (several editors in one run), "
        "strength= (SDEdit strength of sd-depth, animatediff-depth), cn= (depth conditioning scale of "
        "animatediff-depth, wan-vace); e.g. --grid ts=1,5 --grid wt=1.0,1.5 --grid seed=0,1 --grid "
        "editor=gen1,sd-depth (defaults: ts=3 w=7.5 wt=1.0 seed=0 editor=gen1 strength=0.8 cn=1.0). An editor "
        "asked a setting it does not take fails at once",
    )
    p.add_argument(
        "--editor",
        choices=("gen1", "sd-depth", "animatediff-depth", "wan-vace"),
        help="the editor (default gen1, ours): sd-depth (SD 2 depth per frame, the paper's baseline), "
        "animatediff-depth (SD 1.5 + AnimateDiff + ControlNet depth), wan-vace (Wan 2.1 VACE); the same as "
        "--grid editor=NAME",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp"), help="ddim (the paper's, default) or dpmpp")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's window, 8 for sd15)")
    p.add_argument("--stride", type=int, help="source frames between edited frames (default 1)")
    p.add_argument("--clips-per-video", type=int, help="clips per video, evenly spread (default 1; 0 = all)")
    p.add_argument(
        "--size",
        type=parse_size,
        metavar="WxH",
        help="landscape edit size; portrait is transposed (default: the preset's, 448x256)",
    )
    p.add_argument("--limit", type=int, help="edit only the first N clips")
    p.add_argument(
        "--no-previews",
        dest="previews",
        action="store_false",
        default=None,
        help="skip the side-by-side previews",
    )
    p.add_argument(
        "--no-metrics", dest="metrics", action="store_false", default=None, help="skip the per-output metrics"
    )
    p.add_argument(
        "--llm-base-url",
        metavar="URL",
        help="OpenAI-compatible endpoint for --auto-prompts "
        "(default: $GEN1_LLM_BASE_URL; none: offline templates); key from $GEN1_LLM_API_KEY or "
        "$OPENAI_API_KEY",
    )
    p.add_argument("--llm-model", help="chat model (default: $GEN1_LLM_MODEL, else gpt-4o-mini)")
    p.add_argument(
        "--edit-concurrency", type=int, help="edit actors (default: one per GPU, else one per 4 CPUs)"
    )
    p.add_argument("--edit-batch-size", type=int, help="edits per actor call (default 1)")
    p.add_argument(
        "--commit-every",
        type=int,
        help="manifest rows per committed part; a killed run redoes at "
        "most this many finished edits (default 8)",
    )
    p.add_argument(
        "--max-failure-fraction",
        type=float,
        help="exit 4 when failed / (committed in DST + failed) is above this (default 0.1)",
    )
    p.add_argument(
        "--decode-timeout",
        dest="decode_timeout_s",
        type=float,
        metavar="S",
        help="seconds per clip decode before it is recorded as a 'timeout' error (default 120; 0: no limit)",
    )
    p.add_argument(
        "--caption-timeout",
        dest="caption_timeout_s",
        type=float,
        metavar="S",
        help="seconds per BLIP call (default 600; 0: no limit)",
    )
    p.add_argument(
        "--edit-timeout",
        dest="edit_timeout_s",
        type=float,
        metavar="S",
        help="seconds per edit task: decode, sampling, metrics, writing (default 3600; 0: no limit)",
    )
    p.add_argument(
        "--lease-wait",
        dest="lease_wait_s",
        type=float,
        metavar="S",
        help="when another driver is writing into DST (holds its lease), wait up to S seconds for it to "
        "finish before exiting 5 (default 0: exit at once)",
    )
    p.add_argument("--device", help="cpu | cuda (default: cuda when the actor has a GPU)")
    p.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster to use (default: $RAY_ADDRESS, else local)"
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no Ray Data progress bars"
    )


def _grid(args: argparse.Namespace):
    """The --grid entries, with --editor NAME as the entry editor=NAME; None when neither is given."""
    from gen1.config import ConfigError
    from pipelines.edit import EditGrid

    entries = list(args.grid or [])
    if args.editor:
        if any(e.partition("=")[0].strip().lower() == "editor" for e in entries):
            raise ConfigError("--editor and --grid editor=...: give the editors once")
        entries.append(f"editor={args.editor}")
    return EditGrid.parse(entries) if entries else None


def config_from_args(args: argparse.Namespace):
    """EditJobConfig from the options, on top of --config YAML when given; unset options keep its values."""
    from gen1.prompts import ChatConfig
    from pipelines.edit import EditJobConfig

    overrides = {
        "src": args.src,
        "dst": args.dst,
        "models": args.models,
        "prompts_file": args.prompts,
        "auto_prompts": args.auto_prompts,
        "grid": _grid(args),
        "steps": args.steps,
        "sampler": args.sampler,
        "frames": args.frames,
        "stride": args.stride,
        "clips_per_video": args.clips_per_video,
        "size": args.size,
        "limit": args.limit,
        "previews": args.previews,
        "metrics": args.metrics,
        "edit_concurrency": args.edit_concurrency,
        "edit_batch_size": args.edit_batch_size,
        "commit_every": args.commit_every,
        "max_failure_fraction": args.max_failure_fraction,
        "decode_timeout_s": args.decode_timeout_s,
        "caption_timeout_s": args.caption_timeout_s,
        "edit_timeout_s": args.edit_timeout_s,
        "lease_wait_s": args.lease_wait_s,
        "device": args.device,
        "ray_address": args.ray_address,
        "num_cpus": args.num_cpus,
        "progress": args.progress,
    }
    if args.llm_base_url or args.llm_model:
        overrides["llm"] = ChatConfig.from_env(base_url=args.llm_base_url, model=args.llm_model)
    if args.config:
        cfg = EditJobConfig.from_yaml(args.config, **overrides)
    else:
        cfg = EditJobConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.clips_per_video == 0:
        cfg.clips_per_video = None  # every clip
    return cfg


def run(args: argparse.Namespace) -> int:
    from pipelines.edit import run_edit

    cfg = config_from_args(args)
    summary = run_edit(cfg)
    json.dump(summary.as_dict(), sys.stdout, default=str)
    print()
    print(summary.line())
    code = EXIT_BOOKKEEPING if report_bookkeeping(summary.bookkeeping_errors, args.dst) else EXIT_OK
    if summary.error:
        print(f"FAILED: the edit stream stopped early ({summary.error}); rerun to finish", file=sys.stderr)
        return EXIT_FAILED_FRACTION
    if summary.failure_fraction > cfg.max_failure_fraction:
        print(
            f"FAILED: {summary.failed} edits and {summary.clips_failed} clips failed in this run, "
            f"{summary.committed} edits are committed in {args.dst} "
            f"({summary.failure_fraction:.1%} > max {cfg.max_failure_fraction:.1%}); see {args.dst}/errors",
            file=sys.stderr,
        )
        return EXIT_FAILED_FRACTION
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m jobs.commands.edit` (e.g. `ray job submit`)."""
    from jobs.cli import standalone_main

    return standalone_main("gen1 edit", __doc__.splitlines()[0], _add_arguments, run, argv, EPILOG)


if __name__ == "__main__":
    exit_process(main())
