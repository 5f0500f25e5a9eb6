"""The mass-edit pipeline: grid, keys and task planning without Ray; the stages on tiny models; whole runs on
local Ray over real clips; a killed `gen1 edit` resumed without duplicates; a run on a two-node cluster."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen1.config import TINY, ConfigError
from gen1.decoding import load_clip, probe
from gen1.prompts import PromptSpec
from pipelines.datasets import SequenceClip
from pipelines.edit import (
    PROMPT_PLAN_SCHEMA,
    RESULT_SCHEMA,
    CaptionStage,
    EditClip,
    EditGrid,
    EditJobConfig,
    EditRun,
    EditStage,
    PromptStage,
    edit_key,
    model_key,
    plan_tasks,
    read_manifest,
    read_prompts,
    read_source_table,
    run_edit,
)
from pipelines.schema import MANIFEST_DIR, MANIFEST_SCHEMA, OUTPUTS_DIR, read_errors
from pipelines.sources import plan_video

STEPS = 2
PROMPTS = ("a watercolor painting of a street", "a snowy forest at night")


def _clip(uri: str, **extra) -> EditClip:
    (plan,) = plan_video(uri, TINY.frames, 1, 1, (TINY.width, TINY.height))
    return EditClip.from_plan(plan.as_dict(), **extra)


def _decoded(uri: str) -> np.ndarray:
    info = probe(uri)
    return load_clip(uri, info.num_frames, 1, size=None).frames


# ------------------------------------------------------------------------------------------ no models


def test_grid_parse():
    grid = EditGrid.parse(["ts=1,5", "w=7.5", "wt=1.0,1.5", "seed=0,1"])
    assert (grid.t_s, grid.w, grid.w_t, grid.seeds) == ((1, 5), (7.5,), (1.0, 1.5), (0, 1))
    assert len(grid) == 8 == len(grid.combinations()) == len(set(grid.combinations()))
    assert EditGrid.parse([]) == EditGrid() and len(EditGrid()) == 1
    assert EditGrid.parse(["t_s=2,2"]).t_s == (2,)  # repeats collapse
    for bad in (["ts"], ["speed=1"], ["w="], ["ts=a"]):
        with pytest.raises(ConfigError):
            EditGrid.parse(bad)


def test_edit_key_is_stable_and_names_every_input():
    models = model_key(TINY)
    args = ("c0ffee", "a dog", 3, 7.5, 1.0, 0, 50, "ddim", models, (64, 64), "")
    key = edit_key(*args)
    # pinned: changing the hash would make every earlier DST look unfinished
    assert key == edit_key(*args) == "d54ae80f109e8a9cb604"
    variants = {
        edit_key("c0ffef", *args[1:]),
        edit_key(args[0], "a cat", *args[2:]),
        edit_key(*args[:2], 5, *args[3:]),
        edit_key(*args[:3], 7.0, *args[4:]),
        edit_key(*args[:4], 1.5, *args[5:]),
        edit_key(*args[:5], 1, *args[6:]),
        edit_key(*args[:6], 49, *args[7:]),
        edit_key(*args[:7], "dpmpp", *args[8:]),
        edit_key(*args[:8], {**models, "unet": "other"}, *args[9:]),
        edit_key(*args[:9], (64, 48), ""),
        edit_key(*args[:10], "mask.png"),
    }
    assert key not in variants and len(variants) == 11
    assert edit_key("c", "a", 3, 7.5, 1, 0, 50, "ddim", models, (64, 64)) == edit_key(
        "c", "a", 3.0, 7.50, 1.0, 0, 50, "ddim", dict(reversed(models.items())), [64, 64]
    )


def test_plan_tasks_cross_product_dedupes_and_prefers_clip_prompts(synthetic_clip, synthetic_portrait_clip):
    a, b = _clip(synthetic_clip), _clip(synthetic_portrait_clip)
    b = dataclasses.replace(b, prompts=(PromptSpec(image_uri="/refs/knight.png"),))
    user = [(PromptSpec(text=p), "user", None, None) for p in (*PROMPTS, PROMPTS[0])]
    prompts_for = {a.clip_id: user, b.clip_id: [(p, "clip", None, None) for p in b.prompts]}
    grid = EditGrid.parse(["ts=1,5", "seed=0,1"])
    tasks = plan_tasks([a, b], prompts_for, grid, STEPS, "ddim", TINY)
    assert len(tasks) == (2 + 1) * 4  # the repeated prompt is edited once
    assert len({t["edit_key"] for t in tasks}) == len(tasks)
    b_tasks = [t for t in tasks if t["clip_id"] == b.clip_id]
    assert {t["image_uri"] for t in b_tasks} == {"/refs/knight.png"} and all(
        t["prompt"] is None for t in b_tasks
    )
    assert pickle.loads(tasks[0]["clip"]) == a
    with pytest.raises(ConfigError, match="sampler"):
        plan_tasks([a], prompts_for, grid, STEPS, "euler", TINY)


def test_config_needs_something_to_edit_and_redacts_secrets(tmp_path):
    with pytest.raises(ConfigError, match="nothing to edit"):
        EditJobConfig(dst=str(tmp_path))
    from gen1.prompts import ChatConfig

    cfg = EditJobConfig(
        dst=str(tmp_path),
        src=str(tmp_path),
        grid=["ts=1,5"],
        prompts=list(PROMPTS),
        llm=ChatConfig(base_url="http://127.0.0.1:1/v1", api_key="sk-secret"),
        storage_options={"key": "AKIA", "secret": "shh"},
    )
    d = str(cfg.as_dict())
    assert "sk-secret" not in d and "shh" not in d and "AKIA" not in d
    assert cfg.grid.t_s == (1, 5) and cfg.prompts[0] == PromptSpec(text=PROMPTS[0])
    y = tmp_path / "edit.yaml"
    y.write_text("auto_prompts: 3\ngrid: {t_s: [2, 4], seeds: [0, 1]}\nsteps: 7\n")
    cfg = EditJobConfig.from_yaml(y, dst="d", src="s", steps=None)
    assert (cfg.auto_prompts, cfg.grid.t_s, cfg.grid.seeds, cfg.steps) == (3, (2, 4), (0, 1), 7)
    y.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        EditJobConfig.from_yaml(y, dst="d", src="s")


def test_source_manifest_prompts_images_masks_and_captions(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"")
    (tmp_path / "lib.csv").write_text(
        "uri,prompt,image,mask,caption\n"
        "v/a.mp4,a watercolor street,,masks/a.png,a street\n"
        "v/a.mp4,,refs/knight.png,,\n"
        "s3://bucket/b.mp4,a snowy forest,,,\n"
        ",ignored,,,\n"
    )
    table = read_source_table(str(tmp_path / "lib.csv"))
    a = str(tmp_path / "v" / "a.mp4")
    assert list(table) == [a, "s3://bucket/b.mp4"]
    assert table[a] == {
        "prompts": [
            PromptSpec(text="a watercolor street"),
            PromptSpec(image_uri=str(tmp_path / "refs/knight.png")),
        ],
        "caption": "a street",
        "mask_uri": str(tmp_path / "masks/a.png"),
    }
    assert table["s3://bucket/b.mp4"]["prompts"] == [PromptSpec(text="a snowy forest")]
    (tmp_path / "bad.csv").write_text("path\nx.mp4\n")
    with pytest.raises(ValueError, match="'uri'"):
        read_source_table(str(tmp_path / "bad.csv"))


def test_driver_commits_parts_by_count_and_by_age(tmp_path):
    from pipelines.commits import Committer, RowBuffer
    from pipelines.schema import PROMPTS_DIR, PROMPTS_SCHEMA, TableStore

    store = TableStore(str(tmp_path))
    row = {
        "clip_id": "c",
        "source_uri": "u",
        "prompt_index": 0,
        "prompt": "p",
        "writer": "template",
        "run_id": "r",
        "created_at": dt.datetime.now(dt.UTC),
        "schema_version": 1,
    }

    def buffer(run_id: str, every: int, max_wait_s: float) -> tuple[Committer, RowBuffer]:
        committer = Committer(store, PROMPTS_DIR, run_id, key=None)

        def commit(rows):
            committer.commit_table(pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA), [r["clip_id"] for r in rows])

        return committer, RowBuffer(commit, every, max_wait_s)

    committed, by_count = buffer("r", every=2, max_wait_s=1e9)
    by_count.add([row])
    assert store.committed(PROMPTS_DIR) == []  # buffered: nothing visible yet
    by_count.add([row])
    assert len(store.committed(PROMPTS_DIR)) == 1 and committed.rows == 2
    _, by_age = buffer("s", every=100, max_wait_s=0.0)
    by_age.add([row])
    assert len(store.committed(PROMPTS_DIR)) == 2 and not by_age.pending
    assert read_prompts(str(tmp_path)).num_rows == 3


def _parse(argv):
    import argparse

    from jobs.cli import add_models_argument
    from jobs.commands import edit as edit_command

    parser = argparse.ArgumentParser()
    edit_command._add_arguments(parser)
    add_models_argument(parser)
    parser.set_defaults(models=None)
    return edit_command.config_from_args(parser.parse_args(argv))


def test_cli_options_become_the_job_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN1_LLM_API_KEY", "sk-cli-secret")
    cfg = _parse(
        [
            "src",
            "dst",
            "--auto-prompts",
            "2",
            "--grid",
            "ts=1,5",
            "--grid",
            "wt=1.0,1.5",
            "--steps",
            "2",
            "--clips-per-video",
            "0",
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            "--no-previews",
        ]
    )
    assert (cfg.src, cfg.dst, cfg.models, cfg.auto_prompts, cfg.steps) == ("src", "dst", "tiny", 2, 2)
    assert (cfg.grid.t_s, cfg.grid.w_t, cfg.clips_per_video, cfg.previews) == (
        (1, 5),
        (1.0, 1.5),
        None,
        False,
    )
    assert cfg.llm.base_url == "http://127.0.0.1:9/v1" and cfg.llm.api_key.value == "sk-cli-secret"
    y = tmp_path / "edit.yaml"
    y.write_text("models: tiny\nsteps: 9\ncommit_every: 3\ngrid: {t_s: [2]}\n")
    cfg = _parse(["src", "dst", "--config", str(y), "--prompts", "p.txt", "--commit-every", "1"])
    assert (cfg.steps, cfg.commit_every, cfg.grid.t_s, cfg.prompts_file, cfg.llm) == (
        9,
        1,
        (2,),
        "p.txt",
        None,
    )
    with pytest.raises(SystemExit):
        _parse(["src", "dst", "--prompts", "p.txt", "--auto-prompts", "2"])


# ------------------------------------------------------------------------------------ stages (tiny)


@pytest.fixture(scope="module")
def models(tiny_models):
    from gen1.models import Gen1Models

    return Gen1Models.load(TINY, device="cpu")


def _task(clip: EditClip, prompt: PromptSpec, t_s: int = 3, seed: int = 0) -> dict:
    (task,) = plan_tasks(
        [clip],
        {clip.clip_id: [(prompt, "user", "a caption", None)]},
        EditGrid(t_s=(t_s,), seeds=(seed,)),
        STEPS,
        "ddim",
        TINY,
    )
    return task


def test_edit_stage_writes_outputs_rows_and_metrics_and_fails_per_task(
    models, synthetic_clip, bad_videos, tmp_path
):
    from PIL import Image

    dst = tmp_path / "dst"
    stage = EditStage(TINY, str(dst), "run0", models=models)
    clip = _clip(synthetic_clip)
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((40, 30, 3), (200, 30, 30), np.uint8)).save(ref)
    bad = dataclasses.replace(clip, clip_id="bad0", source_uri=str(bad_videos / "corrupt.mp4"))
    tasks = [
        _task(clip, PromptSpec(text=PROMPTS[0])),
        _task(bad, PromptSpec(text=PROMPTS[0])),
        _task(clip, PromptSpec(image_uri=str(ref)), t_s=5),
    ]
    out = stage(pa.Table.from_pylist(tasks))
    assert out.schema.equals(RESULT_SCHEMA)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error_stage"] == "decode" and "corrupt.mp4" in rows[1]["error_message"]
    assert rows[1]["edit_key"] == tasks[1]["edit_key"] and rows[1]["clip_id"] == "bad0"
    text_row, image_row = rows[0], rows[2]
    assert (text_row["content_kind"], text_row["prompt"], text_row["image_uri"]) == ("text", PROMPTS[0], None)
    assert (image_row["content_kind"], image_row["prompt"], image_row["image_uri"]) == (
        "image",
        None,
        str(ref),
    )
    for row in (text_row, image_row):
        assert row["tiny_models"] is True and row["unet_model"] == TINY.unet and row["steps"] == STEPS
        assert (row["num_frames"], row["width"], row["height"]) == (TINY.frames, TINY.width, TINY.height)
        out_frames = _decoded(row["output_uri"])
        assert out_frames.shape == (TINY.frames, TINY.height, TINY.width, 3)
        preview = _decoded(row["preview_uri"])
        assert preview.shape == (TINY.frames, TINY.height, 3 * TINY.width, 3)
        assert Path(row["output_uri"]).parent.name == clip.clip_id
        assert Path(row["output_uri"]).name == f"{row['edit_key']}.mp4"
        for k in ("frame_consistency", "frame_consistency_all_pairs", "prompt_consistency", "depth_fidelity"):
            assert -1.0 <= row[k] <= 1.0, (k, row[k])
        assert row["flow_warp_error"] >= 0
        # the stored metrics describe the written video: recompute from the decoded mp4 (H.264, crf 18)
        from gen1.metrics import frame_consistency

        emb = models.content.clip.embed_images(out_frames)
        assert frame_consistency(emb) == pytest.approx(row["frame_consistency"], abs=0.02)
    assert not list((dst / OUTPUTS_DIR / "_tmp").rglob("*.mp4"))  # every temp file was renamed


def test_edit_stage_honours_a_mask(models, synthetic_clip, tmp_path, monkeypatch):
    """Only the left half may change: the right half equals the input's VAE reconstruction exactly."""
    from PIL import Image

    from gen1.sampling import decode_latents, encode_frames
    from gen1.video import tensor_to_frames

    mask = np.zeros((TINY.height, TINY.width, 3), np.uint8)
    mask[:, : TINY.width // 2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    clip = _clip(synthetic_clip, mask_uri=str(tmp_path / "mask.png"))
    task = _task(clip, PromptSpec(text=PROMPTS[1]))
    assert task["edit_key"] != _task(_clip(synthetic_clip), PromptSpec(text=PROMPTS[1]))["edit_key"]
    stage = EditStage(TINY, str(tmp_path / "dst"), "run0", models=models, previews=False, metrics=False)
    import gen1.sampling

    result, original = {}, gen1.sampling.edit_video

    def spy(*a, **kw):
        result["r"], result["mask"] = original(*a, **kw), kw.get("mask")
        return result["r"]

    monkeypatch.setattr(gen1.sampling, "edit_video", spy)
    (row,) = stage(pa.Table.from_pylist([task])).to_pylist()
    assert row["status"] == "ok" and row["masked"] is True and row["mask"] == str(tmp_path / "mask.png")
    assert row["preview_uri"] is None and row["frame_consistency"] is None
    np.testing.assert_array_equal(result["mask"][:, :, : TINY.width // 2], 1)
    np.testing.assert_array_equal(result["mask"][:, :, TINY.width // 2 :], 0)
    frames = clip.load_frames()
    recon = tensor_to_frames(decode_latents(models, encode_frames(models, frames)).cpu())
    right = slice(TINY.width // 2, None)
    np.testing.assert_allclose(
        result["r"].frames[:, :, right].astype(int), recon[:, :, right].astype(int), atol=1
    )


def test_sequence_clips_carry_dataset_frames_masks_and_prompts(models, davis_root, tgve_root, tmp_path):
    """Evaluation's injected clips: DAVIS frames + object masks, TGVE prompts, edited by the same stage."""
    from gen1.video import clip_id, read_image, resize_center_crop
    from pipelines.datasets import load_sequence_mask, read_davis, read_tgve

    walking = {s.name: s for s in read_davis(str(davis_root))}["walking"]
    clip = SequenceClip.from_sequence(
        walking, frames=4, size=(64, 64), stride=2, mask_objects=(), invert_mask=True
    )
    indices = [0, 2, 4, 6]
    ref = resize_center_crop(np.stack([read_image(walking.frame_uris[i], "RGB") for i in indices]), 64, 64)
    assert clip.clip_id == clip_id(walking.frames_uri, 0, 4, 2) and list(clip.frame_indices) == indices
    frames, mask = clip.load()
    np.testing.assert_array_equal(frames, ref)
    np.testing.assert_array_equal(mask, load_sequence_mask(walking, indices, (64, 64), invert=True))
    assert 0 < mask.mean() < 1 and clip.mask_key == "objects=all;invert=True"
    np.testing.assert_array_equal(clip.middle_frame(), ref[2])

    tgve = {s.name: s for s in read_tgve(str(tgve_root))}["walking"]
    tclip = SequenceClip.from_sequence(tgve, frames=4, size=(64, 64))
    assert tclip.caption == "People walk across a plaza." and not tclip.masked
    assert [(p.tag, p.text) for p in tclip.prompts][:2] == [
        ("style", "People walk across a plaza, watercolor style."),
        ("object", "Robots walk across a plaza."),
    ]
    assert pickle.loads(pickle.dumps(tclip)) == tclip

    masked = dataclasses.replace(clip, prompts=tclip.prompts[:1], caption=tclip.caption)
    (task,) = plan_tasks(
        [masked],
        {masked.clip_id: [(p, "clip", masked.caption, None) for p in masked.prompts]},
        EditGrid(),
        STEPS,
        "ddim",
        TINY,
    )
    (row,) = EditStage(TINY, str(tmp_path / "dst"), "run0", models=models)(
        pa.Table.from_pylist([task])
    ).to_pylist()
    assert row["status"] == "ok", row["error_message"]
    assert (row["masked"], row["mask"], row["prompt_tag"], row["prompt_source"]) == (
        True,
        "objects=all;invert=True",
        "style",
        "clip",
    )
    assert row["caption"] == "People walk across a plaza." and row["source_uri"] == walking.frames_uri
    assert _decoded(row["output_uri"]).shape == (4, 64, 64, 3)


def test_caption_and_prompt_stages(tiny_models, synthetic_clip, bad_videos):
    good = _clip(synthetic_clip)
    bad = dataclasses.replace(good, clip_id="bad0", source_uri=str(bad_videos / "text.mp4"))
    given = dataclasses.replace(good, clip_id="given0")
    rows = [
        {
            "clip": pickle.dumps(c),
            "clip_id": c.clip_id,
            "source_uri": c.source_uri,
            "start": 0,
            "caption": cap,
            "caption_model": "",
            "existing": ex,
            "prompts": [],
            "writer": "",
        }
        for c, cap, ex in ((good, "", []), (bad, "", []), (given, "a man walking a dog", ["keep me"]))
    ]
    captioned = CaptionStage(TINY.caption)(pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)).to_pylist()
    assert [r["status"] for r in captioned] == ["ok", "error", "ok"]
    assert isinstance(captioned[0]["caption"], str) and captioned[0]["caption_model"] == TINY.caption
    assert captioned[1]["error_stage"] == "caption" and "text.mp4" in captioned[1]["error_message"]
    assert captioned[2]["caption"] == "a man walking a dog" and captioned[2]["caption_model"] == ""
    from gen1.captions import Captioner

    frames = good.load_frames()
    again = Captioner(TINY.caption)([frames[len(frames) // 2]])
    assert again == [captioned[0]["caption"]]  # deterministic, from the middle frame
    written = PromptStage(n=3)(pa.Table.from_pylist(captioned, schema=PROMPT_PLAN_SCHEMA)).to_pylist()
    assert [r["status"] for r in written] == ["ok", "error", "ok"]
    assert written[1]["error_stage"] == "caption"  # passed through, not retried
    assert written[2]["prompts"][0] == "keep me" and len(set(written[2]["prompts"])) == 3
    assert written[2]["writer"] == "template"
    assert all("walking a dog" in p for p in written[2]["prompts"][1:])


# ---------------------------------------------------------------------------------------- time limits


@pytest.fixture
def release():
    """An event every hung call waits on; set at teardown, so the abandoned threads end (by raising)."""
    import threading

    event = threading.Event()
    yield event
    event.set()


def _hang_then_fail(release) -> None:
    assert release.wait(120), "the test never released this call"
    raise RuntimeError("released after the test")  # an abandoned call ends without writing anything


def test_a_hung_decode_or_edit_fails_only_its_task(models, synthetic_clip, release, monkeypatch, tmp_path):
    """Issue 9 item 1 for `gen1 edit`: a clip decode past decode_timeout_s and an edit past edit_timeout_s each
    become a `timeout` error of their stage; the tasks around them in the same batch are written."""
    import gen1.sampling

    real_load, real_edit = EditClip.load, gen1.sampling.edit_video

    def load(self, storage_options=None):
        if self.clip_id == "hung-decode":
            _hang_then_fail(release)
        return real_load(self, storage_options)

    def edit_video(models, frames, content, settings, **kw):
        if content.text == "hang":
            _hang_then_fail(release)
        return real_edit(models, frames, content, settings, **kw)

    monkeypatch.setattr(EditClip, "load", load)
    monkeypatch.setattr(gen1.sampling, "edit_video", edit_video)
    clip = _clip(synthetic_clip)
    hung_clip = dataclasses.replace(clip, clip_id="hung-decode")
    tasks = [
        _task(clip, PromptSpec(text=PROMPTS[0])),
        _task(hung_clip, PromptSpec(text=PROMPTS[0])),
        _task(clip, PromptSpec(text="hang")),
        _task(clip, PromptSpec(text=PROMPTS[1])),
    ]
    stage = EditStage(
        TINY, str(tmp_path / "dst"), "run0", models=models, decode_timeout_s=2, edit_timeout_s=10
    )
    t0 = time.monotonic()
    rows = stage(pa.Table.from_pylist(tasks)).to_pylist()
    seconds = time.monotonic() - t0
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok"]
    assert [(r["error_stage"], r["error_type"]) for r in rows[1:3]] == [
        ("decode", "timeout"),
        ("edit", "timeout"),
    ]
    assert "decode of clip hung-decode" in rows[1]["error_message"] and "2s" in rows[1]["error_message"]
    assert tasks[2]["edit_key"] in rows[2]["error_message"] and "10s" in rows[2]["error_message"]
    assert [r["edit_key"] for r in rows] == [t["edit_key"] for t in tasks]
    for row in (rows[0], rows[3]):
        assert _decoded(row["output_uri"]).shape == (TINY.frames, TINY.height, TINY.width, 3)
    assert seconds < 2 + 10 + 60, seconds  # the two limits, plus two real tiny edits
    outputs = sorted(p.name for p in (tmp_path / "dst").rglob("*.mp4"))
    assert outputs == sorted(
        f"{r['edit_key']}{ext}" for r in (rows[0], rows[3]) for ext in (".mp4", ".preview.mp4")
    )


def test_a_hung_caption_call_or_frame_decode_fails_only_its_clip(synthetic_clip, release, monkeypatch):
    """A BLIP call that hangs on one clip of a batch: the batch is retried clip by clip and only that clip fails
    (``timeout``, stage ``caption``); a middle-frame decode past its limit fails its clip the same way."""
    good = _clip(synthetic_clip)
    hung_caption = dataclasses.replace(
        good, clip_id="hung-caption", frame_indices=tuple(i + 1 for i in good.frame_indices)
    )
    hung_decode = dataclasses.replace(good, clip_id="hung-decode")
    poison = hung_caption.middle_frame()
    assert not np.array_equal(poison, good.middle_frame())
    real_middle = EditClip.middle_frame
    calls = []

    def middle_frame(self, storage_options=None):
        if self.clip_id == "hung-decode":
            _hang_then_fail(release)
        return real_middle(self, storage_options)

    def captioner(frames):
        calls.append(len(frames))
        if any(np.array_equal(f, poison) for f in frames):
            _hang_then_fail(release)
        return [f"a clip of mean {float(np.mean(f)):.1f}" for f in frames]

    monkeypatch.setattr(EditClip, "middle_frame", middle_frame)
    rows = [
        {
            "clip": pickle.dumps(c),
            "clip_id": c.clip_id,
            "source_uri": c.source_uri,
            "start": c.start,
            "caption": "",
            "caption_model": "",
            "existing": [],
            "prompts": [],
            "writer": "",
        }
        for c in (good, hung_caption, hung_decode)
    ]
    stage = CaptionStage(TINY.caption, captioner=captioner, timeout_s=2, decode_timeout_s=2)
    out = stage(pa.Table.from_pylist(rows, schema=PROMPT_PLAN_SCHEMA)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "error"]
    assert [(r["error_stage"], r["error_type"]) for r in out[1:]] == [
        ("caption", "timeout"),
        ("caption", "timeout"),
    ]
    assert "decode of clip hung-decode" in out[2]["error_message"]
    assert out[0]["caption"] == f"a clip of mean {float(np.mean(good.middle_frame())):.1f}"
    assert calls == [2, 1, 1]  # the batch of the two decoded clips hung, then one call per clip


def test_edit_time_limits_are_validated_and_reach_the_cli(tmp_path):
    from jobs.cli import build_parser
    from jobs.commands.edit import config_from_args

    args = build_parser().parse_args(
        [
            "edit",
            "src",
            str(tmp_path),
            "--decode-timeout",
            "5",
            "--caption-timeout",
            "0",
            "--edit-timeout",
            "90",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.decode_timeout_s, cfg.caption_timeout_s, cfg.edit_timeout_s) == (5.0, 0.0, 90.0)
    defaults = EditJobConfig(dst=str(tmp_path), src="src")
    assert (defaults.decode_timeout_s, defaults.caption_timeout_s, defaults.edit_timeout_s) == (
        120.0,
        600.0,
        3600.0,
    )
    with pytest.raises(ConfigError, match="edit_timeout_s"):
        EditJobConfig(dst=str(tmp_path), src="src", edit_timeout_s=-1)


# ------------------------------------------------------------------------------------------ Ray runs


@pytest.fixture(scope="module")
def local_ray(tiny_models):
    import ray

    from pipelines.runtime import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def library(real_clips, bad_videos, tmp_path_factory) -> Path:
    """3 real clips (Megamind: no timestamps, PyAV; tree: cinepak; vtest: msmpeg4) and one corrupt file."""
    root = tmp_path_factory.mktemp("library")
    names = {Path(p).name: p for p in real_clips}
    for name in ("Megamind.avi", "tree.avi", "vtest.avi"):
        shutil.copy(names[name], root / name)  # copies: pipelines.sources.list_videos skips symlinks
    shutil.copy(bad_videos / "corrupt.mp4", root / "corrupt.mp4")
    return root


def _check_outputs(dst: Path, n: int) -> pa.Table:
    manifest = read_manifest(str(dst))
    keys = manifest.column("edit_key").to_pylist()
    assert len(keys) == len(set(keys)) == n
    raw = sum(pq.read_table(p).num_rows for p in (dst / MANIFEST_DIR).glob("part-*.parquet"))
    assert raw == n, "duplicate rows in the manifest parts"
    for row in manifest.to_pylist():
        frames = _decoded(row["output_uri"])
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3) == (4, 64, 64, 3)
        assert Path(row["preview_uri"]).is_file()
    outputs = sorted(p.name for p in (dst / OUTPUTS_DIR).glob("*/*.mp4") if "_tmp" not in p.parts)
    assert len(outputs) == 2 * n  # an mp4 and its preview per row, nothing else
    return manifest


@pytest.mark.timeout(300)
def test_run_edit_auto_prompts_on_real_clips_and_rerun(local_ray, library, tmp_path, monkeypatch):
    monkeypatch.delenv("GEN1_LLM_BASE_URL", raising=False)  # no endpoint: the template writer
    dst = tmp_path / "dst"
    cfg = EditJobConfig(
        src=str(library),
        dst=str(dst),
        auto_prompts=2,
        grid=EditGrid(t_s=(1, 5)),
        steps=STEPS,
        commit_every=5,
        progress=False,
    )
    summary = run_edit(cfg)
    assert (summary.videos, summary.clips, summary.clips_failed) == (4, 3, 1)
    assert (summary.tasks, summary.ok, summary.failed, summary.skipped) == (12, 12, 0, 0)
    assert summary.error is None and summary.tiny_models
    manifest = _check_outputs(dst, 12)
    rows = manifest.to_pylist()
    assert {r["t_s"] for r in rows} == {1, 5} and {r["prompt_source"] for r in rows} == {"template"}
    assert all(r["caption"] is not None and r["caption_model"] == TINY.caption for r in rows)
    assert len({(r["clip_id"], r["prompt"]) for r in rows}) == 6
    assert manifest.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    prompts = read_prompts(str(dst))
    assert prompts.num_rows == 6 and set(prompts.column("writer").to_pylist()) == {"template"}
    errors = read_errors(str(dst)).to_pylist()
    assert [(e["stage"], Path(e["uri"]).name) for e in errors] == [("plan", "corrupt.mp4")]

    again = run_edit(cfg)  # nothing left to do: no captioning, no prompt writing, no edit actors
    assert (again.tasks, again.skipped, again.ok, again.failed) == (12, 12, 0, 0)
    assert read_prompts(str(dst)).num_rows == 6  # the committed prompts were found, not rewritten
    _check_outputs(dst, 12)


def _cli() -> list[str]:
    from jobs.cli import COMMAND_MODULES

    if "jobs.commands.edit" in COMMAND_MODULES:
        return [sys.executable, "-m", "jobs.cli", "edit"]
    return [sys.executable, "-m", "jobs.commands.edit"]


def _session_kill(proc: subprocess.Popen) -> None:
    """SIGKILL the session this test started for ``proc``: the CLI and the local Ray it started."""
    from tests.fixtures.ray_cluster import session_pids

    for pid in [proc.pid, *session_pids(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_edit_run_resumes_without_duplicates(local_ray, library, tmp_path):
    dst = tmp_path / "dst"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    log = tmp_path / "run1.log"
    args = [
        str(library),
        str(dst),
        "--models",
        "tiny",
        "--prompts",
        str(prompts),
        "--grid",
        "ts=1,5",
        "--steps",
        str(STEPS),
        "--commit-every",
        "1",
        "--num-cpus",
        "2",
        "--no-progress",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_cli(), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while not list((dst / MANIFEST_DIR).glob("part-*.parquet")):
            if proc.poll() is not None:
                pytest.fail(
                    f"gen1 edit exited ({proc.returncode}) before committing:\n{log.read_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no manifest part within 240s:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        _session_kill(proc)
    at_kill = set(read_manifest(str(dst)).column("edit_key").to_pylist())
    assert 0 < len(at_kill) < 12, f"expected a half-finished run, found {len(at_kill)} of 12 edits committed"

    cfg = EditJobConfig(
        src=str(library),
        dst=str(dst),
        prompts_file=str(prompts),
        grid=EditGrid(t_s=(1, 5)),
        steps=STEPS,
        progress=False,
    )
    summary = run_edit(cfg)
    assert (summary.tasks, summary.skipped, summary.ok, summary.failed) == (
        12,
        len(at_kill),
        12 - len(at_kill),
        0,
    )
    manifest = _check_outputs(dst, 12)
    assert at_kill <= set(manifest.column("edit_key").to_pylist())
    assert {r["prompt_source"] for r in manifest.to_pylist()} == {"user"}
    assert [e["stage"] for e in read_errors(str(dst)).to_pylist()] == [
        "plan",
        "plan",
    ]  # corrupt.mp4, each run


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_edit_job_on_a_two_node_cluster(ray_cluster, library, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(library / "tree.avi", src / "tree.avi")
    shutil.copy(library / "vtest.avi", src / "vtest.avi")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    dst = tmp_path / "dst"
    log = tmp_path / "cluster.log"
    args = [
        str(src),
        str(dst),
        "--models",
        "tiny",
        "--prompts",
        str(prompts),
        "--grid",
        "ts=1,5",
        "--steps",
        str(STEPS),
        "--edit-concurrency",
        "2",
        "--ray-address",
        ray_cluster.address,
        "--no-progress",
    ]
    with open(log, "wb") as out:
        proc = subprocess.run(
            [*_cli(), *args], stdout=out, stderr=subprocess.STDOUT, env=ray_cluster.env, timeout=400
        )
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "edit " in output and "4 ok, 0 failed" in output
    manifest = _check_outputs(dst, 4)
    assert {r["device"] for r in manifest.to_pylist()} == {"cpu"}


# ------------------------------------------------------------------------- chat prompts: the breaker


def test_with_the_chat_endpoint_down_the_prompts_fall_back_to_templates_and_the_run_says_so(tmp_path, caplog):
    """The prompt pass's driver (`EditRun.write_prompts`) with the Ray dataset replaced by the real
    `PromptStage` called row by row, as one prompt actor would: after 3 failed requests no more are sent,
    every clip gets template prompts, the prompts table says ``template`` and the summary counts them."""
    import logging

    from gen1.prompts import ChatConfig
    from pipelines.edit.tables import committed_prompts
    from tests.fixtures.chat_server import FakeChatServer

    clips = [
        EditClip(f"c{i}", f"/v/{i}.mp4", 0, 1, (0, 1), 8.0, 64, 64, caption=f"a dog running on beach {i}")
        for i in range(5)
    ]
    with FakeChatServer([("status", 503)]) as server, caplog.at_level(logging.WARNING):
        llm = ChatConfig(base_url=server.url, backoff_s=0.0, max_retries=4, max_consecutive_failures=3)
        cfg = EditJobConfig(dst=str(tmp_path / "dst"), src="unused", auto_prompts=2, llm=llm, progress=False)
        run = EditRun(cfg, TINY, "run0")
        stage = PromptStage(cfg.auto_prompts, llm, cfg.prompt_seed)

        class OneActor:  # what `_prompt_pass` returns: batches of one clip through one stage
            def __init__(self, rows, llm_):
                assert llm_ is llm
                self.rows = rows

            def iter_batches(self, **kw):
                for row in self.rows:
                    yield stage(pa.Table.from_pylist([row], schema=PROMPT_PLAN_SCHEMA))

        run._prompt_pass = OneActor
        run.write_prompts(clips)
    assert len(server.requests) == 3  # 3 in a row failed: none for the 4 other clips, no 5 retries each
    assert stage.fell_back and run.summary.prompt_writer == "chat" and run.summary.prompt_fallbacks == 5
    assert run.summary.clips_failed == 0
    written = committed_prompts(cfg.dst)
    assert sorted(written) == [c.clip_id for c in clips]
    assert {r["writer"] for rows in written.values() for r in rows} == {"template"}
    assert "failed 3 requests in a row" in caplog.text and "template writer wrote the prompts of 5 clips" in caplog.text
    assert "5 clips got template prompts" in run.summary.line()
    assert run.summary.as_dict()["prompt_fallbacks"] == 5
