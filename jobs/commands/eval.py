"""`gen1 eval --dataset davis:URI`: edit a dataset with our model and the baselines, measure, log to MLflow.

Runs on a local Ray by default, on a cluster with ``--ray-address`` / ``$RAY_ADDRESS``, and as a Ray Job
with the same entry point::

    ray job submit --working-dir . -- python -m jobs.entrypoints.eval --config jobs/specs/eval-davis-nightly.yaml

Exit codes (`jobs.exit_codes`): 0 ok; 1 bad input or usage; 3 the regression gate failed (a gated metric
dropped beyond its threshold against the experiment's accepted baseline run; see `pipelines.regression`);
4 more than --max-failure-fraction of the videos failed; 5 another driver holds the lease of OUT/<run name>
(or of its edits); 6 the results are committed but the edit job's run record could not be written.
``gen1 eval --accept RUN_ID`` accepts a reviewed run as the baseline and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from gen1.urls import redact_url
from jobs.cli import HelpFormatter, parse_size, report_bookkeeping
from jobs.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_BOOKKEEPING,
    EXIT_DST_BUSY,
    EXIT_FAILED_FRACTION,
    EXIT_OK,
    EXIT_REGRESSED,
    help_epilog,
)
from jobs.process_exit import exit_process

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EPILOG = help_epilog(EXIT_OK, EXIT_BAD_INPUT, EXIT_REGRESSED, EXIT_FAILED_FRACTION, EXIT_DST_BUSY, EXIT_BOOKKEEPING)
BASELINES = ("per_frame", "sdedit", "no_structure")  # pipelines.evaluate.BASELINES (not imported: a fast --help)
EDITORS = ("sd-depth", "animatediff-depth", "wan-vace")  # pipelines.evaluate.config.EDITOR_BASELINES


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jobs.cli import add_models_argument

    p = sub.add_parser(
        "eval",
        help="evaluate on DAVIS / LOVEU-TGVE (edits, baselines, metrics, MLflow)",
        description="Edit every sequence of a DAVIS 2017 or LOVEU-TGVE-2023 dataset (any fsspec URI) with every "
        "setting of the grid, plus the baselines (per_frame: the image model alone on each frame; sdedit: SDEdit "
        "per frame, no structure; no_structure: SDEdit-style with the video model, no structure), compute frame "
        "consistency (consecutive and all pairs), prompt consistency, flow-warped MSE and depth fidelity, and log "
        "a run to MLflow: params, metrics (means, per method, per setting), a per-video table, the Fig. 4/6 "
        "plots and side-by-side sample videos. Tracking: --tracking-uri, else $MLFLOW_TRACKING_URI, else a "
        "local store (SQLite + artifact folder) under --out. With --edits DST, measures the outputs of an "
        "earlier `gen1 edit` job instead. Exits 3 when the regression gate fails, 4 when more than "
        "--max-failure-fraction of the videos failed (checked first).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    _add_arguments(p)
    add_models_argument(p)
    p.set_defaults(func=run, models=None)  # None: the config file's models, else EvalConfig's (tiny)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dataset", metavar="KIND:URI", help="davis:URI (JPEGImages/480p/<seq>/%%05d.jpg) or "
                      "tgve:URI (LOVEU-TGVE-2023 layout with its prompts CSV)")
    what.add_argument("--edits", metavar="DST", help="evaluate the manifest of an earlier `gen1 edit` job in DST")
    what.add_argument("--accept", metavar="RUN_ID", help="tag MLflow run RUN_ID (at --tracking-uri) as the accepted "
                      "baseline of its experiment and exit: later evals are gated against it")
    p.add_argument("--config", metavar="YAML", help="eval settings (fields of pipelines.evaluate.EvalConfig), or a "
                   "job spec from jobs/specs/ (its 'config' section); command-line options override them")
    p.add_argument("--out", metavar="URI", help="results folder (default gen1-eval): OUT/<run>/{edits,baselines,"
                   "samples,per_video.parquet}")
    p.add_argument("--steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp"), help="ddim (the paper's, default) or dpmpp")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="one axis of our model's settings per "
                   "use: ts=, w=, wt=, seed=, e.g. --grid ts=3 --grid wt=0,1.5 (default ts=3 w=7.5 wt=1.0,1.5 "
                   "seed=0); wt=0 is eq. 8 with w_t = 0, a point of the sweep")
    p.add_argument("--baselines", nargs="*", choices=BASELINES + EDITORS,
                   help="baselines to run (default the first three; give none for none): per_frame (the image model "
                   "alone, the grid's t_s), sdedit (SDEdit per frame), no_structure (the ~s ablation: SDEdit-style "
                   "with the video model); the last two with empty structure channels; and the editors sd-depth, "
                   "animatediff-depth, wan-vace (gen1 edit --editor), run through the edit pipeline with our "
                   "DPT's depth, each with the grid's w and its defaults for the rest")
    p.add_argument("--sdedit-strength", type=float, help="noise strength in (0, 1] of sdedit and no_structure "
                   "(default 0.6)")
    p.add_argument("--split", help="DAVIS split from ImageSets/2017 (train | val)")
    p.add_argument("--sequences", nargs="+", metavar="NAME", help="only these sequences")
    p.add_argument("--limit", type=int, help="only the first N sequences")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's window)")
    p.add_argument("--stride", type=int, help="source frames between edited frames (default 2)")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="edit size (default: the model's)")
    p.add_argument("--mask", choices=("none", "objects", "background"),
                   help="masked edits from DAVIS annotations: edit the objects or the background (default none)")
    p.add_argument("--prompts", nargs="+", metavar="TEXT", help="prompts for every DAVIS sequence (default: "
                   "caption each sequence and write one prompt; TGVE brings its own four)")
    p.add_argument("--prompt-kinds", nargs="+", choices=("style", "object", "background", "multiple"),
                   help="TGVE: only these prompt kinds")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else local under --out)")
    p.add_argument("--experiment", help="MLflow experiment (default gen1-eval)")
    p.add_argument("--run-name", help="MLflow run name and results subfolder (default eval-<kind>-<UTC time>)")
    p.add_argument("--sample-videos", type=int, help="side-by-side sample videos to log (default 3)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when the actor has a GPU)")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to use (default: $RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no Ray Data progress bars")
    p.add_argument("--lease-wait", dest="lease_wait_s", type=float, metavar="S",
                   help="when another eval of the same run name is writing into OUT/<run name> (holds its lease), "
                   "wait up to S seconds for it before exiting 5 (default 0: exit at once)")
    p.add_argument("--accept-baseline", action="store_true", default=None,
                   help="accept this run as the experiment's baseline if its regression gate does not fail")
    p.add_argument("--no-gate", action="store_true", help="skip the regression gate (no comparison with the "
                   "accepted baseline; the run is tagged gen1.regression=disabled)")
    p.add_argument("--max-failure-fraction", type=float, default=0.1,
                   help="exit 4 when more than this fraction of the videos failed (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def resolve_path(path: str) -> str:
    """A config path as given, or relative to the repository / installed package (job specs refer to
    ``jobs/specs/...`` whatever the working directory of the Ray Job is)."""
    if Path(path).is_file() or Path(path).is_absolute():
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.is_file() else path


def config_from_args(args: argparse.Namespace):
    from pipelines.edit import EditGrid
    from pipelines.evaluate import EvalConfig

    grid = dataclasses.asdict(EditGrid.parse(args.grid)) if args.grid else None
    overrides = {
        "dataset": args.dataset, "edits": args.edits, "out": args.out, "models": args.models, "steps": args.steps,
        "sampler": args.sampler, "grid": grid, "sdedit_strength": args.sdedit_strength, "split": args.split,
        "sequences": args.sequences, "limit": args.limit, "frames": args.frames, "stride": args.stride,
        "size": args.size, "mask": args.mask, "prompts": args.prompts, "prompt_kinds": args.prompt_kinds,
        "tracking_uri": args.tracking_uri, "experiment": args.experiment, "run_name": args.run_name,
        "sample_videos": args.sample_videos, "device": args.device, "ray_address": args.ray_address,
        "num_cpus": args.num_cpus, "accept_baseline": args.accept_baseline,
        "lease_wait_s": args.lease_wait_s, "progress": args.progress,
        "baselines": None if args.baselines is None else tuple(args.baselines),
    }
    if args.config:
        cfg = EvalConfig.from_yaml(resolve_path(args.config), **overrides)
    else:
        cfg = EvalConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_gate:
        cfg.gate.enabled = False
    return cfg


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate import run_eval

    if args.accept:
        return accept(args)
    cfg = config_from_args(args)
    summary = run_eval(cfg)
    if args.json:
        json.dump(summary.as_dict(), sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(summary.line())
        print(f"per-video table: {summary.table_uri}")
        print(f"MLflow: tracking {redact_url(summary.tracking_uri)}, run {summary.run_id}, artifacts {summary.artifact_uri}")
        for sample in summary.samples:
            print(f"sample: {sample}")
        print(summary.gate_line)
    if summary.tiny_models:
        print("NOTE: TINY RANDOM MODELS - these numbers check the plumbing; they are not results.", file=sys.stderr)
    code = EXIT_BOOKKEEPING if report_bookkeeping(summary.bookkeeping_errors, summary.out) else EXIT_OK
    fraction = summary.failure_fraction
    if fraction > args.max_failure_fraction:
        print(f"FAILED: {summary.failed} of {summary.videos} videos failed ({fraction:.1%} > "
              f"{args.max_failure_fraction:.1%}); see the errors table {summary.out.rstrip('/')}/errors/", file=sys.stderr)
        return EXIT_FAILED_FRACTION
    if summary.regressed:
        from pipelines.regression import WORST_ARTIFACT

        print(f"REGRESSED: {summary.gate_line}; worst videos in artifact {WORST_ARTIFACT} of run {summary.run_id}",
              file=sys.stderr)
        return EXIT_REGRESSED
    return code


def accept(args: argparse.Namespace) -> int:
    """``--accept RUN_ID``: tag the run as the accepted baseline (tracking URI from --tracking-uri or env)."""
    import os

    from pipelines.regression import accept_baseline

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("--accept needs the MLflow server: pass --tracking-uri URI or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return EXIT_BAD_INPUT
    accept_baseline(uri, args.accept)
    print(f"run {args.accept} accepted as baseline at {redact_url(uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m jobs.commands.eval` (e.g. `ray job submit`)."""
    from jobs.cli import standalone_main

    return standalone_main("gen1 eval", __doc__.splitlines()[0], _add_arguments, run, argv, EPILOG)


if __name__ == "__main__":
    exit_process(main())
