"""The `gen1` command line: one subcommand per module in `jobs.commands`.

Each command module defines ``register(subparsers) -> argparse.ArgumentParser`` and sets
``parser.set_defaults(func=run)`` where ``run(args) -> int`` is the exit code. Imports are lazy so
``gen1 --help`` stays fast and a broken optional command cannot break the others' help.

The global options (`add_global_options`: ``-v``, ``-q``) go before or after the command. Ctrl-C ends any
command with one ``interrupted`` line, Ray shut down and `EXIT_INTERRUPTED` (`run_command`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

from jobs.exit_codes import EXIT_BAD_INPUT, EXIT_DST_BUSY, EXIT_INTERRUPTED, help_epilog
from jobs.process_exit import exit_process

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


def add_global_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``-v`` / ``-q``, on `gen1` itself and on every subcommand, so that they go before or after the
    command. ``suppress``: no default (argparse's SUPPRESS), so that a subcommand's parser, whose values
    argparse copies over the top level's, leaves ``gen1 -v COMMAND``'s value alone; `global_options` reads
    them."""
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging, FFmpeg's messages, the config at start; tracebacks for input errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="log warnings and errors only (results are still printed)")


def global_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[bool, bool]:
    """``(verbose, quiet)`` of parsed ``args`` (False where not given); a usage error when both are given."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    args.verbose, args.quiet = verbose, quiet
    return verbose, quiet


def package_version() -> str:
    """The installed package's version (its metadata, from pyproject.toml)."""
    try:
        return importlib.metadata.version("gen1")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Root logging at DEBUG (``-v``), WARNING (``-q``) or INFO. ``-v`` also lets FFmpeg log warnings in this
    process and in every Ray worker and decode process it starts (`gen1.libav_logging`, by environment)."""
    from gen1.libav_logging import LIBAV_LOG_ENV

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        os.environ.setdefault(LIBAV_LOG_ENV, "warning")  # an explicit $GEN1_LIBAV_LOG wins
    else:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_library_chatter)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (a video or image: `VideoDecodeError` and its `ImageDecodeError`; a
    URI; missing weights; a config, a dataset's layout (`pipelines.datasets.DatasetError` is a
    `ConfigError`)), not a bug in gen1: a command that raises one ends with a message naming the input and
    the reason, exit code `EXIT_BAD_INPUT` (1)."""
    from gen1.config import ConfigError
    from gen1.prompts import PromptWriterError
    from gen1.video import VideoDecodeError
    from gen1.weights import WeightsNotFoundError

    return (
        ConfigError,
        PromptWriterError,
        VideoDecodeError,
        WeightsNotFoundError,
        FileNotFoundError,
        IsADirectoryError,
        PermissionError,
    )


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that descriptions and epilogs keep their line breaks: each line is
    wrapped alone, and an indented line (a table row such as the exit codes') is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[:1].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors exit with `EXIT_BAD_INPUT` (1) instead of argparse's 2, so one
    code means bad input or usage in every command (`jobs.exit_codes`). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def error_exit_code(err: BaseException) -> int | None:
    """The exit code of an error that is an outcome, not a bug: `EXIT_BAD_INPUT` for `user_error_types`,
    `EXIT_DST_BUSY` for a `pipelines.lease.LeaseError` (another driver holds DST's lease); None otherwise."""
    if isinstance(err, user_error_types()):
        return EXIT_BAD_INPUT
    from pipelines.lease import LeaseError

    return EXIT_DST_BUSY if isinstance(err, LeaseError) else None


def run_command(prog: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``run(args)``; an error with an `error_exit_code` ends the command with ``PROG: error: TYPE: message``
    on stderr (the message as the error words it: a missing-weights message lists every location tried, one
    per line; a held lease names its owner and expiry) and that code, without a traceback unless ``-v``. Any
    other exception propagates. Ctrl-C (KeyboardInterrupt) ends it with Ray shut down,
    ``PROG: interrupted`` and `EXIT_INTERRUPTED`, without a traceback: the pipelines commit whole parts only,
    so a rerun resumes."""
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return _interrupted(prog)
    except Exception as err:
        code = error_exit_code(err)
        if code is None:
            raise
        if getattr(args, "verbose", False):
            logging.getLogger(prog).exception("%s failed", prog)
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return code


def report_bookkeeping(errors: Sequence[str], dst: str) -> bool:
    """Print a ``FAILED:`` line on stderr for each write about a run over ``dst`` that failed after its results
    were committed (a summary's ``bookkeeping_errors``, `pipelines.runtime.bookkeeping`); True when there was
    one: the command exits `EXIT_BOOKKEEPING` unless the failed fraction gives it 4."""
    for error in errors:
        print(f"FAILED: the results are committed in {dst}, but the run {error}", file=sys.stderr)
    return bool(errors)


def _interrupted(prog: str) -> int:
    """After Ctrl-C: shut Ray down (the pipelines' own ``finally`` may have been cut short), one line."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
    try:
        ray = sys.modules.get("ray")  # imported only by commands that ran Ray
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def standalone_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
    epilog: str | None = None,
) -> int:
    """``python -m jobs.commands.<name>`` (what Ray Job entry points call): the command's own options
    plus the global options and ``--models`` (default: the command's config, else tiny); ``epilog``: its
    exit codes."""
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    add_global_options(parser)
    add_arguments(parser)
    add_models_argument(parser)
    parser.set_defaults(models=None)
    args = parser.parse_args(argv)
    configure_logging(*global_options(parser, args))
    return run_command(prog, args, run)


CODE_MAP = """\
where the code is:
  gen1/                 the model library: unet.py + temporal.py (the video UNet), structure.py (t_s),
                        guidance.py (eq. 8), sampling.py, masks.py, baselines.py, training/ (the stages)
  pipelines/preprocess/ gen1 preprocess      pipelines/edit/     gen1 edit (edit-one: gen1/sampling.py)
  pipelines/evaluate/   gen1 eval            pipelines/train.py  gen1 train
  pipelines/            runtime.py (Ray, resources), commits.py, failures.py, quarantine.py, tracking.py (MLflow)
  jobs/commands/        one module per command; README.md's Layout section maps the rest

""" + help_epilog()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="gen1",
        description="Structure- and content-guided video diffusion (Gen-1) and its batch pipelines.",
        epilog=CODE_MAP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    add_global_options(parser, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():  # every command, so none can lack them
        add_global_options(command, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(*global_options(parser, args))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    return run_command(f"gen1 {args.command}", args, args.func)


def run() -> NoReturn:
    """The ``gen1`` console script: `main`, then `jobs.process_exit.exit_process` with its exit code."""
    exit_process(main())


if __name__ == "__main__":
    run()
