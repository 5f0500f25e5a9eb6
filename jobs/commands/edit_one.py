"""`gen1 edit-one`: edit one video on this machine and write the result plus an input | depth | output preview."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import HelpFormatter
from jobs.exit_codes import EXIT_BAD_INPUT, EXIT_OK, help_epilog

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jobs.cli import add_models_argument

    p = sub.add_parser(
        "edit-one",
        help="edit one video (single machine)",
        description="Edit one video: depth keeps the structure, a text prompt (through the prior) or a "
        "reference image sets the content. Writes OUT and OUT's preview (input | depth | output).",
        epilog=help_epilog(EXIT_OK, EXIT_BAD_INPUT),
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="video path or fsspec URI (s3://..., file://...)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text prompt for the content")
    what.add_argument("--image", metavar="URI", help="reference image for the content (image prompting)")
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="output video (.mp4 or .gif; any fsspec URI)")
    p.add_argument("--ts", type=int, default=3, help="structure strength t_s in 0..7; higher keeps less (3)")
    p.add_argument("--w", type=float, default=7.5, help="content guidance scale w (7.5)")
    p.add_argument("--wt", type=float, default=1.0, help="temporal guidance w_t; >1 smoother, <1 flicker (1.0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp"), default="ddim", help="ddim (paper) or dpmpp")
    p.add_argument(
        "--mask",
        metavar="URI",
        help="edit mask: an image (same mask every frame) or a video; white = edit, black = keep",
    )
    p.add_argument("--frames", type=int, default=None, help="frames to edit (default: the model's window)")
    p.add_argument("--stride", type=int, default=1, help="take every STRIDE-th frame (1)")
    p.add_argument("--start", type=int, default=0, help="first frame (0)")
    p.add_argument("--fps", type=float, default=None, help="output fps (default: source fps / stride)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    add_models_argument(p)
    p.set_defaults(func=run)
    return p


def preview_uri(out: str) -> str:
    stem, dot, suffix = out.rpartition(".")
    return f"{stem}.preview.{suffix}" if dot else f"{out}.preview.mp4"


def run(args: argparse.Namespace) -> int:
    from gen1.config import ConfigError, load_model_specs
    from gen1.decoding import load_clip, probe
    from gen1.masks import read_mask
    from gen1.models import Gen1Models
    from gen1.preview import depth_to_rgb, side_by_side
    from gen1.sampling import Content, EditSettings, edit_video
    from gen1.video import read_image, target_size, write_video

    specs = load_model_specs(args.models)
    try:
        settings = EditSettings(
            structure_strength=args.ts,
            guidance=args.w,
            temporal_guidance=args.wt,
            steps=args.steps,
            seed=args.seed,
            sampler=args.sampler,
        )
    except ValueError as err:
        raise ConfigError(f"edit settings: {err}") from err
    info = probe(args.input)
    width, height = target_size(info.width, info.height, (specs.width, specs.height))
    frames_wanted = args.frames or specs.frames
    clip = load_clip(args.input, n=frames_wanted, stride=args.stride, start=args.start, size=(width, height))
    if args.prompt is not None:
        content = Content(text=args.prompt)
    else:
        content = Content(image=read_image(args.image), image_uri=args.image)
    mask = read_mask(args.mask, clip.indices, width, height) if args.mask else None

    log.info("models: %s; settings: %s", specs.label(), settings.as_dict())
    models = Gen1Models.load(specs, device=args.device)
    last = [-1]

    def progress(step: int, total: int) -> None:
        pct = 100 * step // total
        if pct // 10 != last[0]:
            last[0] = pct // 10
            log.info("sampling: step %d/%d", step, total)

    result = edit_video(models, clip.frames, content, settings, mask=mask, progress=progress)
    fps = args.fps or max(clip.fps / args.stride, 1.0)
    write_video(result.frames, args.out, fps)
    preview = preview_uri(args.out)
    write_video(side_by_side(clip.frames, depth_to_rgb(result.depth), result.frames), preview, fps)
    summary = {
        "output": args.out,
        "preview": preview,
        "models": specs.label(),
        "tiny_models": specs.is_tiny,
        "clip_id": clip.clip_id,
        "frames": int(result.frames.shape[0]),
        "size": [width, height],
        "content": content.kind,
        "seconds": round(result.seconds, 2),
        **settings.as_dict(),
    }
    if specs.is_tiny:
        log.warning("tiny random models: this output is a plumbing check, not a real edit")
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0
