"""The layout rules of the code base, read from the source (nothing is imported or run):

- modules of `gen1/` and `pipelines/` stay small (at most 600 lines) and functions short (80 lines, unless a
  ``# long:`` comment in the function says why);
- no import circle in `gen1/`, `pipelines/` or `jobs/`, counting imports inside functions too (so a
  function-local import cannot hide one);
- `gen1/` imports neither Ray nor MLflow; only `pipelines/tracking.py` imports MLflow in `pipelines/`;
- only the preprocess job's own entry points import `pipelines.preprocess`;
- Ray Data pools are ``compute=`` strategies built by `pipelines.runtime` (Ray 2.60 deprecates ``concurrency=``),
  and every Ray Data call takes its pool and bounded retries from `pipelines.runtime.task_pool` /
  `actor_pool` (Ray Data 2.60 retries crashed work forever by default).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gen1", "pipelines", "jobs")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules(*packages: str) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules(*PACKAGES)


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that ``name`` imports, at top level or inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_modules_are_small_and_functions_short():
    big = {n: len(p.read_text().splitlines()) for n, p in _modules("gen1", "pipelines").items()}
    assert {n: lines for n, lines in big.items() if lines > MAX_MODULE_LINES} == {}
    long = []
    for name, path in MODULES.items():
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                body = source[node.lineno - 1 : node.end_lineno]
                if lines > MAX_FUNCTION_LINES and not any("# long:" in line for line in body):
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert long == [], "functions over 80 lines without a '# long:' comment saying why"


def test_no_import_circles_counting_function_local_imports():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            # a package importing its own submodules (its __init__ re-exporting them) is not a circle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


@pytest.mark.parametrize("library", ["ray", "mlflow"])
def test_gen1_imports_neither_ray_nor_mlflow(library):
    offenders = [n for n, p in MODULES.items() if n.startswith("gen1") and library in _external_imports(p)]
    assert offenders == []


def test_mlflow_lives_in_tracking():
    users = sorted(n for n, p in MODULES.items() if n.startswith("pipelines") and "mlflow" in _external_imports(p))
    assert users == ["pipelines.tracking"]


def test_only_the_preprocess_job_imports_the_preprocess_pipeline():
    importers = sorted(n for n, p in MODULES.items()
                       if not n.startswith("pipelines.preprocess") and any(
                           d.startswith("pipelines.preprocess") for d in _imports(n, p)))
    assert importers == ["jobs.benchmarks.preprocess_bench", "jobs.commands.demo", "jobs.commands.preprocess"]


def test_ray_data_pools_are_built_in_one_place():
    """Stages get ``compute=runtime.actor_pool(n)`` / ``runtime.task_pool(...)``; nothing passes Ray 2.60's
    deprecated ``concurrency=`` to a Ray Data call."""
    builders = [n for n, p in MODULES.items() if re.search(r"(ActorPool|TaskPool)Strategy\(", p.read_text())]
    assert builders == ["pipelines.runtime"]
    deprecated = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("map_batches", "map", "flat_map", "filter")
                    and any(k.arg == "concurrency" for k in node.keywords)):
                deprecated.append(f"{name}:{node.lineno}")
    assert deprecated == []


# What a map_batches call spreads (``**...``) that holds `task_pool` / `actor_pool`'s arguments: the calls
# themselves, the edit run's planned pools (`EditRun.size_pools`) and the eval's (`_actor_args`).
POOL_SPREADS = ("task_pool(", "actor_pool(", "self.resources[", "_actor_args(")


def test_every_ray_data_call_has_bounded_retries():
    """Each ``map_batches`` call of ours spreads `pipelines.runtime.task_pool` / `actor_pool` (pool and retries
    together) and passes no ``compute=`` of its own: none runs with Ray Data's unbounded default retries."""
    calls, unbounded = 0, []
    for name, path in MODULES.items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "map_batches":
                calls += 1
                spreads = [ast.get_source_segment(source, k.value) for k in node.keywords if k.arg is None]
                named = {k.arg for k in node.keywords}
                if "compute" in named or not any(s.startswith(POOL_SPREADS) for s in spreads):
                    unbounded.append(f"{name}:{node.lineno}")
    assert calls >= 10  # preprocess: plan, decode, 3 model stages, writer; edit: plan, caption, prompts x2, edits; eval: 2
    assert unbounded == []
    runtime = (ROOT / "pipelines" / "runtime.py").read_text()
    for key in ("max_retries", "max_restarts", "max_task_retries"):
        assert f'"{key}": retries.' in runtime  # the pools pass each of Ray's three retry bounds


def test_every_path_in_the_readme_layout_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout\n"): readme.index("\n## ", readme.index("## Layout\n") + 1)]
    named = set(re.findall(r"`((?:gen1|pipelines|jobs)/[\w/.*]+)`", section))
    # "`gen1/training/loop.py`, `state.py`": bare names in a row are siblings of the row's first path
    for row in section.splitlines():
        paths = re.findall(r"`((?:gen1|pipelines|jobs)/[\w/.*]+)`", row)
        named.update(f"{paths[0].rpartition('/')[0]}/{bare}" for bare in re.findall(r"`([\w]+\.py)`", row) if paths)
    assert len(named) > 30
    missing = sorted(p for p in named if not list(ROOT.glob(p)))
    assert missing == []
