"""The miniature reproduction (`jobs.benchmarks.mini_repro`): its report's pure parts, and a 2-minute run end
to end that must produce a complete report (every key, finite numbers), plots and an MLflow run. Whether the
trends appear is the full run's question (README, Miniature reproduction), not this test's."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from jobs.benchmarks import mini_repro
from tests.fixtures.clips import opencv_doc_clips

MEASURES = ("flow_warp_error", "frame_mse", "depth_corr", "grad_corr", "own", "other")


def test_budget_shares_are_taken_of_the_time_left():
    budget = mini_repro.Budget()
    phases = [f for f in vars(budget)]
    assert math.isclose(sum(vars(budget).values()), 1.0)
    assert budget.share("preprocess", 100.0, set()) == pytest.approx(100.0 * budget.preprocess)
    # the last phase left gets all that is left
    assert budget.share("eval", 42.0, set(phases) - {"eval"}) == pytest.approx(42.0)
    with pytest.raises(ValueError, match="sum to 1"):
        mini_repro.Budget(eval=0.5)


def test_report_averages_each_setting_and_keeps_the_baseline_apart():
    rows = []
    for t_s in mini_repro.TS_VALUES:
        for w_t in mini_repro.WT_VALUES:
            rows.append(dict(method="gen1", t_s=t_s, w_t=w_t, flow_warp_error=w_t, frame_mse=2 * w_t,
                             depth_corr=-t_s, grad_corr=t_s / 10, own=0.1, other=0.3))
        rows.append(dict(method="per_frame", t_s=t_s, w_t=None, flow_warp_error=9.0, frame_mse=8.0,
                         depth_corr=1.0, grad_corr=0.5, own=0.2, other=0.2))
    rep = mini_repro.report(pd.DataFrame(rows))
    assert list(rep["wt"]) == ["0.5", "1", "1.5", "2"] and list(rep["ts"]) == ["0", "2", "4", "7"]
    assert rep["wt"]["1.5"] == {"flow_warp_error": 1.5, "frame_mse": 3.0}
    assert rep["ts"]["7"] == {"depth_corr": -7.0, "grad_corr": pytest.approx(0.7)}
    assert rep["image_prompt"] == {"own": pytest.approx(0.1), "other": pytest.approx(0.3)}
    assert rep["per_frame"]["temporal"] == {"flow_warp_error": 9.0, "frame_mse": 8.0}
    assert mini_repro.flat_metrics({"wt": {"0.5": {"frame_mse": 1.0}}, "x": float("nan")}) == {"wt/0.5/frame_mse": 1.0}


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    else:
        yield value


@pytest.mark.slow  # about 3-5 minutes on 2 CPUs: preprocess twice, VAE, four stages, eval with Ray
def test_a_two_minute_reproduction_writes_a_complete_report(tiny_models, tmp_path):
    opencv_doc_clips()  # skips (or fails where real parts are required) without opencv-doc's footage
    out = tmp_path / "mini"
    assert mini_repro.main(["--out", str(out), "--minutes", "2", "--clips-per-video", "3", "--heldout-clips", "1",
                            "--edit-steps", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) == {"wt", "ts", "image_prompt", "vae_psnr", "minutes", "per_frame"}
    assert set(rep["wt"]) == {"0.5", "1", "1.5", "2"} and set(rep["ts"]) == {"0", "2", "4", "7"}
    assert all(set(v) == {"flow_warp_error", "frame_mse"} for v in rep["wt"].values())
    assert all(set(v) == {"depth_corr", "grad_corr"} for v in rep["ts"].values())
    assert set(rep["image_prompt"]) == {"own", "other"}
    assert set(rep["per_frame"]) == {"temporal", "ts", "image_prompt"}
    numbers = list(_numbers(rep))
    assert len(numbers) == 8 + 8 + 2 + 2 + 2 + 8 + 2 and all(math.isfinite(x) for x in numbers), rep
    for name in ("fig4_wt.png", "fig4_ts.png"):
        assert (out / "plots" / name).stat().st_size > 0
    details = json.loads((out / "details.json").read_text())
    assert set(details["stages"]) == set(mini_repro.STAGES)
    assert all(s["steps"] >= 1 for s in details["stages"].values())

    from pipelines import tracking

    run = tracking.client(f"sqlite:///{out / 'mlflow.db'}").get_run(details["mlflow_run_id"])
    assert run.data.metrics["vae_psnr"] == pytest.approx(rep["vae_psnr"])
    assert run.data.metrics["wt/1.5/flow_warp_error"] == pytest.approx(rep["wt"]["1.5"]["flow_warp_error"])
