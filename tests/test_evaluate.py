"""Evaluation: config, table, metric names and plots without models; the metrics stage on tiny models and the
baseline stage's failures; a tiny-model DAVIS eval logged to an MLflow server (SQLite, 127.0.0.1) and read back;
`ray job submit` of the eval entry point to a local multi-node Ray cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gen1.config import TINY, ConfigError
from pipelines import tracking
from pipelines.evaluate import (
    BASELINES,
    METHODS,
    METRICS,
    EvalConfig,
    MetricsStage,
    consistency_scatter,
    consistency_vs_wt,
    per_video_table,
    setting_label,
)
from tests.fixtures.clips import tiny_square_video
from tests.fixtures.mlflow_server import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a watercolor painting"


# ------------------------------------------------------------------------------------------ no models


def test_eval_config_validates_and_runs_our_grid_as_given(tmp_path):
    cfg = EvalConfig(dataset="davis:/data/DAVIS", grid={"t_s": [3], "w": [7.5], "w_t": [1.0, 1.5]})
    assert cfg.baselines == BASELINES == ("per_frame", "sdedit", "no_structure")  # all three by default
    assert cfg.edit_grid().w_t == (1.0, 1.5)  # the per-frame baseline is not a point of our grid
    # eq. 8 at w_t = 0 runs when the grid asks for it, as a point of our sweep
    assert EvalConfig(dataset="davis:/d", grid={"w_t": [0.0, 1.0]}).edit_grid().w_t == (0.0, 1.0)
    with pytest.raises(ConfigError, match="exactly one of dataset"):
        EvalConfig()
    with pytest.raises(ConfigError, match="exactly one of dataset"):
        EvalConfig(dataset="davis:/d", edits="/e")
    with pytest.raises(ConfigError, match="baselines"):
        EvalConfig(dataset="davis:/d", baselines=("deforum",))
    with pytest.raises(ConfigError, match="mask"):
        EvalConfig(dataset="davis:/d", mask="people")
    with pytest.raises(ConfigError, match="grid"):
        EvalConfig(dataset="davis:/d", grid={"guidance": [7.5]})
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nentrypoint: python -m jobs.entrypoints.eval\nconfig:\n  dataset: tgve:/t\n  steps: 3\n")
    loaded = EvalConfig.from_yaml(spec, steps=5, limit=None)
    assert (loaded.dataset, loaded.steps, loaded.limit) == ("tgve:/t", 5, None)
    spec.write_text("dataset: davis:/d\nstep: 3\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['step'\]"):
        EvalConfig.from_yaml(spec)


def test_methods_and_setting_labels():
    from jobs.cli import build_parser
    from jobs.commands.eval import BASELINES as CLI_BASELINES
    from jobs.commands.eval import EDITORS as CLI_EDITORS
    from pipelines.evaluate.config import EDITOR_BASELINES

    assert CLI_BASELINES == BASELINES and CLI_EDITORS == EDITOR_BASELINES
    assert set(METHODS) == {"gen1", *BASELINES, *EDITOR_BASELINES}  # the editors (gen1.editors) as methods
    args = build_parser().parse_args(["eval", "--dataset", "davis:/d", "--baselines", "no_structure", "per_frame"])
    assert args.baselines == ["no_structure", "per_frame"]
    assert setting_label("gen1", 3, 7.5, 1.5) == "ts3-w7.5-wt1.5"
    assert setting_label("gen1", 3, 7.5, 0.0) == "ts3-w7.5-wt0"  # eq. 8 with w_t = 0: ours, not a baseline
    assert setting_label("per_frame", 3, 7.5, None) == "ts3-w7.5"
    assert setting_label("sdedit", None, 7.5, None, 0.6) == "s0.6-w7.5"
    assert setting_label("no_structure", None, 7.5, None, 0.6) == "s0.6-w7.5"


# (method, t_s, w_t, sdedit strength, frame consistency, prompt consistency, flow-warp error) of each video;
# method None: an edit-manifest row (our model's, w_t = 0 included)
ROWS = (
    (None, 3, 1.0, None, 0.9, 0.30, 0.05),
    (None, 3, 1.5, None, 0.95, 0.35, 0.04),
    (None, 3, 0.0, None, 0.85, 0.20, 0.1),
    ("per_frame", 3, None, None, 0.8, 0.25, 0.2),
    ("sdedit", None, None, 0.6, 0.7, 0.2, 0.3),
    ("no_structure", None, None, 0.6, 0.75, 0.22, 0.25),
)


def _measured() -> pd.DataFrame:
    rows = []
    for video in ("bear", "walking"):
        for method, t_s, w_t, strength, fc, pc, fwe in ROWS:
            rows.append({
                "source_uri": f"/d/JPEGImages/480p/{video}", "clip_id": video, "method": method, "prompt": PROMPT,
                "t_s": t_s, "w": 7.5, "w_t": w_t, "sdedit_strength": strength, "frame_indices": [0, 2],
                "output_uri": f"/o/{video}.mp4", "frame_consistency": fc + (0.02 if video == "walking" else 0.0),
                "frame_consistency_all_pairs": fc, "prompt_consistency": pc, "flow_warp_error": fwe,
                "input_flow_warp_error": 0.01, "depth_fidelity": float("nan") if strength else 0.9,
            })
    return pd.DataFrame(rows)


def test_per_video_table_and_metric_names():
    table = per_video_table(_measured())
    assert len(table) == 12 and list(table["video"].unique()) == ["bear", "walking"]
    assert table.groupby("method").size().to_dict() == {"gen1": 6, "no_structure": 2, "per_frame": 2, "sdedit": 2}
    assert set(table["setting"]) == {"ts3-w7.5-wt1", "ts3-w7.5-wt1.5", "ts3-w7.5-wt0", "ts3-w7.5", "s0.6-w7.5"}
    assert set(table.loc[table["setting"] == "ts3-w7.5-wt0", "method"]) == {"gen1"}
    metrics = tracking.summary_metrics(table, METRICS, "gen1")
    assert metrics["frame_consistency"] == pytest.approx(np.mean([0.9, 0.95, 0.85, 0.92, 0.97, 0.87]))
    assert metrics["frame_consistency/gen1/ts3-w7.5-wt1.5"] == pytest.approx(0.96)
    assert metrics["frame_consistency/gen1/ts3-w7.5-wt0"] == pytest.approx(0.86)
    assert metrics["frame_consistency/per_frame"] == pytest.approx(0.81)
    assert metrics["frame_consistency/no_structure/s0.6-w7.5"] == pytest.approx(0.76)
    assert metrics["frame_consistency_all_pairs/sdedit/s0.6-w7.5"] == pytest.approx(0.7)
    assert metrics["prompt_consistency/gen1"] == pytest.approx(0.85 / 3)
    assert "depth_fidelity/sdedit" not in metrics  # all NaN: left out, not logged as NaN
    assert "depth_fidelity/no_structure" not in metrics
    assert metrics["videos"] == 12.0
    assert all(np.isfinite(v) for v in metrics.values())


def test_plots_show_each_method_and_the_wt_sweep():
    table = per_video_table(_measured())
    fig = consistency_scatter(table, TINY.label())
    ax = fig.axes[0]
    means = [c for c in ax.collections if c.get_sizes()[0] == 70]
    assert len(means) == 6  # one mean marker per (method, setting)
    xy = {label: c.get_offsets()[0].tolist() for label, c in zip([t.get_text() for t in ax.get_legend().texts], means,
                                                                    strict=True)}
    assert xy["sdedit s0.6-w7.5"] == pytest.approx([0.2, 0.71])
    assert xy["no_structure s0.6-w7.5"] == pytest.approx([0.22, 0.76])
    assert "TINY RANDOM MODELS" in ax.get_title()
    fig = consistency_vs_wt(table, "sd15")
    ax = fig.axes[0]
    line, *baselines = ax.get_lines()
    assert list(line.get_xdata()) == [0.0, 1.0, 1.5]  # our model's sweep, eq. 8 at w_t = 0 included
    assert list(line.get_ydata()) == pytest.approx([0.86, 0.91, 0.96])
    assert [t.get_text() for t in ax.texts] == ["eq. 8, w_t = 0"]  # what the x = 0 point is
    # the baselines have no w_t: one horizontal line each at its frame consistency
    assert {b.get_label().split()[0]: b.get_ydata()[0] for b in baselines} == pytest.approx(
        {"no_structure": 0.76, "per_frame": 0.81, "sdedit": 0.71})
    assert "image model" not in ax.get_xlabel() + " ".join(t.get_text() for t in ax.get_legend().texts)
    mse = fig.axes[1].get_lines()[0]
    assert list(mse.get_ydata()) == pytest.approx([0.1, 0.05, 0.04])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = tracking.resolve_tracking_uri(None, tmp_path / "out")
    assert uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "out" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(None, tmp_path) == ("http://127.0.0.1:5000", None)
    assert tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/x.db", tmp_path) == (
        f"sqlite:///{tmp_path}/x.db", (tmp_path / "mlartifacts").as_uri())


def test_a_param_over_mlflows_limit_is_left_out_with_a_warning_not_cut(caplog):
    """A value cut to MLflow's 6000 characters would read as another value (or as invalid JSON)."""
    params = {"a": {"b": 1, "c": [1, 2]}, "prompts": ["a long prompt"] * 500, "fits": "x" * tracking.MAX_PARAM_CHARS}
    assert tracking.flatten_params(params) == {"a.b": "1", "a.c": "[1, 2]", "fits": "x" * tracking.MAX_PARAM_CHARS}
    assert "MLflow param 'prompts' left out: 8500 characters" in caplog.text
    assert tracking.CONFIG_ARTIFACT in caplog.text  # where the whole value is
    # the whole config goes to config.yaml as plain YAML values: tuples as lists, objects as text
    assert tracking.plain_config({"size": (64, 48), "path": Path("/x"), "grid": {"w": (7.5,)}}) == {
        "size": [64, 48], "path": "/x", "grid": {"w": [7.5]}}


