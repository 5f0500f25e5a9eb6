"""Session fixtures live in tests/fixtures/, one module per kind of resource; this file wires them.

Torch and BLAS use one thread per process: CI machines have 2 cores and many tests start Ray workers or
subprocesses that would otherwise each spawn a thread per core and slow everything down by contention.
The environment variables are set before torch is imported so child processes inherit them.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)

pytest_plugins = [
    "tests.fixtures.clips",
    "tests.fixtures.davis",
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.fault_proxy",
]
