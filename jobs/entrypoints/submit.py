"""Submit a job spec (``jobs/specs/*.yaml``) to a Ray cluster's job API and follow it to the end.

    python -m jobs.entrypoints.submit jobs/specs/eval-davis-nightly.yaml --address http://127.0.0.1:8265
    python -m jobs.entrypoints.submit jobs/specs/eval-davis-tiny.yaml -- --limit 2   # extra entrypoint args

Exit status: 0 when the job succeeded, 1 when it failed or was stopped, 2 on a bad spec.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from jobs.entrypoints import SPEC_KEYS
from jobs.exit_codes import EXIT_BAD_INPUT
from jobs.process_exit import exit_process

log = logging.getLogger(__name__)


class SpecError(ValueError):
    """A job spec is malformed; the message names the file and what was expected."""


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a job spec (see `jobs.entrypoints`)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping, found {type(data).__name__}")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    for key in ("name", "entrypoint"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise SpecError(f"{path}: '{key}' must be a non-empty string")
    return data


def entrypoint_module(entrypoint: str) -> str | None:
    """The module a ``python -m MODULE ...`` entrypoint runs (None for other commands)."""
    argv = shlex.split(entrypoint)
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-m":
        return argv[2]
    return None


def submit(spec: dict[str, Any], address: str | None, extra: list[str], wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = " ".join([spec["entrypoint"], *map(shlex.quote, extra)])
    submission_id = f"{spec['name']}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    kwargs = {k: spec[k] for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                                    "entrypoint_resources") if k in spec}
    job = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=spec.get("runtime_env"),
                            metadata={k: str(v) for k, v in (spec.get("metadata") or {}).items()}, **kwargs)
    print(f"submitted {job}: {entrypoint}", flush=True)
    if not wait:
        return 0
    for lines in _tail(client, job):
        sys.stdout.write(lines)
        sys.stdout.flush()
    status = client.get_job_status(job)
    print(f"job {job}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _tail(client, job: str):
    import asyncio

    async def collect():
        async for lines in client.tail_job_logs(job):
            yield lines

    loop = asyncio.new_event_loop()
    gen = collect()
    try:
        while True:
            try:
                yield loop.run_until_complete(gen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.entrypoints.submit", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a job spec YAML (jobs/specs/*.yaml)")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        "then $RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return")
    parser.add_argument("extra", nargs="*", help="appended to the spec's entrypoint (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
    except (SpecError, OSError, yaml.YAMLError) as e:
        print(f"bad job spec: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return submit(spec, args.address, args.extra, wait=not args.no_wait)


if __name__ == "__main__":
    exit_process(main())
