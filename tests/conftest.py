"""Session fixtures live in tests/fixtures/, one module per kind of resource; this file wires them.

Torch and BLAS use one thread per process: CI machines have 2 cores and many tests start Ray workers or
subprocesses that would otherwise each spawn a thread per core and slow everything down by contention.
The environment variables are set before torch is imported so child processes inherit them.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under the README's test command (``-n 2 --dist loadgroup``, pytest-xdist) every ``slow`` test goes to
    one worker, one after another (they each start Ray clusters, servers or whole jobs that use both cores),
    while the other worker runs the fast tests beside them. Without ``-n`` the mark changes nothing."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("slow"))
