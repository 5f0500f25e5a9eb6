"""Ray Job entry point of `gen1 eval: DAVIS/TGVE evaluation with MLflow`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.entrypoints.eval ARGS

ARGS are those of `gen1 eval`.
"""

from __future__ import annotations

import os

# The job's runtime_env (e.g. env_vars of a job spec) and the env vars the pipelines forward in ray.init
# name the same keys with the same values; without this Ray refuses to merge them and the driver fails.
os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")

from jobs.commands.eval import main  # noqa: E402
from jobs.process_exit import exit_process  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
