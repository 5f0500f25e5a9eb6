"""`gen1` is the model library: it never imports Ray (the pipelines wrap it), so it runs without a cluster."""

from __future__ import annotations

import json
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


def gen1_modules_importing(package: str) -> list[str]:
    """The gen1 source files with an import of ``package`` on any line (function-local ones too)."""
    starts = (f"import {package}", f"from {package}")
    return [str(p.relative_to(ROOT)) for p in (ROOT / "gen1").rglob("*.py")
            if any(line.strip().startswith(starts) for line in p.read_text().splitlines())]


def test_no_gen1_module_mentions_ray_imports():
    assert gen1_modules_importing("ray") == []


def test_no_gen1_module_imports_mlflow():
    """Training reports through the tracker its caller hands in (`pipelines.tracking.MlflowTracker`)."""
    assert gen1_modules_importing("mlflow") == []
