"""How a gen1 process ends (`jobs.process_exit`): it does what a normal exit does (threads joined, atexit
handlers and finalizers run, streams flushed) and returns the command's code, and every entry point of
``jobs/`` (the ``gen1`` console script included) ends through it, so Arrow's thread pools cannot abort a
process after its work is done (apache/arrow#39862)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
import atexit, sys, tempfile, threading, time
import pyarrow as pa, pyarrow.parquet as pq
from jobs.process_exit import exit_process

d = tempfile.TemporaryDirectory()  # its finalizer removes it at exit
pq.write_table(pa.table({"x": list(range(1000))}), d.name + "/t.parquet")
assert pq.read_table(d.name + "/t.parquet").num_rows == 1000  # an Arrow dataset scan, as the jobs do
print(d.name, flush=True)
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
sys.stderr.write("unflushed stderr")
print("unflushed stdout", end="")
exit_process(int(sys.argv[1]))
"""


def test_exit_process_runs_the_normal_exit_steps_and_returns_the_code():
    for code in (0, 3):
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(code)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == code, out.stderr
        tmp, *rest = out.stdout.splitlines()
        assert rest == ["unflushed stdoutthread finished", "atexit ran"]  # the thread joined before atexit
        assert out.stderr == "unflushed stderr"
        assert not Path(tmp).exists()  # TemporaryDirectory's finalizer ran


def test_every_entry_point_of_jobs_ends_through_exit_process():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"gen1": "jobs.cli:run"}
    mains = 0
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                mains += 1
                calls = {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
                assert "sys.exit" not in calls, path
                assert calls & {"exit_process", "run"}, path
    assert mains >= 10
