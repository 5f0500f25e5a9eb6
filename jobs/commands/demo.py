"""`gen1 demo`: preprocess -> edit -> eval on real footage with tiny models, all local, in minutes.

Nothing needs a GPU, weights, a cluster or a server: a local Ray, local files under ``--out`` and a local
MLflow store (SQLite + artifact folder) under ``--out/mlflow``. The footage: the videos given with
``--videos``; else Debian's ``opencv-doc`` clips vtest.avi and tree.avi (``apt-get install opencv-doc``;
looked for in ``$GEN1_OPENCV_DATA``, default /usr/share/doc/opencv-doc/examples/data); else the few
seconds of them that ship with gen1 (jobs/demo_footage/, re-encoded excerpts; their licence is beside
them). The demo says which it used. The models are tiny random models of the real classes, so every
output is a plumbing check, labelled TINY RANDOM MODELS.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from gen1.urls import redact_url
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

OPENCV_DATA_ENV = "GEN1_OPENCV_DATA"
OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"  # Debian's opencv-doc
DEFAULT_CLIPS = ("vtest.avi", "tree.avi")
PACKAGED_FOOTAGE = Path(__file__).resolve().parent.parent / "demo_footage"  # excerpts of DEFAULT_CLIPS
PACKAGED_CLIPS = ("vtest.mp4", "tree.mp4")
DEFAULT_PROMPT = "a watercolor painting of the scene"
DEMO_EXIT_NOTE = "\n(the demo's limit is 0: exit 4 when any step failed a clip, an edit or a video)"
TINY_BANNER = "TINY RANDOM MODELS: every output below is a plumbing check, not a real edit"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="preprocess -> edit -> eval on real footage with tiny models (local, minutes)",
        description=__doc__,
        epilog=help_epilog(EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED_FRACTION, EXIT_DST_BUSY, EXIT_BOOKKEEPING) + DEMO_EXIT_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gen1-demo", metavar="DIR", help="where everything goes (default ./gen1-demo)")
    p.add_argument("--videos", nargs="+", metavar="PATH", help=f"videos to use (default: {', '.join(DEFAULT_CLIPS)} "
                   f"from ${OPENCV_DATA_ENV} or {OPENCV_DATA}, else the excerpts of them in {PACKAGED_FOOTAGE})")
    p.add_argument("--clips", type=int, default=2, help="how many of the videos to use (default 2)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"edit prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--auto-prompts", action="store_true",
                   help="caption each clip (tiny BLIP) and write a prompt from the caption instead of --prompt")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: a local store under DIR/mlflow)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def footage_sources(videos: list[str] | None) -> tuple[list[Path], str]:
    """The demo's videos and where they come from, in words: ``videos``; else opencv-doc's `DEFAULT_CLIPS`
    when all are there; else the packaged excerpts of them. `FileNotFoundError` names what is missing."""
    if videos:
        sources, origin = [Path(v) for v in videos], "--videos"
    else:
        opencv = Path(os.environ.get(OPENCV_DATA_ENV) or OPENCV_DATA)
        sources, origin = [opencv / name for name in DEFAULT_CLIPS], f"opencv-doc ({opencv})"
        if not all(s.is_file() for s in sources):
            sources = [PACKAGED_FOOTAGE / name for name in PACKAGED_CLIPS]
            origin = (f"gen1's excerpts of opencv-doc's clips ({PACKAGED_FOOTAGE}; opencv-doc's full clips are "
                      f"not in {opencv}: apt-get install opencv-doc)")
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"demo footage not found: {', '.join(missing)} (from {origin})")
    return sources, origin


def _footage(args: argparse.Namespace, dst: Path) -> tuple[list[Path], str]:
    """Copy the demo videos into ``dst`` (the preprocess and edit source folder); the copies and their origin."""
    sources, origin = footage_sources(args.videos)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources[: max(1, args.clips)]:
        target = dst / src.name
        if not target.exists():
            shutil.copyfile(src, target)
        out.append(target)
    return out, origin


def run(args: argparse.Namespace) -> int:
    import ray

    from gen1.config import TINY
    from gen1.prompts import PromptSpec
    from pipelines.edit import EditGrid, EditJobConfig, run_edit
    from pipelines.evaluate import evaluate_edits
    from pipelines.preprocess import PreprocessConfig, run_preprocess
    from pipelines.runtime import init_ray

    t0 = time.monotonic()
    out = Path(args.out).resolve()
    footage = out / "footage"
    features, edits, results = out / "features", out / "edits", out / "eval"
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"
    (out / "mlflow").mkdir(parents=True, exist_ok=True)
    print(f"gen1 demo -> {out}\n{TINY_BANNER}", flush=True)
    videos, origin = _footage(args, footage)
    print(f"footage: {', '.join(v.name for v in videos)} from {origin}", flush=True)

    started = init_ray(None, args.num_cpus or os.cpu_count())  # one local Ray for the three stages
    try:
        print("[1/3] preprocess: clips -> depth + CLIP features (Parquet)", flush=True)
        pre = run_preprocess(str(footage), str(features), PreprocessConfig(models="tiny", clips_per_video=1,
                                                                           progress=False))
        print(f"      {pre.line()}", flush=True)
        print("[2/3] edit: our video model with eq. 8 at w_t = 1 (plain CFG) and at w_t = 0 (no temporal guidance; "
              "not the image model alone)", flush=True)
        edit_cfg = EditJobConfig(
            src=str(footage), dst=str(edits), models="tiny", steps=args.steps, clips_per_video=1,
            grid=EditGrid(t_s=(3,), w=(7.5,), w_t=(1.0, 0.0), seeds=(0,)),
            prompts=() if args.auto_prompts else (PromptSpec(text=args.prompt),),
            auto_prompts=1 if args.auto_prompts else 0, metrics=False, progress=False,  # eval measures
        )
        ed = run_edit(edit_cfg)
        print(f"      {ed.line()}", flush=True)
        print("[3/3] eval: metrics on an actor pool -> MLflow", flush=True)
        ev = evaluate_edits(str(edits), str(results), models="tiny", tracking_uri=tracking_uri,
                            experiment="gen1-demo", run_name="demo", sample_videos=len(videos), progress=False)
        print(f"      {ev.line()}", flush=True)
    finally:
        if started:
            ray.shutdown()

    db = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None
    lines = [
        "",
        f"=== gen1 demo finished in {time.monotonic() - t0:.0f}s; models: {TINY.label()} ===",
        TINY_BANNER,
        f"footage (input videos):        {footage}",
        f"feature shards (preprocess):   {features / 'shards'}   errors: {features / 'errors'}",
        *_edit_lines(edits),
        f"edit manifest (Parquet):       {edits / 'manifest'}",
        f"per-video metrics table:       {ev.table_uri}",
        *[f"side-by-side sample video:     {s}" for s in ev.samples],
        f"MLflow run:                    {ev.run_id} (experiment gen1-demo) at {redact_url(tracking_uri)}",
        f"MLflow artifacts:              {ev.artifact_uri}",
    ]
    if db:
        lines.append(f"browse it:                     mlflow ui --backend-store-uri sqlite:///{db}")
    print("\n".join(lines), flush=True)
    from jobs.cli import report_bookkeeping

    bookkeeping_failed = report_bookkeeping([*pre.bookkeeping_errors, *ed.bookkeeping_errors,
                                             *ev.bookkeeping_errors], str(out))
    if not (pre.ok and ed.ok and ev.videos and not ev.failed):
        return EXIT_FAILED_FRACTION
    return EXIT_BOOKKEEPING if bookkeeping_failed else EXIT_OK


def _edit_lines(edits: Path) -> list[str]:
    """One line per edited video and its preview (input | depth | output), from the edit manifest."""
    from pipelines.edit import read_manifest

    lines = []
    for row in read_manifest(str(edits)).to_pylist():
        what = "eq. 8" if row["w_t"] else "eq. 8 with w_t = 0"
        lines.append(f"edited video (w_t={row['w_t']:g}, {what}): {row['output_uri']}")
        if row["preview_uri"]:
            lines.append(f"  preview (input | depth | output): {row['preview_uri']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.commands.demo ARGS``: ``gen1 demo ARGS``."""
    from jobs import cli

    return cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    exit_process(main())
