"""Pluggable editors (`gen1.editors`): what each takes and refuses before any work, their keys, each editor's
edit of a real clip with its tiny components (the same loaders as real weights), and `gen1 edit` over a grid
of editors on local Ray."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gen1.config import SD15, TINY, ConfigError
from gen1.decoding import probe
from gen1.editors import EDITORS, editor_class, editor_weights
from gen1.prompts import PromptSpec
from pipelines.edit import (
    EditClip,
    EditGrid,
    EditJobConfig,
    EditStage,
    edit_key,
    model_key,
    plan_tasks,
    read_manifest,
)
from pipelines.edit.keys import editor_key
from pipelines.sources import plan_video

STEPS = 2
PROMPT = "a watercolor painting of a street"


def _clip(uri: str) -> EditClip:
    (plan,) = plan_video(uri, TINY.frames, 1, 1, (TINY.width, TINY.height))
    return EditClip.from_plan(plan.as_dict())


@pytest.fixture(scope="module")
def tree(real_clips, tmp_path_factory) -> Path:
    """A library of one real clip (opencv-doc's tree.avi, cinepak)."""
    root = tmp_path_factory.mktemp("editors-library")
    shutil.copy(next(p for p in real_clips if Path(p).name == "tree.avi"), root / "tree.avi")
    return root


# ------------------------------------------------------------------------------------------ no models


def test_each_editor_declares_its_settings_and_weight_specs():
    assert list(EDITORS) == ["gen1", "sd-depth", "animatediff-depth", "wan-vace"]
    assert EDITORS["gen1"].takes >= {"t_s", "w", "w_t", "sampler", "reference_image", "mask"}
    assert EDITORS["sd-depth"].takes == {"w", "strength"}
    assert EDITORS["animatediff-depth"].takes == {"w", "strength", "controlnet_scale"}
    assert EDITORS["wan-vace"].takes == {"w", "controlnet_scale", "reference_image", "mask"}
    full = {n: editor_weights(n, SD15) for n in EDITORS if n != "gen1"}
    assert full["sd-depth"] == {"pipeline": "hf:stabilityai/stable-diffusion-2-depth"}
    assert full["animatediff-depth"] == {
        "base": "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
        "motion_adapter": "hf:guoyww/animatediff-motion-adapter-v1-5-2",
        "controlnet": "hf:lllyasviel/control_v11f1p_sd15_depth",
    }
    assert full["wan-vace"] == {"pipeline": "hf:Wan-AI/Wan2.1-VACE-1.3B-diffusers"}
    for name in EDITORS:  # the tiny preset gets tiny components only
        assert all(s.startswith("tiny:") for s in editor_weights(name, TINY).values()), name
    assert editor_weights("sd-depth", TINY, {"sd-depth": {"pipeline": "/models/sd2-depth"}}) == {
        "pipeline": "/models/sd2-depth"
    }
    with pytest.raises(ConfigError, match="unknown roles"):
        editor_weights("sd-depth", TINY, {"sd-depth": {"unet": "x"}})
    with pytest.raises(ConfigError, match="expected one of gen1, sd-depth"):
        editor_class("sd-3")


def test_unsupported_settings_fail_when_the_job_is_configured(tmp_path):
    def config(**kw):
        return EditJobConfig(src="s", dst=str(tmp_path / "dst"), prompts=(PROMPT,), **kw)

    assert config().grid.editor == ("gen1",)
    with pytest.raises(ConfigError, match=r"editor 'sd-depth' cannot honour t_s \(1,5\); it takes strength, w"):
        config(grid=EditGrid.parse(["editor=sd-depth", "ts=1,5"]))
    with pytest.raises(ConfigError, match="cannot honour strength"):
        config(grid=EditGrid(strength=(0.5,)))  # gen1 has no SDEdit strength
    with pytest.raises(ConfigError, match="cannot honour sampler"):
        config(grid=EditGrid(editor=("wan-vace",)), sampler="dpmpp")
    with pytest.raises(ConfigError, match="none of the editors gen1, sd-depth takes it"):
        config(grid=EditGrid.parse(["editor=gen1,sd-depth", "cn=0.5"]))
    # several editors: an axis one of them takes is fine; the others leave it out of their edits
    assert len(config(grid=EditGrid.parse(["editor=gen1,sd-depth", "ts=1,5"])).grid) == 3
    with pytest.raises(ConfigError, match="grid strength"):
        EditGrid(strength=(1.5,))
    # a reference image is refused when the prompts are read, before Ray starts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("image:/refs/cat.png\n")
    cfg = EditJobConfig(src="s", dst=str(tmp_path / "d"), prompts_file=str(prompts),
                        grid=EditGrid(editor=("animatediff-depth",)))
    with pytest.raises(ConfigError, match="cannot honour reference_image"):
        cfg.load_prompts()
    EditJobConfig(src="s", dst=str(tmp_path / "d"), prompts_file=str(prompts),
                  grid=EditGrid(editor=("wan-vace",))).load_prompts()


def test_missing_editor_weights_fail_before_work_naming_the_spec_and_where_to_set_it(tmp_path):
    from gen1.models import check_editor_weights
    from gen1.weights import WeightsNotFoundError

    missing = str(tmp_path / "no-sd2-depth")
    with pytest.raises(WeightsNotFoundError) as err:
        check_editor_weights(SD15, ["gen1", "sd-depth"], {"sd-depth": {"pipeline": missing}})
    message = str(err.value)
    assert "editor sd-depth pipeline" in message and missing in message
    assert "editor_weights: {sd-depth: {pipeline: /path/to/stable-diffusion-2-depth}}" in message
    check_editor_weights(TINY, list(EDITORS))  # the tiny components are built (once) and found


def test_masks_are_refused_at_plan_time_by_editors_without_them(synthetic_clip):
    clip = _clip(synthetic_clip)
    masked = dataclasses.replace(clip, mask_uri="/masks/m.mp4")
    assert masked.mask_key
    prompts = {clip.clip_id: [(PromptSpec(text=PROMPT), "user", None, None)]}
    with pytest.raises(ConfigError, match=f"clip {clip.clip_id}: editor 'sd-depth' cannot honour mask"):
        plan_tasks([masked], {masked.clip_id: prompts[clip.clip_id]}, EditGrid(editor=("sd-depth",)), STEPS,
                   "ddim", TINY)
    (task,) = plan_tasks([masked], {masked.clip_id: prompts[clip.clip_id]}, EditGrid(editor=("wan-vace",)),
                         STEPS, "ddim", TINY)
    assert task["editor"] == "wan-vace" and task["t_s"] is None and task["controlnet_scale"] == 1.0


def test_keys_hash_the_editor_and_its_weights_and_gen1_keeps_its_keys(synthetic_clip):
    clip = _clip(synthetic_clip)
    prompts = {clip.clip_id: [(PromptSpec(text=PROMPT), "user", None, None)]}
    grid = EditGrid(editor=tuple(EDITORS))
    tasks = plan_tasks([clip], prompts, grid, STEPS, "ddim", TINY)
    assert [t["editor"] for t in tasks] == list(EDITORS)
    assert len({t["edit_key"] for t in tasks}) == 4
    gen1, sd, ad, wan = tasks
    # gen1's key is the one it always had: earlier DSTs' edits are still found
    assert gen1["edit_key"] == edit_key(clip.clip_id, PROMPT, 3, 7.5, 1.0, 0, STEPS, "ddim", model_key(TINY),
                                        (clip.width, clip.height), clip.mask_key)
    assert (sd["t_s"], sd["w_t"], sd["sampler"], sd["strength"], sd["controlnet_scale"]) == (None, None, None, 0.8, None)
    assert json.loads(sd["editor_models"]) == {"pipeline": "tiny:sd-depth"}
    settings = {"t_s": None, "w": 7.5, "w_t": None, "strength": 0.8, "controlnet_scale": None, "seed": 0}
    models = {"clip": TINY.clip, "depth": TINY.depth}
    size = (clip.width, clip.height)
    assert sd["edit_key"] == editor_key("sd-depth", {"pipeline": "tiny:sd-depth"}, clip.clip_id, PROMPT, settings,
                                        STEPS, models, size)
    other = editor_key("sd-depth", {"pipeline": "/elsewhere"}, clip.clip_id, PROMPT, settings, STEPS, models, size)
    assert other != sd["edit_key"]  # other weights, another output


# ------------------------------------------------------------------------------------------ tiny editors


@pytest.fixture(scope="module")
def stage(tiny_models, tmp_path_factory) -> EditStage:
    return EditStage(TINY, str(tmp_path_factory.mktemp("editors-dst")), "run0", previews=True,
                     editors=tuple(EDITORS))


@pytest.mark.parametrize("editor", ["sd-depth", "animatediff-depth", "wan-vace"])
def test_each_editor_edits_a_real_clip_with_its_tiny_components(stage, tree, editor):
    clip = _clip(str(tree / "tree.avi"))
    prompts = {clip.clip_id: [(PromptSpec(text=PROMPT), "user", None, None)]}
    (task,) = plan_tasks([clip], prompts, EditGrid(editor=(editor,)), STEPS, "ddim", TINY)
    (row,) = stage(pa_table([task])).to_pylist()
    assert row["status"] == "ok", row["error_message"]
    assert (row["editor"], row["tiny_models"], row["unet_model"], row["depth_model"]) == (editor, True, None, TINY.depth)
    assert json.loads(row["editor_models"]) == editor_weights(editor, TINY)
    frames = _frames(row["output_uri"])
    assert frames.shape == (4, 64, 64, 3) and frames.std() > 0
    # denoiser calls: SDEdit at strength 0.8 of 2 steps runs 1 (guidance batched); Wan: 2 steps x (cond, uncond)
    assert row["unet_forwards"] == {"sd-depth": 1, "animatediff-depth": 1, "wan-vace": 4}[editor]
    assert Path(row["preview_uri"]).is_file()
    for m in ("frame_consistency", "prompt_consistency", "depth_fidelity"):
        assert row[m] is not None and np.isfinite(row[m]), m
    again = stage(pa_table([task])).to_pylist()[0]  # seeded: the same edit twice gives the same frames
    assert np.array_equal(_frames(again["output_uri"]), frames)


def pa_table(rows):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _frames(uri: str) -> np.ndarray:
    from gen1.decoding import load_clip

    return load_clip(uri, probe(uri).num_frames, 1, size=None).frames


# ------------------------------------------------------------------------------------------ gen1 edit


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gen1_edit_over_a_grid_of_editors_writes_a_row_each(tiny_models, tree, tmp_path):
    """`gen1 edit` (in process, its own local Ray) with every editor in the grid over one real clip."""
    from jobs.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    dst = tmp_path / "dst"
    argv = ["edit", str(tree), str(dst), "--prompts", str(prompts), "--steps", str(STEPS), "--no-progress",
            "--grid", "editor=gen1,sd-depth,animatediff-depth,wan-vace", "--num-cpus", "2"]
    assert main(argv) == 0
    rows = {r["editor"]: r for r in read_manifest(str(dst)).to_pylist()}
    assert sorted(rows) == sorted(EDITORS)
    assert all(r["tiny_models"] and Path(r["output_uri"]).is_file() for r in rows.values())
    assert rows["gen1"]["t_s"] == 3 and rows["sd-depth"]["t_s"] is None and rows["sd-depth"]["strength"] == 0.8
    # unsupported settings: exit 1 before any work (no DST written)
    refused = tmp_path / "refused"
    assert main(["edit", str(tree), str(refused), "--prompts", str(prompts), "--editor", "sd-depth",
                 "--grid", "ts=1,5"]) == 1
    assert not refused.exists()


# ------------------------------------------------------------------------------------------ gen1 eval


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_with_editor_baselines_logs_plots_and_gates_them(tiny_models, davis_root, tmp_path):
    """`gen1 eval --baselines sdedit sd-depth wan-vace` on a DAVIS layout of real clips, twice: the first run
    is accepted as baseline, the second is gated against it on the editors' own metrics."""
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import EvalConfig, run_eval
    from pipelines.evaluate.run import setting_label

    with pytest.raises(ConfigError, match="editor 'sd-depth' cannot honour mask"):  # DAVIS masks: refused now
        EvalConfig(dataset=f"davis:{davis_root}", mask="objects", baselines=("sd-depth",))
    EvalConfig(dataset=f"davis:{davis_root}", mask="objects", baselines=("wan-vace",))
    assert setting_label("animatediff-depth", None, 7.5, None, 0.8, 1.0) == "s0.8-cn1-w7.5"
    assert setting_label("wan-vace", None, 7.5, None, None, 1.0) == "cn1-w7.5"
    # (the eval measures the mp4s, and libx264 does not encode the same frames to the same bytes every run)
    gated = {"frame_consistency/sd-depth": 0.01, "prompt_consistency/wan-vace/cn1-w7.5": 0.01}

    def run(name: str, accept: bool):
        cfg = EvalConfig(
            dataset=f"davis:{davis_root}", out=str(tmp_path / "out"), models="tiny", steps=STEPS,
            grid={"t_s": [3], "w": [7.5], "w_t": [1.0], "seeds": [0]}, prompts=(PROMPT,), mask="none",
            baselines=("sdedit", "sd-depth", "wan-vace"), experiment="editors", run_name=name, sample_videos=1,
            num_cpus=2, progress=False, accept_baseline=accept, gate={"thresholds": gated},
        )
        return run_eval(cfg)

    first = run("first", accept=True)
    # 2 sequences x (gen1, sdedit, sd-depth, wan-vace)
    assert first.failed == 0 and first.by_method == {"gen1": 2, "sdedit": 2, "sd-depth": 2, "wan-vace": 2}
    client = MlflowClient(first.tracking_uri)
    metrics = client.get_run(first.run_id).data.metrics
    for name in ("frame_consistency/sd-depth", "frame_consistency/sd-depth/s0.8-w7.5",
                 "prompt_consistency/wan-vace/cn1-w7.5", "flow_warp_error/sd-depth", "frame_consistency/gen1"):
        assert np.isfinite(metrics[name]), name
    plots = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert plots == {"plots/frame_vs_prompt_consistency.png", "plots/consistency_vs_wt.png"}
    (sample,) = [a.path for a in client.list_artifacts(first.run_id, "samples")]
    width = probe(client.download_artifacts(first.run_id, sample, str(tmp_path))).width
    assert width == 5 * TINY.width  # input | gen1 | sdedit | sd-depth | wan-vace

    second = run("second", accept=False)
    assert second.gate["status"] == "passed", second.gate
    checked = {c["metric"]: c for c in second.gate["checks"]}
    assert set(gated) <= set(checked)  # beside the default gated metrics
    for m in gated:
        assert checked[m]["drop"] is not None and checked[m]["baseline"] == pytest.approx(metrics[m]), m
