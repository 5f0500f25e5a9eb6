"""Session fixtures live in tests/fixtures/, one module per kind of resource; this file wires them."""

pytest_plugins = [
    "tests.fixtures.clips",
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.ray_cluster",
]
