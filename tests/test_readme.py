"""The README documents what the code does: every table column, every CLI command, the CI commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.cli import build_parser
from pipelines.schema import ERRORS_SCHEMA, MANIFEST_SCHEMA, SHARD_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#{{1,3}} |\Z)", README, flags=re.M | re.S)
    assert m, f"README has no section {title!r}"
    return m.group(1)


@pytest.mark.parametrize(
    ("title", "schema"),
    [("Feature shards", SHARD_SCHEMA), ("Errors table", ERRORS_SCHEMA), ("Edit manifest", MANIFEST_SCHEMA)],
)
def test_every_column_is_documented_with_its_type(title, schema):
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)`", _section(title), flags=re.M))
    assert list(rows) == schema.names, f"README '{title}' columns differ from pipelines/schema.py"
    for field in schema:
        assert rows[field.name] == str(field.type).replace("list<item: ", "list<"), field.name


def test_every_cli_command_appears_in_the_readme():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"gen1 {name}" in README, f"README never shows `gen1 {name}`"


def test_ci_runs_the_readme_setup_commands():
    block = re.search(r"## Set-up \(two commands\)\n\n```bash\n(.*?)```", README, flags=re.S).group(1)
    install, test = block.strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci, f".ci/run does not run the README's install command {install!r}"
    assert re.search(rf"^{re.escape(test)}$", ci, flags=re.M), f".ci/run does not run {test!r}"


def test_every_test_the_readme_cites_exists():
    cited, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", README):
        current = path or current
        cited.append((current, name))
    assert len(cited) >= 10
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"README cites {path}::{name}, which does not exist"


def test_every_exit_code_is_documented():
    from jobs.exit_codes import EXIT_CODES

    rows = dict(re.findall(r"^\| `(\d+)` \| (.+) \|$", _section("Exit codes"), flags=re.M))
    assert [int(c) for c in rows] == [e.code for e in EXIT_CODES], "README 'Exit codes' differs from jobs/exit_codes.py"
    for e in EXIT_CODES:
        assert rows[str(e.code)].split(":")[0].split(" (")[0] in e.meaning, e.name
