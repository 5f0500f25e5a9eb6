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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
