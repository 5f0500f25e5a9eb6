"""`gen1 models`: what a preset is made of: its content-embedding convention, and each component's class,
weight spec, whether its weights are here, and its parameter count (from a weightless ``meta`` build, so
nothing is loaded)."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import HelpFormatter
from jobs.exit_codes import EXIT_BAD_INPUT, EXIT_OK, help_epilog

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jobs.cli import add_models_argument

    p = sub.add_parser(
        "models",
        help="list a preset's components, weights and parameter counts",
        description="For each component of a model preset: its class, weight spec, whether the weights "
        "are present locally (with how to provide missing ones) and its parameter count. Loads no weights.",
        epilog=help_epilog(EXIT_OK, EXIT_BAD_INPUT),
        formatter_class=HelpFormatter,
    )
    add_models_argument(p)
    p.set_defaults(func=run)
    return p


def weights_status(spec: str, component: str | None = None) -> tuple[str, str | None]:
    """(status, detail): 'tiny' / 'mini' for random models, 'present' + the local path, or 'missing' + hint."""
    from gen1.config import RANDOM_PREFIXES

    if spec.startswith(RANDOM_PREFIXES):
        return spec.split(":", 1)[0], None
    from gen1.weights import WeightsNotFoundError, resolve_spec

    try:
        return "present", str(resolve_spec(spec, component=component))
    except WeightsNotFoundError as err:
        return "missing", str(err)


def describe(specs) -> tuple[list[dict[str, str]], list[str]]:
    """One row per component (component, cls, weights, spec, status, parameters) and notes to print."""
    from gen1.architectures import (
        COMPONENTS,
        SPEC_FIELD,
        build_component,
        class_name,
        parameter_count,
        spec_of,
    )

    rows, notes, status_of = [], [], {}
    for component in COMPONENTS:
        spec = spec_of(component, specs)
        if spec not in status_of:
            status_of[spec] = weights_status(spec, SPEC_FIELD.get(component, component))
            status, detail = status_of[spec]
            if status == "missing":
                notes.append(f"{component}: missing: " + detail.replace("\n", "\n    "))
            elif status == "present":
                notes.append(f"{component}: present at {detail}")
        status = status_of[spec][0]
        try:
            module = build_component(component, specs, device="meta")
            cls, params = class_name(module), f"{parameter_count(module):,}"
        except Exception as err:  # reported in the table and the notes; the exit code says so
            log.exception("could not build %s", component)
            cls, params, status = "?", "?", "error"
            notes.append(f"{component}: build failed: {type(err).__name__}: {err}")
        weights = f"{spec} (inflated)" if component == "video_unet" else spec
        rows.append(
            dict(component=component, cls=cls, weights=weights, spec=spec, status=status, parameters=params)
        )
    return rows, notes


def format_table(rows: list[dict[str, str]]) -> str:
    cols = [
        ("component", "component"),
        ("cls", "class"),
        ("weights", "weights"),
        ("status", "status"),
        ("parameters", "parameters"),
    ]
    widths = {k: max(len(title), *(len(r[k]) for r in rows)) for k, title in cols}
    lines = ["  ".join(title.ljust(widths[k]) for k, title in cols).rstrip()]
    for r in rows:
        cells = [r[k].rjust(widths[k]) if k == "parameters" else r[k].ljust(widths[k]) for k, _ in cols]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from gen1.config import ConfigError, load_model_specs

    try:
        specs = load_model_specs(args.models)
    except ConfigError as err:
        print(f"gen1 models: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows, notes = describe(specs)
    print(f"models: {specs.label()}")
    print(f"content embedding: {specs.content.label()} (CLIP {specs.clip_dim}-d)")
    if specs.is_tiny:
        print(
            "tiny:<component> specs are TINY RANDOM MODELS of the real classes (built on first use, cached): "
            "for tests and plumbing checks, not real results"
        )
    print(format_table(rows))
    if notes:
        print()
        print("\n".join(notes))
    missing = {r["spec"] for r in rows if r["status"] == "missing"}
    if missing:
        print(f"\n{len(missing)} weight spec(s) not found locally: jobs using them fail before starting")
    return EXIT_BAD_INPUT if any(r["status"] == "error" for r in rows) else EXIT_OK
