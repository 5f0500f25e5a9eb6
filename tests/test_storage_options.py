"""Storage options alone reach S3 (issue 17, item 1): preprocess, edit and eval run against an S3 endpoint whose
address and credentials are only in the jobs' ``storage_options`` (set in each job's YAML config, as
``--config`` reads it), with no ``AWS_*`` variable in the driver or in the Ray workers (`private_s3`).

Everything the jobs read lives in the bucket: the source videos, an edit manifest naming a mask, a prompts
file with a text prompt and a reference-image prompt, and a DAVIS-layout dataset (frames, object masks, a
split file); everything they write goes there too. A read or write that does not get the options fails
for want of credentials: a probe becomes a ``plan`` error row, a read in the driver (the prompts file, the
dataset's listing) stops the job, a read or write on a worker fails its clip or edit, and the counts below
go wrong.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from gen1.config import TINY
from gen1.decoding import probe, read_frames
from pipelines.runtime import init_ray
from tests.fixtures.clips import encode_mp4, synthetic_frames

pytestmark = pytest.mark.slow

BUCKET = "gen1-private"
PROMPT = "a watercolor painting of a moving square"


def _aws_env() -> list[str]:
    return sorted(k for k in os.environ if k.startswith("AWS_"))


@pytest.fixture(scope="module")
def ray_without_aws(private_s3, tiny_models):
    """A local Ray started with no AWS_* variable set (its workers inherit none: checked in a task)."""
    import ray

    started = init_ray(num_cpus=2)
    try:
        assert _aws_env() == []
        assert ray.get(ray.remote(num_cpus=0)(_aws_env).remote()) == [], "the Ray workers see AWS_* variables"
        yield
    finally:
        if started:
            ray.shutdown()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def library(private_s3, davis_root) -> str:
    """The bucket's inputs: two videos, a mask, a reference image, an edit manifest, a prompts file and the
    DAVIS layout of ``davis_root``; returns ``s3://BUCKET``."""
    import fsspec

    bucket = private_s3.make_bucket(BUCKET)
    fs = private_s3.filesystem()
    fs.pipe_file(f"{BUCKET}/videos/a.mp4", encode_mp4(synthetic_frames(24, 96, 64)))
    fs.pipe_file(f"{BUCKET}/videos/b.mp4", encode_mp4(synthetic_frames(16, 64, 96)))
    mask = np.zeros((64, 96, 3), np.uint8)
    mask[:, 48:] = 255  # edit the right half
    fs.pipe_file(f"{BUCKET}/masks/a.png", _png(mask))
    ref = np.zeros((64, 64, 3), np.uint8)
    ref[..., 0] = np.arange(64, dtype=np.uint8)[None] * 4
    fs.pipe_file(f"{BUCKET}/refs/ref.png", _png(ref))
    fs.pipe_file(f"{BUCKET}/edit/manifest.csv",
                 f"uri,mask\n{bucket}/videos/a.mp4,{bucket}/masks/a.png\n{bucket}/videos/b.mp4,\n".encode())
    fs.pipe_file(f"{BUCKET}/prompts.txt", f"# one text prompt, one reference image\n{PROMPT}\nimage:{bucket}/refs/ref.png\n".encode())
    fs.put(str(davis_root), f"{BUCKET}/davis", recursive=True)
    assert fs.exists(f"{BUCKET}/davis/ImageSets/2017/train.txt")
    with pytest.raises(Exception, match="credentials"):  # the environment alone reaches nothing
        fsspec.filesystem("s3", skip_instance_cache=True).ls(BUCKET)
    return bucket


def _yaml_config(path: Path, **fields) -> Path:
    """A job config file, as ``gen1 COMMAND --config`` reads it."""
    path.write_text(yaml.safe_dump(fields))
    return path


def _written(fs, prefix: str) -> list[str]:
    """The files under ``prefix``; fails if one is left under a ``_tmp/`` folder."""
    found = fs.find(prefix)
    assert not [p for p in found if "/_tmp/" in p], f"leftovers under _tmp/: {found}"
    return sorted(found)


