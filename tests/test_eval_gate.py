"""The eval regression gate (issue 9, item 6): threshold arithmetic and worst-video ranking without a server,
then baseline -> regressed -> passing runs logged to an MLflow server through `gen1 eval`'s entry point, with
its exit codes, tags and the worst-videos artifact read back."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gen1.config import ConfigError
from jobs.exit_codes import EXIT_BAD_INPUT
from pipelines import regression
from pipelines.evaluate import per_video_table
from pipelines.regression import GateConfig, Threshold, compare, worst_videos

PROMPT = "a watercolor painting"
VIDEOS = ("bear", "walking", "surf")


def _measured(fc: dict[str, float] | None = None, pc_shift: float = 0.0,
              no_structure: dict[str, float] | None = None) -> pd.DataFrame:
    """Measured rows of 3 videos x (gen1 w_t 1.0, 1.5 as edit-manifest rows; the baselines per_frame, sdedit,
    no_structure): frame consistency of our model's rows is ``fc[video]`` (default 0.95), + 0.01 at w_t 1.5;
    of the baselines' 0.8, of no_structure's ``no_structure[video]`` if given."""
    fc, no_structure = fc or {}, no_structure or {}
    rows = []
    for video in VIDEOS:
        for method, w_t, strength in ((None, 1.0, None), (None, 1.5, None), ("per_frame", None, None),
                                      ("sdedit", None, 0.6), ("no_structure", None, 0.6)):
            base = fc.get(video, 0.95) if method is None else 0.8
            if method == "no_structure":
                base = no_structure.get(video, base)
            rows.append({
                "source_uri": f"/d/JPEGImages/480p/{video}", "clip_id": f"id-{video}", "method": method,
                "prompt": PROMPT, "t_s": None if strength else 3, "w": 7.5, "w_t": w_t, "sdedit_strength": strength,
                "frame_indices": [0, 2], "fps": 8.0, "output_uri": f"/o/{video}-{method}-{w_t}.mp4",
                "frame_consistency": base + (0.01 if w_t == 1.5 else 0.0), "frame_consistency_all_pairs": base,
                "prompt_consistency": 0.3 + pc_shift, "flow_warp_error": 0.02, "input_flow_warp_error": 0.01,
                "depth_fidelity": 0.9,
            })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ no server


def test_compare_applies_direction_and_absolute_or_relative_thresholds():
    thresholds = GateConfig().thresholds
    assert thresholds == {"frame_consistency": Threshold(0.01), "prompt_consistency": Threshold(0.005),
                          "flow_warp_error": Threshold(0.10, relative=True)}
    base = {"frame_consistency": 0.95, "prompt_consistency": 0.30, "flow_warp_error": 0.010}
    checks = {c.metric: c for c in compare(
        {"frame_consistency": 0.93, "prompt_consistency": 0.298, "flow_warp_error": 0.0125}, base, thresholds)}
    assert checks["frame_consistency"].drop == pytest.approx(0.02) and checks["frame_consistency"].regressed
    assert checks["prompt_consistency"].drop == pytest.approx(0.002) and not checks["prompt_consistency"].regressed
    # lower is better: an error 25% up is a 0.25 relative drop
    assert checks["flow_warp_error"].drop == pytest.approx(0.25) and checks["flow_warp_error"].regressed
    better = {c.metric: c for c in compare(
        {"frame_consistency": 0.97, "prompt_consistency": 0.31, "flow_warp_error": 0.005}, base, thresholds)}
    assert better["flow_warp_error"].drop == pytest.approx(-0.5)
    assert not any(c.regressed for c in better.values())
    edge = compare({"frame_consistency": 0.94}, {"frame_consistency": 0.95, "flow_warp_error": 0.01},
                   {"frame_consistency": Threshold(0.01), "flow_warp_error": Threshold(0.1, True),
                    "prompt_consistency": Threshold(0.005)})
    assert [(c.metric, c.regressed, c.note) for c in edge] == [
        ("frame_consistency", False, ""),  # a drop of exactly the threshold passes
        ("flow_warp_error", True, "missing in this run"),
        ("prompt_consistency", False, "not in the baseline"),
    ]


def test_gate_config_from_yaml_mapping():
    cfg = GateConfig.from_value({"thresholds": {"frame_consistency": 0.05,
                                                "flow_warp_error/gen1": {"max_drop": 0.2, "relative": True}},
                                 "worst_videos": 3})
    assert cfg.thresholds["frame_consistency"] == Threshold(0.05)
    assert cfg.thresholds["flow_warp_error/gen1"] == Threshold(0.2, relative=True)
    assert cfg.thresholds["prompt_consistency"] == Threshold(0.005)  # defaults kept for metrics not named
    assert cfg.worst_videos == 3
    with pytest.raises(ConfigError, match=r"unknown keys \['threshold'\]"):
        GateConfig.from_value({"threshold": {}})
    with pytest.raises(ConfigError, match="expected keys max_drop"):
        GateConfig.from_value({"thresholds": {"frame_consistency": {"drop": 0.1}}})
    with pytest.raises(ConfigError, match="max_drop: expected a finite number >= 0, found -0.1"):
        GateConfig.from_value({"thresholds": {"frame_consistency": -0.1}})


def test_worst_videos_rank_by_per_video_drop_else_by_score():
    base = per_video_table(_measured())
    now = per_video_table(_measured({"walking": 0.80, "surf": 0.90}))
    checks = compare({"frame_consistency": 0.9}, {"frame_consistency": 0.955}, {"frame_consistency": Threshold(0.01)})
    worst = worst_videos(now, base, checks, n=3)
    assert list(worst["video"]) == ["walking", "walking", "surf"]
    assert list(worst["drop"]) == pytest.approx([0.15, 0.15, 0.05])
    assert set(worst["method"]) == {"gen1"} and set(worst["basis"]) == {"drop vs baseline"}
    assert list(worst["baseline"]) == pytest.approx([0.95, 0.96, 0.95])
    by_score = worst_videos(now, None, checks, n=2)  # no baseline table: the lowest scores
    assert list(by_score["current"]) == pytest.approx([0.80, 0.81]) and set(by_score["basis"]) == {"lowest score"}
    # a baseline's metric (metric/method) ranks that method's rows
    now = per_video_table(_measured(no_structure={"surf": 0.7}))
    checks = compare({"frame_consistency/no_structure": 0.767}, {"frame_consistency/no_structure": 0.8},
                     {"frame_consistency/no_structure": Threshold(0.01)})
    worst = worst_videos(now, base, checks, n=1)
    assert (list(worst["video"]), list(worst["method"]), list(worst["drop"])) == (["surf"], ["no_structure"],
                                                                                  pytest.approx([0.1]))


# ------------------------------------------------------------------------------------- MLflow server


@pytest.fixture
def fake_eval(monkeypatch):
    """`gen1 eval --edits` with the Ray/model part (the weights check and `pipelines.evaluate.run._measured`)
    replaced by a fixed measured table (set ``tables[run]``, or a function returning one, called where the
    measuring would run): the rest (the lease, the MLflow run, the per-video table, the gate, acceptance,
    exit codes) is the real code."""
    import gen1.models
    from pipelines.evaluate import run

    tables: dict[str, pd.DataFrame] = {}

    def measured(cfg, specs, run_dir, bookkeeping_errors):
        table = tables[cfg.run_name]
        return (table() if callable(table) else table).assign(status="ok")

    monkeypatch.setattr(gen1.models, "check_weights", lambda specs, components: None)
    monkeypatch.setattr(run, "_measured", measured)
    return tables


def _eval(uri: str, out: Path, experiment: str, run_name: str, *extra: str) -> int:
    from jobs.commands.eval import main

    return main(["--edits", str(out / "edits"), "--out", str(out), "--tracking-uri", uri, "--experiment", experiment,
                 "--run-name", run_name, "--sample-videos", "0", *extra])


def _run(client, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return run


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gate_fails_a_regressed_eval_against_the_accepted_baseline(mlflow_server_uri, fake_eval, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.exit_codes import EXIT_REGRESSED

    uri, exp = mlflow_server_uri, "gate-test"
    client = MlflowClient(uri)
    fake_eval["base"] = _measured()
    fake_eval["regressed"] = _measured({"walking": 0.85})  # headline 0.955 -> 0.92155...: drop 0.0333 > 0.01
    fake_eval["ok"] = _measured({"surf": 0.94}, pc_shift=-0.002)  # drops 0.0033 and 0.002: within thresholds

    # no baseline yet: passes with a note; --accept-baseline makes it the baseline
    assert _eval(uri, tmp_path, exp, "base", "--accept-baseline") == 0
    base = _run(client, exp, "base")
    assert base.data.tags[regression.STATUS_TAG] == regression.NO_BASELINE
    assert base.data.tags[regression.BASELINE_TAG] == regression.BASELINE_ACCEPTED

    capsys.readouterr()
    assert _eval(uri, tmp_path, exp, "regressed", "--accept-baseline") == EXIT_REGRESSED
    err = capsys.readouterr().err
    assert "REGRESSED" in err and "frame_consistency 0.9550 -> 0.9217" in err and "worst_videos.json" in err
    bad = _run(client, exp, "regressed")
    assert bad.data.tags[regression.STATUS_TAG] == regression.REGRESSED
    assert bad.data.tags[regression.BASELINE_RUN_TAG] == base.info.run_id
    assert regression.BASELINE_TAG not in bad.data.tags  # a regressed run is never accepted
    path = client.download_artifacts(bad.info.run_id, regression.WORST_ARTIFACT, str(tmp_path))
    data = json.loads(Path(path).read_text())
    worst = pd.DataFrame(data["data"], columns=data["columns"])
    assert list(worst["metric"]) == ["frame_consistency"] * 6  # the regressed metric only; 6 gen1 rows in all
    assert list(worst["video"][:2]) == ["walking", "walking"] and set(worst["video"][2:]) == {"bear", "surf"}
    assert list(worst["drop"]) == pytest.approx([0.1, 0.1, 0, 0, 0, 0], abs=1e-9)
    assert list(worst["current"][:2]) == pytest.approx([0.85, 0.86])
    report = json.loads(Path(client.download_artifacts(bad.info.run_id, regression.REPORT_ARTIFACT,
                                                       str(tmp_path))).read_text())
    checks = {c["metric"]: c for c in report["checks"]}
    assert checks["frame_consistency"]["regressed"] and checks["frame_consistency"]["drop"] == pytest.approx(0.1 / 3)
    assert not checks["prompt_consistency"]["regressed"] and not checks["flow_warp_error"]["regressed"]

    assert _eval(uri, tmp_path, exp, "ok") == 0
    ok = _run(client, exp, "ok")
    assert ok.data.tags[regression.STATUS_TAG] == regression.PASSED
    assert ok.data.tags[regression.BASELINE_RUN_TAG] == base.info.run_id
    assert not [a for a in client.list_artifacts(ok.info.run_id, "eval/regression") if "worst" in a.path]

    # a reviewer accepts the passing run: the gate of later runs compares with it
    from mlflow.exceptions import MlflowException

    from jobs.commands.eval import main

    assert main(["--accept", ok.info.run_id, "--tracking-uri", uri]) == 0
    assert regression.find_baseline(client, ok.info.experiment_id).info.run_id == ok.info.run_id
    with pytest.raises(MlflowException, match="0" * 32):
        main(["--accept", "0" * 32, "--tracking-uri", uri])


def test_accept_needs_a_tracking_uri(monkeypatch, capsys):
    from jobs.commands.eval import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--accept", "abc"]) == EXIT_BAD_INPUT
    assert "--tracking-uri" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tracking_uri_with_credentials_is_never_logged_printed_or_stored_verbatim(
    mlflow_server_uri, fake_eval, tmp_path, capsys, caplog
):
    """Issue 17, item 6: ``user:pass@`` in the tracking URI reaches the server (requests sends it as basic
    auth) but no log line, printed line, JSON summary, MLflow param or tag; nor does a query token."""
    import logging

    from mlflow.tracking import MlflowClient

    from jobs.commands.eval import main
    from pipelines.evaluate import EvalConfig

    uri = mlflow_server_uri.replace("://", "://gen1-user:pw-4k2j@")
    fake_eval["secret"] = _measured()
    with caplog.at_level(logging.INFO):
        assert _eval(uri, tmp_path, "redact-test", "secret", "--json") == 0
        run = _run(MlflowClient(mlflow_server_uri), "redact-test", "secret")
        assert main(["--accept", run.info.run_id, "--tracking-uri", uri]) == 0
    out = capsys.readouterr()
    summary = json.loads(next(line for line in out.out.splitlines() if line.startswith("{")))
    config = Path(MlflowClient(mlflow_server_uri).download_artifacts(run.info.run_id, "config.yaml",
                                                                    str(tmp_path))).read_text()
    stored = json.dumps({"params": run.data.params, "tags": run.data.tags}) + config  # tags: the description too
    for text in (caplog.text, out.out, out.err, stored):
        assert "pw-4k2j" not in text and "gen1-user" not in text
    assert summary["tracking_uri"] == mlflow_server_uri.replace("://", "://***@")
    assert "://***@127.0.0.1" in yaml.safe_load(config)["tracking_uri"]
    assert "MLflow: tracking http://***@127.0.0.1" in caplog.text
    queried = EvalConfig(edits="e", tracking_uri="https://u:p@mlflow.example.com/api?token=tok-9&ws=a").as_dict()
    assert queried["tracking_uri"] == "https://***@mlflow.example.com/api?token=***&ws=***"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_eval_run_spans_the_evaluation_and_reads_well_in_mlflow(mlflow_server_uri, fake_eval, tmp_path,
                                                                     monkeypatch, capsys):
    """Issue 18: the run is open for the whole evaluation (2 s of measuring show in its duration), names the
    evaluated clips as its input dataset, samples system metrics, has the summary line as its description and
    the whole config as config.yaml (not as a param); an evaluation that raises leaves a FAILED run."""
    import time

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    uri, exp = mlflow_server_uri, "reads-well"
    client = MlflowClient(uri)
    fake_eval["slow"] = lambda: (time.sleep(2.0), _measured())[1]
    assert _eval(uri, tmp_path, exp, "slow", "--json") == 0
    summary = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    run = _run(client, exp, "slow")
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time >= 2000

    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "edits:edits" and len(used.dataset.digest) >= 8
    assert json.loads(used.dataset.source) == {"uri": str(tmp_path / "edits")}
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "eval")]
    assert json.loads(used.dataset.profile)["num_rows"] == len(VIDEOS)  # one row per clip
    columns = [c["name"] for c in json.loads(used.dataset.schema)["mlflow_colspec"]]
    assert columns[:3] == ["clip_id", "video", "source_uri"] and columns[-2:] == ["outputs", "failed"]

    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu)
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith(f"eval slow: {len(VIDEOS) * 5} videos (0 failed; gen1 6, no_structure 3, ")
    assert f"MLflow run {run.info.run_id}" in description and description.endswith(summary["gate_line"])
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert (config["edits"], config["run_name"], config["sample_videos"]) == (str(tmp_path / "edits"), "slow", 0)
    assert "config" not in run.data.params and run.data.params["videos"] == str(len(VIDEOS))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/per_video.json",
                                                                              "eval/per_video.csv"}

    def fails():
        raise RuntimeError("measuring failed")

    fake_eval["boom"] = fails
    with pytest.raises(RuntimeError, match="measuring failed"):
        _eval(uri, tmp_path, exp, "boom")
    assert _run(client, exp, "boom").info.status == "FAILED"
