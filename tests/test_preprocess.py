"""The preprocess pipeline: stages without Ray, then whole runs on local Ray, on S3 (moto), killed and
resumed, and on a two-node cluster whose worker dies mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from gen1.config import TINY
from gen1.decoding import load_clip
from gen1.video import VideoDecodeError
from jobs.exit_codes import EXIT_FAILED_FRACTION
from pipelines.failures import STATUS_ERROR, STATUS_OK
from pipelines.preprocess import (
    ClipStage,
    DecodeStage,
    DepthStage,
    FusedModels,
    PreprocessConfig,
    ShardWriter,
    clip_frames,
    run_preprocess,
)
from pipelines.preprocess.run import run_committers
from pipelines.runtime import init_ray
from pipelines.schema import (
    ERRORS_DIR,
    SHARD_SCHEMA,
    SHARDS_DIR,
    TableStore,
    committed_clip_ids,
    decode_array,
    decode_frames,
    encode_array,
    encode_frames,
    read_errors,
    read_shards,
    row_clip_embedding,
    row_depth,
    row_frames,
)
from pipelines.sources import PlanStage, plan_video
from tests.fixtures.ray_cluster import session_pids

SIZE = (64, 48)  # (w, h) landscape; portrait sources get 48x64
TOL = 4e-3  # float16 storage of values in [-1, 1] (step 2^-11) plus batch-size numerics
MODELS = {"depth": TINY.depth, "clip": TINY.clip, "vae": None}


def _cfg(**kw) -> PreprocessConfig:
    base = dict(models="tiny", size=SIZE, clips_per_video=2, shard_size=3, frames_format="raw", progress=False)
    return PreprocessConfig(**{**base, **kw})


def _plan_rows(uris, cfg: PreprocessConfig) -> pd.DataFrame:
    res = cfg.resolved()
    return PlanStage(res.frames, res.stride, cfg.clips_per_video, res.size)({"uri": list(uris)}).to_pandas()


def _expected_ids(uris, cfg: PreprocessConfig) -> set[str]:
    res = cfg.resolved()
    return {p.clip_id for u in uris for p in plan_video(u, res.frames, res.stride, cfg.clips_per_video, res.size)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_synthetic_clip) -> Path:
    """Two synthetic videos: a landscape one (24 frames: 3 tiny clips) and a portrait one (16 frames: 2)."""
    root = tmp_path_factory.mktemp("corpus")
    make_synthetic_clip(root / "land.mp4", frames=24, width=96, height=64)
    make_synthetic_clip(root / "sub" / "port.mp4", frames=16, width=64, height=96)
    return root


@pytest.fixture(scope="module")
def depth_model():
    from gen1.depth import DepthEstimator

    return DepthEstimator(TINY.depth, device="cpu")


@pytest.fixture(scope="module")
def clip_model():
    from gen1.clip import ClipEmbedder

    return ClipEmbedder(TINY.clip, device="cpu")


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """One local Ray for this module's in-process runs, started after the S3 env vars are set so its
    workers inherit them."""
    import ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def _assert_matches_wrappers(table: pa.Table, depth_model, clip_model) -> None:
    """Stored frames equal a fresh `load_clip` (which may take the other decoder: a one-clip read of a long
    video seeks with decord and resizes with OpenCV, where the pipeline's pass over all its clips converts
    and scales with FFmpeg's swscale; the two differ by under 2 grey levels on average, measured 1.7-1.8 on
    vtest.avi at 64x48, most of it chroma at edges); stored depth/embeddings equal the wrappers on them."""
    for row in table.to_pylist():
        size = (row["width"], row["height"]) if row["width"] >= row["height"] else (row["height"], row["width"])
        clip = load_clip(row["source_uri"], row["num_frames"], row["stride"], row["start"], size=size)
        assert clip.clip_id == row["clip_id"]
        assert row["frame_indices"] == clip.indices
        frames = row_frames(row)
        diff = np.abs(frames.astype(int) - clip.frames)
        if diff.max() > 2:  # the other decoder and resize filter (see above)
            assert diff.mean() < 2.5, (row["source_uri"], diff.mean())
        else:  # the same path: equal
            assert (diff > 0).mean() < 1e-3, (row["source_uri"], (diff > 0).mean())
        want_depth = depth_model(frames).numpy()
        got_depth = row_depth(row)
        assert got_depth.shape == (row["num_frames"], row["height"], row["width"]) == want_depth.shape
        np.testing.assert_allclose(got_depth, want_depth, atol=TOL)
        want_emb = clip_model.embed_images(frames).numpy()
        np.testing.assert_allclose(row_clip_embedding(row), want_emb, atol=TOL)


# ---------------------------------------------------------------------------------- stages without Ray


def test_array_and_frame_codecs_round_trip():
    x = np.linspace(-1, 1, 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    data, shape = encode_array(x)
    assert shape == [2, 3, 5] and len(data) == x.size * 2
    np.testing.assert_allclose(decode_array(data, shape), x, atol=1e-3)
    with pytest.raises(ValueError, match="expected 60 bytes"):
        decode_array(data[:-2], shape)
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_frames(encode_frames(frames, "raw"), "raw", 8, 16), frames)
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, None, :, None], (2, 8, 16, 3)).copy()
    back = decode_frames(encode_frames(smooth, "jpeg", 95), "jpeg", 8, 16)
    assert back.shape == smooth.shape and np.abs(back.astype(int) - smooth).max() <= 8


def test_table_store_commit_is_atomic_and_never_overwrites(tmp_path):
    store = TableStore(str(tmp_path / "dst"))
    table = ShardWriter(str(tmp_path), "r", MODELS).shard_table([])  # an empty, valid shard
    tmp = store.write_tmp(SHARDS_DIR, table, "run1")
    assert store.committed(SHARDS_DIR) == [] and read_shards(str(tmp_path / "dst")).num_rows == 0
    final = store.commit(SHARDS_DIR, tmp, "a")
    assert store.committed(SHARDS_DIR) == [final] and not os.path.exists(tmp)
    tmp2 = store.write_tmp(SHARDS_DIR, table, "run1")
    with pytest.raises(FileExistsError, match="part-a"):
        store.commit(SHARDS_DIR, tmp2, "a")
    store.remove_tmp(SHARDS_DIR, "run1")
    assert not os.path.exists(tmp2)


def test_plan_and_decode_stages_match_load_clip_and_turn_failures_into_rows(corpus, bad_videos):
    cfg = _cfg()
    uris = [str(corpus / "land.mp4"), str(corpus / "sub" / "port.mp4")]
    bad = sorted(str(p) for p in bad_videos.iterdir())
    plans = _plan_rows(uris + bad, cfg)
    ok, failed = plans[plans.status == STATUS_OK], plans[plans.status == STATUS_ERROR]
    assert len(ok) == 4 and set(ok.source_uri) == set(uris)
    assert sorted(failed.source_uri) == bad and set(failed.error_stage) == {"plan"}
    assert set(failed.error_type) == {"VideoDecodeError"} and (failed.start == -1).all()
    messages = dict(zip(failed.source_uri.map(os.path.basename), failed.error_message, strict=True))
    assert "0 bytes" in messages["empty.mp4"] and "too short" in messages["short.mp4"]

    rows = ok.copy()
    missing = rows.iloc[[0]].assign(source_uri=str(corpus / "gone.mp4"), clip_id="gone")
    out = DecodeStage().decode(pd.concat([rows, missing], ignore_index=True))
    assert list(out.status) == [STATUS_OK] * 4 + [STATUS_ERROR]
    assert out.error_stage.iloc[-1] == "decode" and "gone.mp4" in out.error_message.iloc[-1]
    for _, r in out.iloc[:4].iterrows():
        w, h = (48, 64) if "port" in r.source_uri else (64, 48)
        assert (r.width, r.height) == (w, h)
        clip = load_clip(r.source_uri, 4, 2, int(r.start), size=SIZE)
        assert clip.clip_id == r.clip_id
        frames = np.frombuffer(r.frames_raw, np.uint8).reshape(4, h, w, 3)
        np.testing.assert_array_equal(frames, clip.frames)


def test_model_stages_equal_the_single_machine_wrappers(corpus, depth_model, clip_model):
    cfg = _cfg()
    rows = DecodeStage().decode(_plan_rows([str(corpus / "land.mp4"), str(corpus / "sub" / "port.mp4")], cfg))
    out = ClipStage(TINY.clip, device="cpu")(DepthStage(TINY.depth, device="cpu")(rows))
    assert (out.status == STATUS_OK).all()
    for _, r in out.iterrows():
        frames = clip_frames(r)
        depth = decode_array(r.depth, (4, r.height, r.width)).astype(np.float32)
        np.testing.assert_allclose(depth, depth_model(frames).numpy(), atol=TOL)
        assert r.clip_dim == TINY.clip_dim
        emb = decode_array(r.clip_embedding, (4, r.clip_dim)).astype(np.float32)
        np.testing.assert_allclose(emb, clip_model.embed_images(frames).numpy(), atol=TOL)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=5e-3)
    # One actor running both (the CPU-cluster default) puts out the same rows, value by value.
    fused = FusedModels([(DepthStage, {"spec": TINY.depth, "device": "cpu"}),
                         (ClipStage, {"spec": TINY.clip, "device": "cpu"})])(rows)
    pd.testing.assert_frame_equal(fused, out)


def test_a_stage_exception_for_one_clip_fails_only_that_clip(corpus, tmp_path):
    cfg = _cfg(clips_per_video=3)
    rows = DecodeStage().decode(_plan_rows([str(corpus / "land.mp4")], cfg))
    assert len(rows) == 3
    victim = rows.clip_id.iloc[1]
    stage = DepthStage(TINY.depth, device="cpu")
    real = stage.estimator
    calls = []

    class Flaky:  # fails on any forward that includes the victim's frames
        def predict_raw(self, frames):
            calls.append(len(frames))
            victim_frames = np.frombuffer(rows.frames_raw.iloc[1], np.uint8).reshape((4, *frames.shape[1:]))
            if any(np.array_equal(frames[i : i + 4], victim_frames) for i in range(0, len(frames), 4)):
                raise RuntimeError("CUDA out of memory (simulated)")
            return real.predict_raw(frames)

    stage.estimator = Flaky()
    out = ClipStage(TINY.clip, device="cpu")(stage(rows))
    assert list(out.status) == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert calls == [12, 4, 4, 4]  # one batched forward, then clip by clip
    failed = out[out.clip_id == victim].iloc[0]
    assert (failed.error_stage, failed.error_type) == ("depth", "RuntimeError")
    assert "simulated" in failed.error_message and "Traceback" in failed.error_traceback
    assert out.clip_embedding.iloc[1] == b""  # later stages pass error rows through untouched

    dst = str(tmp_path / "dst")
    written = ShardWriter(dst, "run1", MODELS, frames_format="raw")(out)
    assert sorted(written.table) == [ERRORS_DIR, SHARDS_DIR]
    commits = run_committers(TableStore(dst), "run1")
    for w in written.to_dict("records"):
        commits[w["table"]].commit_file(w["tmp_path"], list(w["clip_ids"]))
    shards, errors = read_shards(dst), read_errors(dst)
    assert sorted(shards.column("clip_id").to_pylist()) == sorted(set(rows.clip_id) - {victim})
    assert shards.schema.names == SHARD_SCHEMA.names
    assert errors.column("clip_id").to_pylist() == [victim] and errors.column("stage").to_pylist() == ["depth"]
    assert errors.column("start").to_pylist() == [int(rows.start.iloc[1])]


def test_committer_never_commits_a_clip_id_twice(corpus, tmp_path):
    cfg = _cfg(clips_per_video=3)
    rows = ClipStage(TINY.clip, "cpu")(DepthStage(TINY.depth, "cpu")(DecodeStage().decode(_plan_rows([str(corpus / "land.mp4")], cfg))))
    dst = str(tmp_path / "dst")
    writer = ShardWriter(dst, "run1", MODELS, store_frames=False)
    first, overlapping, same = writer(rows.iloc[:2]), writer(rows.iloc[1:]), writer(rows.iloc[:2])
    commits = run_committers(TableStore(dst), "run1")
    for w in pd.concat([first, overlapping]).to_dict("records"):
        commits[w["table"]].commit_file(w["tmp_path"], list(w["clip_ids"]))
    other_run = run_committers(TableStore(dst), "run2")[SHARDS_DIR]  # planned before the first committed
    assert other_run.commit_file(same.tmp_path.iloc[0], list(same.clip_ids.iloc[0])) == 0
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    assert sorted(ids) == sorted(rows.clip_id) and commits[SHARDS_DIR].dropped_duplicates == 1
    assert read_shards(dst).column("frames").null_count == 3
    assert not list((tmp_path / "dst" / SHARDS_DIR / "_tmp" / "run2").glob("*"))


def test_config_from_yaml_and_preset_defaults(tmp_path):
    path = tmp_path / "pp.yaml"
    path.write_text("clips_per_video: 3\nsize: [320, 192]\nlatents: true\n")
    cfg = PreprocessConfig.from_yaml(path, shard_size=5, frames=None)
    assert (cfg.clips_per_video, cfg.size, cfg.shard_size) == (3, (320, 192), 5)
    res = cfg.resolved()
    assert (res.frames, res.stride, res.size) == (TINY.frames, TINY.frame_stride, (320, 192))
    assert res.vae_model == TINY.vae and PreprocessConfig().resolved().vae_model is None
    assert PreprocessConfig(models="sd15").resolved().frames == 8
    path.write_text("clip_per_video: 3\n")
    with pytest.raises(ValueError, match="clip_per_video"):
        PreprocessConfig.from_yaml(path)


# ------------------------------------------------------------------------------------ whole runs


@pytest.mark.timeout(240)
def test_pipeline_on_real_and_synthetic_clips_and_rerun_skips(local_ray, real_clips, corpus, tmp_path,
                                                              depth_model, clip_model):
    real = [c for c in real_clips if os.path.basename(c) in ("Megamind.avi", "vtest.avi")]
    uris = real + [str(corpus / "land.mp4"), str(corpus / "sub" / "port.mp4")]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join(uris) + "\n")
    dst = str(tmp_path / "dst")
    cfg = _cfg()
    summary = run_preprocess(str(manifest), dst, cfg)
    expected = _expected_ids(uris, cfg)
    assert (summary.ok, summary.failed, summary.skipped, summary.planned) == (8, 0, 0, 8), summary
    table = read_shards(dst)
    ids = table.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert table.schema.names == SHARD_SCHEMA.names
    store = TableStore(dst)
    sizes = [store.read(p, ["clip_id"]).num_rows for p in store.committed(SHARDS_DIR)]
    assert len(sizes) >= 3 and max(sizes) <= 3  # shard_size 3
    assert set(table.column("depth_model").to_pylist()) == {TINY.depth}
    assert set(table.column("schema_version").to_pylist()) == {1}
    assert table.column("latents").null_count == 8
    _assert_matches_wrappers(table, depth_model, clip_model)
    assert read_errors(dst).num_rows == 0
    assert not (tmp_path / "dst" / SHARDS_DIR / "_tmp" / summary.run_id).exists()

    again = run_preprocess(str(manifest), dst, cfg)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 8)
    assert len(TableStore(dst).committed(SHARDS_DIR)) == len(sizes) and committed_clip_ids(dst) == expected


@pytest.mark.timeout(240)
def test_pipeline_reads_and_writes_s3(local_ray, s3_endpoint, make_synthetic_clip, depth_model, clip_model):
    bucket = s3_endpoint.make_bucket("preprocess-test")
    uris = [make_synthetic_clip(f"{bucket}/corpus/a.mp4", frames=16),
            make_synthetic_clip(f"{bucket}/corpus/deep/b.mp4", frames=16, width=64, height=96)]
    cfg = _cfg(frames_format="jpeg")
    summary = run_preprocess(f"{bucket}/corpus", f"{bucket}/features", cfg)
    assert (summary.ok, summary.failed) == (4, 0), summary
    table = read_shards(f"{bucket}/features")
    ids = table.column("clip_id").to_pylist()
    assert len(ids) == 4 and set(ids) == _expected_ids(uris, cfg)
    assert set(table.column("source_uri").to_pylist()) == set(uris)
    assert set(table.column("frames_format").to_pylist()) == {"jpeg"}
    for row in table.to_pylist():  # JPEG frames are close to, not equal to, the decoded ones
        frames = row_frames(row)
        assert frames.shape == (4, row["height"], row["width"], 3)
        np.testing.assert_allclose(row_depth(row), depth_model(load_clip(row["source_uri"], 4, 2, row["start"],
                                                                          size=SIZE).frames).numpy(), atol=TOL)
    import fsspec

    assert not fsspec.filesystem("s3").find("preprocess-test/features/shards/_tmp")


@pytest.mark.timeout(240)
def test_bad_files_land_in_errors_and_the_exit_code_follows_the_failure_fraction(local_ray, bad_videos, corpus,
                                                                                tmp_path):
    from jobs.commands.preprocess import run as cli_run

    src = tmp_path / "src"
    shutil.copytree(bad_videos, src)
    shutil.copy(corpus / "land.mp4", src / "good.mp4")
    dst = tmp_path / "dst"

    class Args:  # what argparse gives `run`
        src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
        config = ray_address = num_cpus = frames = stride = shard_size = latents = store_frames = None
        frames_format = progress = max_failure_fraction = None
        models, clips_per_video, size = "tiny", 2, SIZE

    assert cli_run(Args) == EXIT_FAILED_FRACTION  # 4 failed, 2 committed: 4 / 6 > 0.1
    errors = read_errors(str(dst))
    names = sorted(os.path.basename(u) for u in errors.column("uri").to_pylist())
    assert names == ["corrupt.mp4", "empty.mp4", "short.mp4", "text.mp4"]
    assert set(errors.column("stage").to_pylist()) == {"plan"}
    assert len(committed_clip_ids(str(dst))) == 2
    assert {os.path.basename(u) for u in read_shards(str(dst)).column("source_uri").to_pylist()} == {"good.mp4"}

    Args.max_failure_fraction = 1.0  # a rerun retries the failures (they are not done) and skips the rest
    assert cli_run(Args) == 0
    assert read_errors(str(dst)).num_rows == 8 and len(committed_clip_ids(str(dst))) == 2


def _cli() -> list[str]:
    """`gen1 preprocess` once the command is registered in jobs/cli.py, else its module entry point."""
    from jobs.cli import COMMAND_MODULES

    if "jobs.commands.preprocess" in COMMAND_MODULES:
        return [sys.executable, "-m", "jobs.cli", "preprocess"]
    return [sys.executable, "-m", "jobs.commands.preprocess"]


def _wait_for_first_shard(proc: subprocess.Popen, dst: Path, log: Path, timeout: float = 180.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(list((dst / SHARDS_DIR).glob("part-*.parquet")))
        if n:
            return n
        if proc.poll() is not None:
            pytest.fail(f"gen1 preprocess exited ({proc.returncode}) before committing a shard:\n"
                        f"{log.read_text()[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"no shard committed within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the session this test started for ``proc`` (a local Ray's processes)."""
    for pid in [proc.pid, *session_pids(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _kill_after_first_shard(args: list[str], dst: Path, log: Path) -> None:
    """Run `gen1 preprocess ARGS` (output to ``log``) in a session of its own, wait for its first committed
    shard under ``dst``, then SIGKILL the whole session while the run is still going."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_cli(), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_first_shard(proc, dst, log)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        _stop_session(proc)


BIG = 24  # clips in big_corpus


@pytest.fixture
def big_corpus(tmp_path, make_synthetic_clip) -> tuple[list[str], Path]:
    """4 videos x 6 clips of the tiny preset (4 frames 2 apart: 7 source frames per clip)."""
    root = tmp_path / "big"
    uris = [make_synthetic_clip(root / f"v{i}.mp4", frames=42, width=64, height=48) for i in range(4)]
    return uris, root


def _streaming_config(path: Path, **extra) -> Path:
    """One clip per batch and per shard: shards commit one by one while the rest is still in flight."""
    settings = {"shard_size": 1, "decode_batch_size": 1, "depth_batch_frames": 4, "clip_batch_frames": 4,
                "size": "[64, 48]", "progress": "false", **extra}
    lines = [f"{k}: {v}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_run_resumes_without_duplicates(local_ray, big_corpus, tmp_path):
    uris, src = big_corpus
    dst = tmp_path / "dst"
    log = tmp_path / "run1.log"
    config = _streaming_config(tmp_path / "pp.yaml")
    _kill_after_first_shard([str(src), str(dst), "--config", str(config), "--models", "tiny"], dst, log)
    at_kill = committed_clip_ids(str(dst))
    assert 0 < len(at_kill) < BIG, f"expected a half-finished run, found {len(at_kill)} of {BIG} clips committed"

    cfg = PreprocessConfig.from_yaml(config)
    summary = run_preprocess(str(src), str(dst), cfg)
    assert (summary.skipped, summary.ok, summary.failed) == (len(at_kill), BIG - len(at_kill), 0)
    ids = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == BIG and set(ids) == _expected_ids(uris, cfg)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_survives_losing_the_worker(ray_cluster, big_corpus, tmp_path):
    uris, src = big_corpus
    dst = tmp_path / "dst"
    assert len(ray_cluster.nodes()) == 2
    # two depth actors, spread over both nodes (Ray Data's default SPREAD), so the worker holds one
    config = _streaming_config(tmp_path / "pp.yaml", depth_concurrency=2)
    log = tmp_path / "cluster-run.log"
    args = [str(src), str(dst), "--config", str(config), "--ray-address", ray_cluster.address]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_cli(), *args], stdout=out, stderr=subprocess.STDOUT, env=ray_cluster.env,
                                start_new_session=True)
    try:
        _wait_for_first_shard(proc, dst, log, timeout=300)
        ray_cluster.kill_worker()
        at_kill = len(committed_clip_ids(str(dst)))
        rc = proc.wait(timeout=400)
    finally:
        _stop_session(proc)
    output = log.read_text()
    assert at_kill < BIG, "the run had finished before the worker was killed"
    assert rc in (0, 1), output[-4000:]
    shard_ids = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()
    error_ids = set(read_errors(str(dst)).column("clip_id").to_pylist())
    expected = _expected_ids(uris, PreprocessConfig.from_yaml(config))
    assert len(shard_ids) == len(set(shard_ids)), "duplicate clip ids in the shards"
    assert set(shard_ids) | error_ids == expected, output[-4000:]
    assert f"of {BIG} clips" in output  # the summary line


def test_remote_videos_stream_and_their_errors_name_the_uri(tmp_path, make_synthetic_clip, monkeypatch):
    """A remote video is read through fsspec (one pass) or a temporary copy (seeks) that is gone
    afterwards; the frames agree, and a decode error names the remote URI, not a local path."""
    import glob
    import tempfile

    import fsspec

    from gen1 import decoding

    local = make_synthetic_clip(tmp_path / "v.mp4", frames=28, width=64, height=48)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/b/v.mp4", open(local, "rb").read())
    fs.pipe_file("/b/bad.mp4", b"\x00" * 4096)
    requests = [decoding.ClipRequest((0, 2, 4, 6), (32, 24)), decoding.ClipRequest((20, 22), None)]
    passed = dict(decoding.decode_clips("memory://b/v.mp4", requests))
    monkeypatch.setattr(decoding, "use_seeks", lambda requests: True)
    sought = dict(decoding.decode_clips("memory://b/v.mp4", requests))
    assert passed[0].shape == (4, 24, 32, 3) and passed[1].shape == (2, 48, 64, 3)
    assert np.abs(passed[1].astype(int) - sought[1]).max() <= 2  # native size: the same frames
    # resized: a pass scales in swscale, seeks with OpenCV after decord (gen1.decoding._frame_rgb)
    assert np.abs(passed[0].astype(int) - sought[0]).mean() < 2
    assert not glob.glob(f"{tempfile.gettempdir()}/gen1-video-*")  # the seek path's copy is removed
    with pytest.raises(VideoDecodeError, match="memory://b/bad.mp4") as info:
        list(decoding.decode_clips("memory://b/bad.mp4", requests))
    assert "not a readable video" in info.value.reason and str(tmp_path) not in str(info.value)
    fs.rm("/b", recursive=True)