def test_preprocess_reads_and_writes_s3_through_storage_options_alone(ray_without_aws, private_s3, library, tmp_path):
    from pipelines.preprocess import PreprocessConfig, run_preprocess
    from pipelines.schema import read_shards, row_frames

    opts = private_s3.storage_options
    cfg = PreprocessConfig.from_yaml(_yaml_config(
        tmp_path / "preprocess.yaml", models="tiny", size=[64, 48], clips_per_video=1, frames_format="raw",
        progress=False, storage_options=opts))
    summary = run_preprocess(f"{library}/videos", f"{library}/features", cfg)
    assert (summary.videos, summary.ok, summary.failed, summary.error) == (2, 2, 0, None), summary.line()
    table = read_shards(f"{library}/features", storage_options=opts)
    assert sorted(table.column("source_uri").to_pylist()) == [f"{library}/videos/a.mp4", f"{library}/videos/b.mp4"]
    for row in table.to_pylist():
        assert row_frames(row).shape == (TINY.frames, row["height"], row["width"], 3)
    assert {(r["width"], r["height"]) for r in table.to_pylist()} == {(64, 48), (48, 64)}
    written = _written(private_s3.filesystem(), f"{BUCKET}/features")
    assert any("/shards/" in p for p in written) and any("/runs/" in p for p in written)


def test_edit_reads_and_writes_s3_through_storage_options_alone(ray_without_aws, private_s3, library, tmp_path):
    from pipelines.edit import EditJobConfig, read_manifest, run_edit

    opts = private_s3.storage_options
    cfg = EditJobConfig.from_yaml(_yaml_config(
        tmp_path / "edit.yaml", src=f"{library}/edit/manifest.csv", dst=f"{library}/edits",
        prompts_file=f"{library}/prompts.txt", steps=2, metrics=False, progress=False, storage_options=opts))
    summary = run_edit(cfg)
    # 2 clips x (the text prompt, the reference image), every one written
    assert (summary.clips, summary.clips_failed, summary.tasks, summary.ok, summary.failed) == (2, 0, 4, 4, 0), \
        summary.line()
    rows = read_manifest(f"{library}/edits", opts).to_pylist()
    assert sorted((r["source_uri"].rsplit("/", 1)[1], r["content_kind"], r["masked"]) for r in rows) == [
        ("a.mp4", "image", True), ("a.mp4", "text", True), ("b.mp4", "image", False), ("b.mp4", "text", False)]
    assert {r["image_uri"] for r in rows if r["content_kind"] == "image"} == {f"{library}/refs/ref.png"}
    for row in rows:
        for uri in (row["output_uri"], row["preview_uri"]):
            assert uri.startswith(f"{library}/edits/outputs/{row['clip_id']}/"), uri
            info = probe(uri, opts)
            assert info.num_frames == TINY.frames
        frames = read_frames(row["output_uri"], range(TINY.frames), opts)
        assert frames.shape == (TINY.frames, row["height"], row["width"], 3)
    outputs = [p for p in _written(private_s3.filesystem(), f"{BUCKET}/edits/outputs") if p.endswith(".mp4")]
    assert len(outputs) == 8  # an mp4 and its preview per edit, nothing else


def test_eval_reads_and_writes_s3_through_storage_options_alone(ray_without_aws, private_s3, library, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import EvalConfig, run_eval

    opts = private_s3.storage_options
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvalConfig.from_yaml(_yaml_config(
        tmp_path / "eval.yaml", dataset=f"davis:{library}/davis", split="train", mask="objects",
        out=f"{library}/eval", models="tiny", steps=2, grid={"t_s": [3], "w": [7.5], "w_t": [1.0], "seeds": [0]},
        baselines=["per_frame"], tracking_uri=tracking_uri, run_name="private-s3", sample_videos=1,
        storage_options=opts))
    summary = run_eval(cfg)
    # walking (the train split; with object masks) x (ours, the per-frame baseline); captions made from its frames
    assert (summary.videos, summary.failed, summary.by_method) == (2, 0, {"gen1": 1, "per_frame": 1}), summary.line()
    run_dir = f"{library}/eval/private-s3"
    assert summary.table_uri == f"{run_dir}/per_video.parquet"
    with private_s3.filesystem().open(summary.table_uri, "rb") as fh:
        import pandas as pd

        table = pd.read_parquet(fh)
    assert list(table["video"]) == ["walking", "walking"] and table["masked"].all()
    for uri in table["output_uri"]:
        assert uri.startswith(f"{run_dir}/"), uri
        assert probe(uri, opts).num_frames == TINY.frames
    assert np.isfinite(table["frame_consistency"]).all() and np.isfinite(table["depth_fidelity"]).all()
    assert [s.startswith(f"{run_dir}/samples/") for s in summary.samples] == [True]
    samples = [a.path for a in MlflowClient(tracking_uri).list_artifacts(summary.run_id, "samples")]
    assert len(samples) == 1 and samples[0].endswith(".mp4")
