"""Issue 17, item 8: CI cannot pass without the real parts. A test whose opencv-doc clips, `ray` CLI, moto or
Chromium is missing skips on a developer's machine and fails where ``GEN1_REQUIRE_REAL_PARTS=1`` (as `.ci/run`
sets)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures.real_parts import MARKER, REQUIRE_ENV

ROOT = Path(__file__).resolve().parents[1]

# Each part faked as missing through the detection its fixture uses, once with parts required, once without.
GENERATED = r'''
import importlib.util
import sys

import pytest

from tests.fixtures import browser, clips, ray_cluster, s3


@pytest.fixture(params=["required", "optional"])
def mode(request, monkeypatch):
    if request.param == "required":
        monkeypatch.setenv("GEN1_REQUIRE_REAL_PARTS", "1")
    else:
        monkeypatch.delenv("GEN1_REQUIRE_REAL_PARTS", raising=False)


def test_opencv_doc(mode, monkeypatch, tmp_path):
    monkeypatch.setattr(clips, "OPENCV_DATA_DIR", tmp_path / "absent")
    clips.opencv_doc_clips()


def test_ray_cli(mode, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    ray_cluster.ray_executable()


def test_moto(mode, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moto" else find_spec(name, *a))
    s3.require_moto()


def test_chromium(mode, monkeypatch):
    monkeypatch.setenv("PATH", "")
    browser.chromium()
'''


def test_a_missing_real_part_fails_where_parts_are_required_and_skips_elsewhere(tmp_path):
    test_file = tmp_path / "test_generated_parts.py"
    test_file.write_text(GENERATED)
    env = {k: v for k, v in os.environ.items() if k not in (REQUIRE_ENV, "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"\b4 failed, 4 skipped\b", out), out
    failed = sorted(re.findall(r"^_+ (test_\w+)\[(\w+)\] _+$", out, flags=re.M))  # the FAILURES headers
    assert failed == [("test_chromium", "required"), ("test_moto", "required"), ("test_opencv_doc", "required"),
                      ("test_ray_cli", "required")], out
    assert len(re.findall(rf"^{re.escape(MARKER)} .*\({REQUIRE_ENV}=1: this run needs every real part\)$", out,
                          flags=re.M)) == 4, out
    skipped = re.findall(r"^SKIPPED \[1\] .*?" + re.escape(MARKER) + r" (.*)$", out, flags=re.M)
    assert len(skipped) == 4 and any("opencv-doc" in s for s in skipped) and any("moto" in s for s in skipped), out
    assert any("apt-get install chromium" in s for s in skipped), out


def test_ci_requires_the_real_parts_for_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    require = ci.find(f"export {REQUIRE_ENV}=1\n")
    assert require != -1, f".ci/run does not export {REQUIRE_ENV}=1"
    assert require < ci.find("\n.venv/bin/python -m pytest -n 2 --dist loadgroup\n"), f".ci/run sets {REQUIRE_ENV} after running the tests"
