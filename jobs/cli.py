"""The `gen1` command line: one subcommand per module in `jobs.commands`.

Each command module defines ``register(subparsers) -> argparse.ArgumentParser`` and sets
``parser.set_defaults(func=run)`` where ``run(args) -> int`` is the exit code. Imports are lazy so
``gen1 --help`` stays fast and a broken optional command cannot break the others' help.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# Order is the order of `gen1 --help`.
COMMAND_MODULES = (
    "jobs.commands.models",
    "jobs.commands.edit_one",
    "jobs.commands.preprocess",
    "jobs.commands.edit",
    "jobs.commands.train",
    "jobs.commands.eval",
    "jobs.commands.demo",
)


def add_models_argument(parser: argparse.ArgumentParser) -> None:
    """The `--models` option every model-running command takes."""
    parser.add_argument(
        "--models",
        default="tiny",
        metavar="PRESET_OR_YAML",
        help="model preset: 'tiny' (tiny random models, outputs labelled as such), 'sd15' (the paper's "
        "models from weight specs), or a YAML file of weight specs (keys: base, vae, unet, clip, depth, "
        "caption, prior). Default: tiny.",
    )


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for ``WIDTHxHEIGHT`` (e.g. ``448x256``) -> ``(width, height)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 448x256; got {text!r}") from e
    return w, h


def _not_library_chatter(record: logging.LogRecord) -> bool:
    """open_clip logs every load step at INFO on the root logger; keep those for ``-v`` only."""
    return record.levelno > logging.INFO or "open_clip" not in record.pathname


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_library_chatter)


def standalone_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """``python -m jobs.commands.<name>`` (what Ray Job entry points call): the command's own options
    plus ``-v`` and ``--models`` (default: the command's config, else tiny)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    add_models_argument(parser)
    parser.set_defaults(models=None)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return int(run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gen1",
        description="Structure- and content-guided video diffusion (Gen-1) and its batch pipelines.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
