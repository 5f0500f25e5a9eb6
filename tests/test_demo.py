"""`gen1 demo`: preprocess -> edit -> eval on real footage with tiny models, local Ray, local files and a
local MLflow store; it prints where every output is and labels them as tiny-model outputs. Without
opencv-doc it runs on the excerpts that ship in jobs/demo_footage/ and says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_registers_eval_and_demo():
    from jobs.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--steps", "1"])
    assert args.func.__module__ == "jobs.commands.demo" and args.steps == 1
    args = parser.parse_args(["eval", "--dataset", "davis:/data/DAVIS", "--models", "tiny", "--steps", "3"])
    assert args.func.__module__ == "jobs.commands.eval" and (args.dataset, args.steps) == ("davis:/data/DAVIS", 3)


def test_demo_names_missing_footage(tmp_path, capsys):
    from jobs.commands.demo import main
    from jobs.exit_codes import EXIT_BAD_INPUT

    assert main(["--out", str(tmp_path), "--videos", str(tmp_path / "nope.mp4")]) == EXIT_BAD_INPUT
    assert f"demo footage not found: {tmp_path / 'nope.mp4'} (from --videos)" in capsys.readouterr().err


def test_demo_footage_is_opencv_docs_clips_else_the_packaged_excerpts(tmp_path, monkeypatch):
    from gen1.decoding import probe
    from jobs.commands.demo import DEFAULT_CLIPS, OPENCV_DATA_ENV, PACKAGED_FOOTAGE, footage_sources

    opencv = tmp_path / "opencv-data"
    opencv.mkdir()
    monkeypatch.setenv(OPENCV_DATA_ENV, str(opencv))
    sources, origin = footage_sources(None)  # opencv-doc absent: the excerpts that ship with the package
    assert [s.parent for s in sources] == [PACKAGED_FOOTAGE, PACKAGED_FOOTAGE] and "gen1's excerpts" in origin
    assert sum(p.stat().st_size for p in PACKAGED_FOOTAGE.iterdir()) <= 2 * 2**20
    assert (PACKAGED_FOOTAGE / "LICENSE").is_file() and "Apache License" in (PACKAGED_FOOTAGE / "LICENSE").read_text()
    for source in sources:  # real footage: a few seconds each, at full size
        info = probe(str(source))
        assert info.num_frames / info.fps >= 4 and info.width >= 320, info
    for name in DEFAULT_CLIPS:
        (opencv / name).write_bytes(b"")  # footage_sources only looks for the files
    assert footage_sources(None) == ([opencv / n for n in DEFAULT_CLIPS], f"opencv-doc ({opencv})")
    (tmp_path / "a.mp4").write_bytes(b"")
    assert footage_sources([str(tmp_path / "a.mp4")]) == ([tmp_path / "a.mp4"], "--videos")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_without_opencv_doc_and_prints_every_output(tiny_models, tmp_path):
    from jobs.commands.demo import OPENCV_DATA_ENV, PACKAGED_FOOTAGE

    out = tmp_path / "demo"
    (tmp_path / "no-opencv-doc").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--out", str(out), "--steps", "1", "--clips", "1",
         "--num-cpus", "2"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                           OPENCV_DATA_ENV: str(tmp_path / "no-opencv-doc")},
        capture_output=True, text=True, timeout=570,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    assert "TINY RANDOM MODELS" in text.splitlines()[1]
    assert text.splitlines()[2].startswith(f"footage: vtest.mp4 from gen1's excerpts of opencv-doc's clips ({PACKAGED_FOOTAGE};")
    assert re.search(r"=== gen1 demo finished in \d+s; models: tiny \(TINY RANDOM MODELS", text)

    def location(label: str) -> str:
        match = re.search(rf"^{re.escape(label)}:\s+(\S+)", text, re.MULTILINE)
        assert match, f"no '{label}' line in:\n{text}"
        return match.group(1)

    assert (Path(location("footage (input videos)")) / "vtest.mp4").is_file()
    assert list(Path(location("feature shards (preprocess)")).glob("part-*.parquet"))
    edited = re.findall(r"^edited video \(w_t=(\S+), .*\): (\S+)$", text, re.MULTILINE)
    assert sorted(w for w, _ in edited) == ["0", "1"] and all(Path(p).is_file() for _, p in edited)
    previews = re.findall(r"preview \(input \| depth \| output\): (\S+)$", text, re.MULTILINE)
    assert len(previews) == 2 and all(Path(p).is_file() for p in previews)
    assert list(Path(location("edit manifest (Parquet)")).glob("part-*.parquet"))
    table = pd.read_parquet(location("per-video metrics table"))
    # both edits are our model's: eq. 8 at w_t = 1 and at w_t = 0 (not the per-frame image model)
    assert list(table["method"]) == ["gen1", "gen1"] and table["frame_consistency"].notna().all()
    assert sorted(table["setting"]) == ["ts3-w7.5-wt0", "ts3-w7.5-wt1"]
    assert "eq. 8 with w_t = 0" in text and "per-frame image model" not in text
    assert Path(location("side-by-side sample video")).is_file()
    db = out / "mlflow" / "mlflow.db"
    assert f"sqlite:///{db}" in text and db.is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("gen1-demo").experiment_id])
    assert run.info.run_id in location("MLflow run")
    assert run.data.tags["gen1.tiny_models"] == "true"
    assert run.data.metrics["frame_consistency"] == pytest.approx(
        table.loc[table["method"] == "gen1", "frame_consistency"].mean())
    assert run.data.params["steps"] == "[1]"
