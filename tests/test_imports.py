"""`gen1` is the model library: it never imports Ray (the pipelines wrap it), so it runs without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import gen1, pipelines
names = [m.name for m in pkgutil.walk_packages(gen1.__path__, "gen1.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


def test_importing_gen1_and_pipelines_loads_no_ray():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) >= 10 and "gen1.unet" in report["modules"]
    assert report["ray"] == [], f"importing gen1 (every module) and pipelines loaded Ray: {report['ray'][:5]}"


_EDIT_ONE = r"""
import json, sys
from jobs.cli import main
code = main(["edit-one", "no-such-video.mp4", "--prompt", "x", "--out", "out.mp4", "--models", "tiny"])
loaded = [m for m in sys.modules if m.split(".")[0] == "ray" or m.startswith("pipelines.edit")]
print(json.dumps({"code": code, "loaded": sorted(loaded)}))
"""


def test_edit_one_imports_neither_ray_nor_the_edit_pipeline(tmp_path):
    """`gen1 edit-one` is the single-machine path: it reads masks with gen1.masks, not with the Ray edit
    pipeline. A missing input fails after every import of the command has run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _EDIT_ONE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 1, proc.stderr[-3000:]
    assert report["loaded"] == [], f"gen1 edit-one loaded {report['loaded'][:5]}"