def test_dataset_sources_are_mlflows_where_it_has_one_and_record_the_uri_otherwise(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a local path resolves without MLflow's "multiple ways" warning
        local = tracking.dataset_source(str(tmp_path))
    assert (local._get_source_type(), local.to_dict()) == ("local", {"uri": str(tmp_path)})
    assert tracking.dataset_source("s3://bucket/DAVIS").to_dict() == {"uri": "s3://bucket/DAVIS"}
    memory = tracking.dataset_source("memory://gen1/edits")  # a scheme MLflow has no source for
    assert (memory._get_source_type(), memory.to_dict()) == ("uri", {"uri": "memory://gen1/edits"})
    assert tracking.dataset_source("https://u:secret@host/d").to_dict() == {"url": "https://***@host/d"}


def test_the_clip_table_has_one_row_per_evaluated_clip_failed_ones_included():
    from pipelines.evaluate.report import CLIP_COLUMNS, clip_table, dataset_name

    table = per_video_table(pd.DataFrame([
        {"clip_id": c, "method": m, "source_uri": f"/d/JPEGImages/480p/{v}", "start": 0, "stride": 2, "num_frames": 4,
         "width": 64, "height": 64, "fps": 8.0, "t_s": 3, "w": 7.5, "w_t": 1.0, "prompt": PROMPT}
        for c, v in (("c1", "bear"), ("c2", "walking")) for m in (None, "per_frame")]))
    errors = [{"clip_id": "c2", "uri": "/d/JPEGImages/480p/walking", "start": 0},
              {"clip_id": "c3", "uri": "/d/JPEGImages/480p/surf", "start": 0}]
    clips = clip_table(table, errors)
    assert list(clips.columns) == [*CLIP_COLUMNS, "outputs", "failed"]
    assert clips[["clip_id", "video", "outputs", "failed"]].values.tolist() == [
        ["c1", "bear", 2, 0], ["c2", "walking", 2, 1], ["c3", "surf", 0, 1]]
    assert dataset_name(EvalConfig(dataset="davis:s3://b/data/DAVIS/")) == ("davis:DAVIS", "s3://b/data/DAVIS/")
    assert dataset_name(EvalConfig(edits="/runs/edits")) == ("edits:edits", "/runs/edits")


# ------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def models(tiny_models):
    from gen1.models import Gen1Models

    return Gen1Models.load(TINY, device="cpu")


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return tiny_square_video()


def test_metrics_stage_matches_gen1_metrics_batched_or_not(models, video, tmp_path):
    from gen1.metrics import (
        depth_fidelity,
        flow_warp_error,
        frame_consistency,
        frame_consistency_all_pairs,
        prompt_consistency,
    )
    from gen1.video import write_video
    from pipelines.edit import EditClip
    from pipelines.evaluate import read_video

    src = str(tmp_path / "input.mp4")
    write_video(video, src, 8.0)
    outputs = []
    for i, shift in enumerate((0, 40)):
        out = np.clip(video.astype(int) + shift, 0, 255).astype(np.uint8)[:, :, ::-1]
        outputs.append(str(tmp_path / f"out{i}.mp4"))
        write_video(out, outputs[-1], 8.0)
    rows = [{"clip_id": "c", "source_uri": src, "start": 0, "stride": 1, "frame_indices": [0, 1, 2, 3], "fps": 8.0,
             "width": 64, "height": 64, "output_uri": uri, "prompt": p}
            for uri, p in zip(outputs, (PROMPT, "a snowy forest"), strict=True)]
    rows.append({**rows[0], "output_uri": str(tmp_path / "missing.mp4")})
    clip, depth = models.content.clip, models.structure.depth
    stage = MetricsStage(TINY, clip=clip, depth=depth)
    batched = stage(pd.DataFrame(rows))
    single = pd.concat([MetricsStage(TINY, clip=clip, depth=depth)(pd.DataFrame([r])) for r in rows[:2]])
    source = EditClip(clip_id="c", source_uri=src, start=0, stride=1, frame_indices=(0, 1, 2, 3), fps=8.0,
                      width=64, height=64).load_frames()
    for i in range(2):
        frames = read_video(outputs[i])
        emb = clip.embed_images(frames).float()
        expected = {
            "frame_consistency": frame_consistency(emb),
            "frame_consistency_all_pairs": frame_consistency_all_pairs(emb),
            "prompt_consistency": prompt_consistency(emb, clip.embed_texts([rows[i]["prompt"]])[0]),
            "flow_warp_error": flow_warp_error(frames),
            "input_flow_warp_error": flow_warp_error(source),
            "depth_fidelity": depth_fidelity(depth(source).numpy(), depth(frames).numpy()),
        }
        for name, value in expected.items():
            assert batched.iloc[i][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
            assert single.iloc[i][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert batched.iloc[0]["prompt_consistency"] != pytest.approx(batched.iloc[1]["prompt_consistency"])
    failed = batched.iloc[2]
    assert (failed["status"], failed["error_stage"]) == ("error", "read_output")  # the errors-table convention
    assert "missing.mp4" in failed["error_message"] and pd.isna(failed["frame_consistency"])
    assert (batched.iloc[0]["status"], batched.iloc[0]["error_stage"]) == ("ok", "")


@pytest.mark.parametrize("method", BASELINES)
def test_a_failed_baseline_is_an_error_row_then_a_row_of_the_run_errors_table(tmp_path, method):
    import pickle

    from pipelines.edit import EditClip
    from pipelines.evaluate.run import _commit_errors, _split
    from pipelines.evaluate.stages import BaselineStage
    from pipelines.lease import Lease, LeaseOwner
    from pipelines.schema import TableStore, read_errors

    clip = EditClip(clip_id="c", source_uri=str(tmp_path / "missing.mp4"), start=0, stride=1, frame_indices=(0, 1),
                    fps=8.0, width=64, height=64)
    task = {"edit_key": "k0", "clip": pickle.dumps(clip), "clip_id": "c", "source_uri": clip.source_uri, "start": 0,
            "method": method, "prompt": PROMPT, "image_uri": None, "t_s": 3 if method == "per_frame" else None,
            "sdedit_strength": None if method == "per_frame" else 0.6, "w": 7.5, "steps": 2, "seed": 0,
            "sampler": "ddim"}
    out = BaselineStage(TINY, str(tmp_path / "baselines"), models=object())(pd.DataFrame([task]))
    (row,) = out.to_dict("records")
    assert (row["status"], row["error_stage"]) == ("error", method) and pd.isna(row["output_uri"])
    assert "missing.mp4" in row["error_message"] and "clip" not in row
    measured, failed = _split(out)
    assert measured.empty and len(failed) == 1
    run_dir = str(tmp_path / "out" / "run")
    store = TableStore(run_dir)
    with Lease(store, LeaseOwner.here("eval-run", "eval"), ttl_s=60.0) as lease:  # what run_eval holds
        records = _commit_errors(store, lease, failed)
    errors = read_errors(run_dir).to_pylist()
    assert len(records) == len(errors) == 1
    assert (errors[0]["clip_id"], errors[0]["stage"], errors[0]["uri"]) == ("c", method, clip.source_uri)
    assert errors[0]["message"].startswith("edit k0: ") and errors[0]["traceback"]


def test_baseline_tasks_one_per_method_and_setting_with_stable_keys(tmp_path):
    from pipelines.datasets import SequenceClip
    from pipelines.evaluate.run import baseline_tasks

    clip = SequenceClip(clip_id="c", source_uri="/d/JPEGImages/480p/bear", start=0, stride=1, frame_indices=(0, 1),
                        fps=8.0, width=64, height=64, sequence=None)
    ours = pd.DataFrame([
        {"clip_id": "c", "source_uri": clip.source_uri, "start": 0, "stride": 1, "frame_indices": [0, 1],
         "num_frames": 2, "width": 64, "height": 64, "fps": 8.0, "caption": None, "prompt": PROMPT, "image_uri": None,
         "prompt_tag": None, "masked": False, "t_s": t_s, "w": 7.5, "w_t": w_t, "seed": 0, "steps": 2, "sampler": "ddim"}
        for t_s, w_t in ((3, 1.0), (3, 1.5), (5, 1.0))
    ])
    cfg = EvalConfig(dataset="davis:/d", sdedit_strength=0.5)
    tasks = baseline_tasks(cfg, TINY, [clip], ours)
    by_method = {m: [t for t in tasks if t["method"] == m] for m in BASELINES}
    # per_frame: one per t_s (w_t is not its setting); the SDEdit-style methods: one per (strength, w, seed)
    assert [t["t_s"] for t in by_method["per_frame"]] == [3, 5]
    assert all(t["sdedit_strength"] is None and t["w_t"] is None for t in by_method["per_frame"])
    for m in ("sdedit", "no_structure"):
        (task,) = by_method[m]
        assert (task["t_s"], task["w_t"], task["sdedit_strength"]) == (None, None, 0.5)
    assert len({t["edit_key"] for t in tasks}) == len(tasks) == 4
    assert [t["edit_key"] for t in baseline_tasks(cfg, TINY, [clip], ours)] == [t["edit_key"] for t in tasks]
    only = baseline_tasks(EvalConfig(dataset="davis:/d", baselines=("no_structure",), sdedit_strength=0.5), TINY,
                          [clip], ours)
    assert [t["edit_key"] for t in only] == [by_method["no_structure"][0]["edit_key"]]


def test_baseline_stage_dispatches_on_the_method(models, video, tmp_path, monkeypatch):
    import pickle

    from gen1 import baselines
    from gen1.video import write_video
    from pipelines.edit import EditClip
    from pipelines.evaluate import read_video
    from pipelines.evaluate.stages import BaselineStage

    src = str(tmp_path / "input.mp4")
    write_video(video, src, 8.0)
    clip = EditClip(clip_id="c", source_uri=src, start=0, stride=1, frame_indices=tuple(range(len(video))), fps=8.0,
                    width=video.shape[2], height=video.shape[1])
    tasks = [{"edit_key": f"k-{m}", "clip": pickle.dumps(clip), "clip_id": "c", "method": m, "prompt": PROMPT,
              "image_uri": None, "t_s": 3 if m == "per_frame" else None,
              "sdedit_strength": None if m == "per_frame" else 0.6, "w": 7.5, "steps": 2, "seed": 0, "sampler": "ddim"}
             for m in BASELINES]
    ran = []

    def recorded(name):
        fn = getattr(baselines, name)

        def record(*args, **kwargs):
            ran.append((name, type(args[3]).__name__))  # the function and its settings' type
            return fn(*args, **kwargs)

        return record

    for name in ("per_frame_video", "sdedit_video", "no_structure_video"):
        monkeypatch.setattr(baselines, name, recorded(name))
    out = BaselineStage(TINY, str(tmp_path / "baselines"), models=models)(pd.DataFrame(tasks))
    assert ran == [("per_frame_video", "EditSettings"), ("sdedit_video", "SDEditSettings"),
                   ("no_structure_video", "SDEditSettings")]
    assert list(out["status"]) == ["ok"] * 3 and list(out["method"]) == list(BASELINES)
    outputs = [read_video(u) for u in out["output_uri"]]
    assert all(o.shape == video.shape for o in outputs)
    assert all(u.endswith(f"/baselines/outputs/c/k-{m}.mp4") for m, u in zip(out["method"], out["output_uri"],
                                                                                strict=True))


# --------------------------------------------------------------------------------- MLflow server

SCREENSHOT = ROOT / "docs" / "mlflow-eval-run.png"  # the README's picture of the run page (GEN1_SCREENSHOT_UPDATE=1)


@pytest.fixture(scope="module")
def davis_eval_run(tiny_models, davis_root, tmp_path_factory):
    """A tiny-model DAVIS eval logged to its own MLflow server (SQLite, 127.0.0.1), the server kept up for the
    module's tests: ``(server URI, EvalSummary, scratch dir)``. System metrics are sampled every second."""
    from pipelines.evaluate import run_eval

    tmp = tmp_path_factory.mktemp("davis_eval")
    with mlflow_server(tmp) as uri, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        cfg = EvalConfig(
            dataset=f"davis:{davis_root}", out=str(tmp / "out"), models="tiny", steps=2,
            grid={"t_s": [3], "w": [7.5], "w_t": [1.0], "seeds": [0]}, prompts=(PROMPT,), mask="objects",
            tracking_uri=uri, experiment="gen1-eval-test", run_name="tiny-davis", sample_videos=1, num_cpus=2,
            progress=False,
        )
        summary = run_eval(cfg)
        assert os.environ.get("MLFLOW_TRACKING_URI") != uri  # run_eval restored MLflow's global tracking URI
        yield uri, summary, tmp


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_davis_eval_is_logged_to_an_mlflow_server(davis_eval_run, davis_root):
    from mlflow.tracking import MlflowClient

    uri, summary, tmp_path = davis_eval_run
    # 2 sequences x (gen1, per_frame, sdedit, no_structure)
    assert summary.videos == 8 and summary.failed == 0
    assert summary.by_method == {"gen1": 2, "per_frame": 2, "sdedit": 2, "no_structure": 2}

    client = MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-davis"
    params = run.data.params
    assert params["models.unet"] == "tiny:unet" and params["models.tiny"] == "true"
    assert params["sampler"] == "ddim" and params["steps"] == "2"
    assert json.loads(params["guidance"]) == [7.5] and json.loads(params["t_s"]) == [3]
    assert json.loads(params["temporal_guidance"]) == [1.0]  # the grid's: no w_t = 0 added for a baseline
    assert json.loads(params["baselines"]) == ["per_frame", "sdedit", "no_structure"]
    assert run.data.tags["gen1.tiny_models"] == "true"
    assert "TINY RANDOM MODELS" in run.data.tags["gen1.models"]

    # mlflow.log_table's JSON: {"columns": [...], "data": [[...], ...]} (read through the client: no
    # global MLflow state is left behind for later tests)
    local = client.download_artifacts(summary.run_id, "eval/per_video.json", str(tmp_path / "dl"))
    logged = json.loads(Path(local).read_text())
    table = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert len(table) == 8 and set(table["video"]) == {"walking", "megamind"}
    assert table.groupby("method").size().to_dict() == {"gen1": 2, "no_structure": 2, "per_frame": 2, "sdedit": 2}
    assert set(table["setting"]) == {"ts3-w7.5-wt1", "ts3-w7.5", "s0.6-w7.5"}
    assert table[table["video"] == "walking"]["masked"].all()  # DAVIS annotations -> masked edits
    metrics = run.data.metrics
    for name in ("frame_consistency", "prompt_consistency", "frame_consistency_all_pairs", "flow_warp_error",
                 "depth_fidelity", "frame_consistency/per_frame", "frame_consistency/per_frame/ts3-w7.5",
                 "frame_consistency/sdedit/s0.6-w7.5", "frame_consistency/no_structure/s0.6-w7.5",
                 "prompt_consistency/gen1/ts3-w7.5-wt1"):
        assert np.isfinite(metrics[name]), name
    gen1 = table[table["method"] == "gen1"]
    assert metrics["frame_consistency"] == pytest.approx(gen1["frame_consistency"].mean())
    for method in ("sdedit", "no_structure"):
        assert metrics[f"prompt_consistency/{method}"] == pytest.approx(
            table[table["method"] == method]["prompt_consistency"].mean())
    assert 0.5 < metrics["depth_fidelity"] <= 1.0 and metrics["flow_warp_error"] >= 0

    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert plots == {"plots/frame_vs_prompt_consistency.png", "plots/consistency_vs_wt.png"}
    png = Path(client.download_artifacts(summary.run_id, "plots/consistency_vs_wt.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [a.path for a in client.list_artifacts(summary.run_id, "samples")]
    assert len(samples) == 1 and samples[0].endswith(".mp4")
    from gen1.decoding import probe

    sample = probe(client.download_artifacts(summary.run_id, samples[0], str(tmp_path)))
    assert sample.width == 5 * TINY.width  # input | ours | per-frame | SDEdit | no structure
    assert Path(summary.table_uri).is_file()
    assert not (tmp_path / "out" / "mlflow.db").exists()  # the configured server, not the local default

    # the evaluated clips as the run's input: the dataset's root as source, one row per clip
    (used,) = run.inputs.dataset_inputs
    name = f"davis:{davis_root.name}"
    assert (used.dataset.name, json.loads(used.dataset.source)) == (name, {"uri": str(davis_root)})
    assert json.loads(used.dataset.profile)["num_rows"] == 2
    assert run.info.end_time - run.info.start_time >= 1000 * summary.seconds * 0.9  # it spans the evaluation
    assert run.data.tags["mlflow.note.content"].startswith("eval tiny-davis: 8 videos (0 failed; gen1 2, ")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_eval_run_page_shows_metrics_dataset_and_per_video_table_in_a_browser(davis_eval_run, davis_root):
    """The run as its reader sees it in the MLflow UI (headless Chromium): the summary line, the duration of
    the evaluation, the input dataset, system and model metrics; the per-video table in the Artifacts tab.
    With GEN1_SCREENSHOT_UPDATE=1 the run page's screenshot is written to docs/ for the README."""
    from mlflow.tracking import MlflowClient

    from tests.fixtures import browser

    uri, summary, tmp_path = davis_eval_run
    run = MlflowClient(uri).get_run(summary.run_id)
    page_url = f"{uri}/#/experiments/{summary.experiment_id}/runs/{summary.run_id}"
    page = browser.page_text(page_url)
    assert "tiny-davis" in page and "Finished" in page, page[:3000]
    assert "eval tiny-davis: 8 videos (0 failed; gen1 2, no_structure 2, per_frame 2, sdedit 2)" in page  # description
    duration = re.search(r"Duration ([\d.]+)(s|min)", page)
    assert duration, page[:3000]
    seconds = float(duration[1]) * (60 if duration[2] == "min" else 1)
    assert seconds == pytest.approx((run.info.end_time - run.info.start_time) / 1000, rel=0.1, abs=0.2)
    assert seconds >= 0.9 * summary.seconds  # the evaluation's duration, not the seconds it took to log it
    digest = run.inputs.dataset_inputs[0].dataset.digest
    assert re.search(rf"Datasets davis:{davis_root.name} \({digest[:8]}\w*\) eval", page, re.I), page[:3000]
    assert "system/cpu_utilization_percentage" in page and "system/system_memory_usage_megabytes" in page
    for name in ("frame_consistency", "prompt_consistency", "depth_fidelity", "frame_consistency/per_frame"):
        assert re.search(rf"(^| ){re.escape(name)} -?[\d.]+", page), name

    # the Artifacts tab shows the per-video table: its columns, and its first page of rows (3 a page)
    text = browser.page_text(f"{page_url}/artifacts/eval/per_video.json")
    assert "eval/per_video.json" in text and "View as table" in text, text[:3000]
    logged = pd.read_parquet(summary.table_uri)
    header = re.search(re.escape(" ".join(logged.columns)), text)
    assert header, text[:3000]
    rows = text[header.end():]
    for row in logged.head(3).to_dict("records"):
        shown = re.search(rf"{row['video']} {row['clip_id']} {row['method']} {re.escape(row['setting'])} {PROMPT} "
                          r".*?\[[\d, ]+\] (-?[\d.]+)", rows)  # ... frame_indices, then frame_consistency
        assert shown and float(shown[1]) == pytest.approx(row["frame_consistency"], abs=1e-9), (row, rows[:2000])
        rows = rows[shown.end():]

    png = browser.screenshot(page_url, tmp_path / "run.png", size=(1400, 1500))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("GEN1_SCREENSHOT_UPDATE") == "1":
        from PIL import Image

        SCREENSHOT.parent.mkdir(exist_ok=True)
        Image.open(png).convert("RGB").quantize(colors=128).save(SCREENSHOT, optimize=True)


# ---------------------------------------------------------------------------------- ray job submit


def _wait_for_http(url: str, timeout: float) -> None:
    """Until the server at ``url`` answers HTTP at all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:  # it answers (401: token auth is on; `ray job submit` sends the token)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout:.0f}s: {e}") from e
        time.sleep(1.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_of_the_eval_entry_point(tiny_models, davis_root, tmp_path):
    from tests.fixtures import ray_cluster as rc

    out = tmp_path / "out"
    with rc.start_ray_cluster(include_dashboard=True) as cluster:
        _wait_for_http(f"http://{cluster.dashboard_address}/api/version", timeout=120)
        runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT), "GEN1_TINY_DIR": os.environ["GEN1_TINY_DIR"],
                                    "HF_HUB_OFFLINE": "1"}}
        cmd = [
            str(Path(sys.executable).with_name("ray")), "job", "submit",
            "--address", f"http://{cluster.dashboard_address}", "--submission-id", "gen1-eval-test",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            sys.executable, "-m", "jobs.entrypoints.eval", "--dataset", f"davis:{davis_root}", "--sequences", "walking",
            "--models", "tiny", "--steps", "1", "--grid", "wt=1.0", "--baselines", "per_frame", "--prompts", PROMPT,
            "--sample-videos", "0", "--out", str(out), "--run-name", "ray-job",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        proc = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=540)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert "Job 'gen1-eval-test' succeeded" in output, output[-6000:]
        assert "eval ray-job: 2 videos (0 failed; gen1 1, per_frame 1)" in output, output[-6000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("gen1-eval").experiment_id)
    assert run.info.run_name == "ray-job" and np.isfinite(run.data.metrics["frame_consistency"])
    assert len(pd.read_parquet(out / "ray-job" / "per_video.parquet")) == 2


def test_a_missing_prompt_that_pandas_made_nan_is_image_content():
    """An all-image-prompt manifest comes back through pandas with NaN prompts: they must not read as text
    (the per-frame baseline of image prompts failed with TypeError on it)."""
    import pandas as pd

    from pipelines.evaluate.stages import text_prompt

    rows = pd.DataFrame({"prompt": [None, None], "image_uri": ["a.png", "b.png"]}).astype({"prompt": float})
    assert [text_prompt(r) for r in rows.to_dict("records")] == [None, None]
    assert text_prompt({"prompt": "a watercolor painting"}) == "a watercolor painting"
    assert text_prompt({"prompt": ""}) is None and text_prompt({}) is None
