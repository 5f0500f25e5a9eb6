"""Issue 9, preprocess pipeline: the failure modes of peer video pipelines, each provoked for real.

Hung decoders and model calls (time limits), a kill between the clips of one video (per-clip resume),
inputs failing run after run (quarantine), shard files sized by bytes, bounded in-flight decodes.

Ray workers of this module's cluster run `install_test_decoders` at start (a ``worker_process_setup_hook``):
it stands in a decoder (`faulty_decode_clips`) that hangs, aborts, hogs memory or logs its busy intervals
for files so named, and a depth model that raises on any batch holding an all-black clip.
Every other file decodes normally, and the driver is not hooked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gen1.config import TINY
from pipelines.failures import STATUS_ERROR, STATUS_OK, apply_per_clip
from pipelines.keyset import KeySet
from pipelines.preprocess import (
    ClipStage,
    DecodeStage,
    DepthStage,
    PreprocessConfig,
    run_preprocess,
)
from pipelines.quarantine import find_quarantined, read_quarantine
from pipelines.schema import ERRORS_SCHEMA, SHARDS_DIR, TableStore, read_errors, read_shards
from pipelines.sources import PlanStage, plan_video
from pipelines.timeouts import StageRetired, StageTimeout, call_with_timeout

SIZE = (64, 48)
HANG_START = 7  # the hooked decoder hangs on the clip of a hang*.mp4 that starts at source frame 7
HANG_SECONDS = 120.0  # far past every limit used here; the abandoned thread sleeps on after the test
PACE_SECONDS = 0.3
DECODE_LOG_ENV = "GEN1_TEST_DECODE_LOG"
POISON_MEAN = 8.0  # the hooked depth model raises on a batch holding a clip this dark (mean grey level)


def faulty_decode_clips(uri, requests, storage_options=None, threads=0):
    """`gen1.decoding.decode_clips` with this module's faults, by file name: ``hang*`` sleeps before the
    clip that starts at HANG_START, ``paced*`` sleeps PACE_SECONDS a clip and logs ``pid start end`` of the
    video to ``$GEN1_TEST_DECODE_LOG/<pid>``, ``abort*`` aborts its process at any clip but the one at frame 0 and
    ``hog*`` allocates 256 MiB, writes its pid to ``<video>.pid`` and sleeps forever.
    Runs in the decode child process (a module-level function: pickled there by reference)."""
    from gen1.decoding import decode_clips

    name, t0 = os.path.basename(str(uri)), time.time()
    if name.startswith("hog"):
        hog = np.ones(256 * 2**20, np.uint8)  # touched: resident
        with open(f"{uri}.pid", "w") as f:
            f.write(f"{os.getpid()} {int(hog.sum())}\n")
        time.sleep(10 * HANG_SECONDS)
    for i, frames in decode_clips(uri, requests, storage_options, threads):
        if name.startswith("hang") and int(requests[i].indices[0]) == HANG_START:
            time.sleep(HANG_SECONDS)
        if name.startswith("abort") and int(requests[i].indices[0]) > 0:
            os.abort()
        if name.startswith("paced"):
            time.sleep(PACE_SECONDS)
        yield i, frames
    if name.startswith("paced"):
        with open(os.path.join(os.environ[DECODE_LOG_ENV], str(os.getpid())), "a") as f:
            f.write(f"{t0} {time.time()}\n")


def install_test_decoders() -> None:
    """Ray worker setup hook: decode stages use `faulty_decode_clips`; the depth model raises on a batch
    holding a black clip."""
    from gen1 import decoding

    decoding.decode_clips = faulty_decode_clips

    from pipelines import preprocess

    real_predict = preprocess.DepthStage.predict

    def predict(self, clips):  # a model that raises on any call holding a black clip
        poisoned = [bool(c.mean() < POISON_MEAN) for c in clips]
        if any(poisoned):
            with open(os.path.join(os.environ[DECODE_LOG_ENV], f"poison-{os.getpid()}"), "a") as f:
                f.write(f"{len(clips)} {sum(poisoned)}\n")
            raise RuntimeError("model failed on a black clip (simulated)")
        return real_predict(self, clips)

    preprocess.DepthStage.predict = predict




def _cfg(**kw) -> PreprocessConfig:
    base = dict(models="tiny", size=SIZE, clips_per_video=None, shard_size=2, frames_format="raw",
                progress=False)
    return PreprocessConfig(**{**base, **kw})


def _plans(uris, cfg: PreprocessConfig) -> list:
    res = cfg.resolved()
    return [p for u in uris for p in plan_video(u, res.frames, res.stride, cfg.clips_per_video, res.size)]


def _plan_rows(uris, cfg: PreprocessConfig) -> pd.DataFrame:
    res = cfg.resolved()
    return PlanStage(res.frames, res.stride, cfg.clips_per_video, res.size)({"uri": list(uris)}).to_pandas()


@pytest.fixture(scope="module")
def decode_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decode-log")


@pytest.fixture(scope="module")
def hooked_ray(decode_log):
    """A local 2-CPU Ray whose workers run `install_test_decoders`; yields its address."""
    from tests.fixtures.ray_cluster import hooked_local_ray

    with hooked_local_ray(f"{__name__}.install_test_decoders", {DECODE_LOG_ENV: str(decode_log)}) as address:
        yield address


# ------------------------------------------------------------------------------- 1. time limits


def test_call_with_timeout_returns_raises_and_abandons_a_hung_call():
    assert call_with_timeout(lambda a, b: a + b, 5, 2, 3) == 5
    assert call_with_timeout(lambda: "direct", None) == "direct"  # no limit: no thread
    with pytest.raises(KeyError, match="boom"):
        call_with_timeout(lambda: {}["boom"], 5)
    release = threading.Event()
    t0 = time.monotonic()
    try:
        with pytest.raises(StageTimeout, match=r"decode of x: expected to finish within 0.3s") as info:
            call_with_timeout(release.wait, 0.3, 60, what="decode of x")
    finally:
        release.set()
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert isinstance(info.value, TimeoutError) and info.value.error_type == "timeout"


def test_a_hung_decode_is_killed_and_fails_only_its_clip(make_synthetic_clip, tmp_path):
    uri = make_synthetic_clip(tmp_path / "hang.mp4", frames=28, width=64, height=48)
    rows = _plan_rows([uri], _cfg())
    assert list(rows.start) == [0, 7, 14, 21]
    stage = DecodeStage(timeout_s=0.5, decoder=faulty_decode_clips)
    t0 = time.monotonic()
    out = stage.decode(rows)
    assert time.monotonic() - t0 < 10
    assert list(out.status) == [STATUS_OK, STATUS_ERROR, STATUS_OK, STATUS_OK]
    bad = out.iloc[1]
    assert (bad.error_stage, bad.error_type, bad.frames_raw) == ("decode", "timeout", b"")
    assert "within 0.5s; killed" in bad.error_message and bad.clip_id in bad.error_message
    assert all(len(b) == 4 * 48 * 64 * 3 for b in out.frames_raw[out.status == STATUS_OK])
    stage.worker.close()


def test_a_decoder_sleeping_forever_is_killed_and_its_memory_returned(make_synthetic_clip, tmp_path):
    import psutil

    uris = [make_synthetic_clip(tmp_path / "hog.mp4", frames=14, width=64, height=48),
            make_synthetic_clip(tmp_path / "ok.mp4", frames=14, width=64, height=48)]
    stage = DecodeStage(timeout_s=2.0, decoder=faulty_decode_clips)
    out = stage.decode(_plan_rows(uris, _cfg()))
    hog = out[out.source_uri.str.endswith("hog.mp4")]
    assert (hog.status == STATUS_ERROR).all() and set(hog.error_type) == {"timeout"}  # both its clips
    assert (out[out.source_uri.str.endswith("ok.mp4")].status == STATUS_OK).all()
    pid, total = map(int, Path(f"{uris[0]}.pid").read_text().split())
    assert total == 256 * 2**20  # the stand-in did hold its 256 MiB
    assert pid != os.getpid() and not psutil.pid_exists(pid)  # killed and reaped: its memory is back
    stage.worker.close()


def test_a_decoder_that_aborts_fails_the_rest_of_its_video_as_a_crash(make_synthetic_clip, tmp_path):
    uris = [make_synthetic_clip(tmp_path / "abort.mp4", frames=28, width=64, height=48),
            make_synthetic_clip(tmp_path / "ok.mp4", frames=14, width=64, height=48)]
    stage = DecodeStage(timeout_s=30, decoder=faulty_decode_clips)
    out = stage.decode(_plan_rows(uris, _cfg()))
    aborted = out[out.source_uri.str.endswith("abort.mp4")]
    assert list(aborted.status) == [STATUS_OK, STATUS_ERROR, STATUS_ERROR, STATUS_ERROR]  # 1st clip came out
    assert set(aborted.error_type.iloc[1:]) == {"crash"} and set(aborted.error_stage.iloc[1:]) == {"decode"}
    assert "SIGABRT" in aborted.error_message.iloc[1] and uris[0] in aborted.error_message.iloc[1]
    assert (out[out.source_uri.str.endswith("ok.mp4")].status == STATUS_OK).all()  # a fresh child decoded it
    stage.worker.close()


def test_a_hung_model_call_fails_only_its_clip(make_synthetic_clip, tmp_path):
    uri = make_synthetic_clip(tmp_path / "v.mp4", frames=21, width=64, height=48)
    rows = DecodeStage().decode(_plan_rows([uri], _cfg()))
    assert len(rows) == 3 and (rows.status == STATUS_OK).all()
    victim = np.frombuffer(rows.frames_raw.iloc[1], np.uint8).reshape(4, 48, 64, 3)
    stage = DepthStage(TINY.depth, device="cpu", timeout_s=1.0)
    real, release, calls = stage.estimator, threading.Event(), []

    class Hangs:  # a forward that includes the victim's frames never returns (until the test ends)
        def predict_raw(self, frames):
            calls.append(len(frames))
            if any(np.array_equal(frames[i : i + 4], victim) for i in range(0, len(frames), 4)):
                release.wait(60)
            return real.predict_raw(frames)

    stage.estimator = Hangs()
    t0 = time.monotonic()
    try:
        out = ClipStage(TINY.clip, device="cpu")(stage(rows))
    finally:
        release.set()
    assert time.monotonic() - t0 < 20
    assert calls == [12, 4, 4, 4]  # the batch timed out, then clip by clip
    assert list(out.status) == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert (out.error_stage.iloc[1], out.error_type.iloc[1]) == ("depth", "timeout")
    assert all(out.clip_embedding.iloc[[0, 2]]) and out.clip_embedding.iloc[1] == b""
    with pytest.raises(StageRetired, match="depth of 3 clips was abandoned"):  # in a Ray actor: a fresh process
        stage(rows)


def test_apply_per_clip_without_timeout_keeps_exception_types():
    rows = [{"clip_id": str(i), "source_uri": "u"} for i in range(3)]

    def fn(xs):
        if 1 in xs:
            raise ValueError("one is bad")
        return [x * 10 for x in xs]

    apply_per_clip(rows, "depth", fn, lambda r: int(r["clip_id"]), lambda r, o: r.update(out=o), timeout_s=5)
    assert [r.get("out") for r in rows] == [0, None, 20]
    assert rows[1]["error_type"] == "ValueError" and rows[1]["error_stage"] == "depth"


@pytest.mark.timeout(180)
def test_pipeline_records_a_hung_decoder_as_a_timeout_and_goes_on(hooked_ray, make_synthetic_clip, tmp_path):
    src = tmp_path / "src"
    uris = [make_synthetic_clip(src / "hang.mp4", frames=28, width=64, height=48),
            make_synthetic_clip(src / "ok.mp4", frames=14, width=64, height=48)]
    cfg = _cfg(decode_timeout_s=3.0)
    plans = _plans(uris, cfg)
    victim = next(p.clip_id for p in plans if p.source_uri.endswith("hang.mp4") and p.start == HANG_START)
    dst = str(tmp_path / "dst")
    summary = run_preprocess(str(src), dst, cfg)
    assert (summary.ok, summary.failed, summary.planned) == (5, 1, 6), summary
    assert summary.seconds < HANG_SECONDS  # the job did not wait for the hung decoder
    errors = read_errors(dst).to_pylist()
    assert [(e["clip_id"], e["stage"], e["error_type"]) for e in errors] == [(victim, "decode", "timeout")]
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == 5 and set(ids) == {p.clip_id for p in plans} - {victim}


@pytest.mark.timeout(240)
def test_a_decoder_crashing_its_process_fails_that_video_and_counts_toward_quarantine(hooked_ray,
                                                                                     make_synthetic_clip, tmp_path):
    src = tmp_path / "src"
    uris = [make_synthetic_clip(src / "abort.mp4", frames=28, width=64, height=48),  # 4 clips; 3 abort
            make_synthetic_clip(src / "ok1.mp4", frames=14, width=64, height=48),
            make_synthetic_clip(src / "ok2.mp4", frames=21, width=64, height=48)]
    cfg, dst = _cfg(decode_timeout_s=30.0, max_concurrent_decodes=1), str(tmp_path / "dst")
    plans = _plans(uris, cfg)
    crashed = {p.clip_id for p in plans if p.source_uri.endswith("abort.mp4") and p.start > 0}
    first = run_preprocess(str(src), dst, cfg)
    assert (first.ok, first.failed, first.planned) == (6, 3, 9), first
    errors = read_errors(dst).to_pylist()
    assert {e["clip_id"] for e in errors} == crashed
    assert {(e["stage"], e["error_type"]) for e in errors} == {("decode", "crash")}
    assert all("SIGABRT" in e["message"] for e in errors)
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and set(ids) == {p.clip_id for p in plans} - crashed  # each once
    second = run_preprocess(str(src), dst, cfg)  # only the crashed clips are left; they crash again
    assert (second.ok, second.failed, second.skipped) == (0, 3, 6), second
    assert {e["clip_id"] for e in read_quarantine(dst).to_pylist()} == crashed


# ------------------------------------------------------------------- 3. per-clip resume, quarantine


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_killed_between_the_clips_of_one_video_resumes_at_the_missing_clips(hooked_ray, make_synthetic_clip,
                                                                                tmp_path):
    from tests.test_preprocess import _kill_after_first_shard, _streaming_config

    n = 24
    src = tmp_path / "src"
    # 24 clips of 7 frames, decoded in one pass in well under a second: frames this size keep the tiny
    # models busy long enough after the first commit for the kill to land mid-video.
    uri = make_synthetic_clip(src / "long.mp4", frames=7 * n, width=320, height=240)
    config = _streaming_config(tmp_path / "pp.yaml", frames_format="raw", size="[320, 240]")
    cfg = PreprocessConfig.from_yaml(config)
    expected = {p.clip_id for p in _plans([uri], cfg)}
    assert len(expected) == n
    dst, log = tmp_path / "dst", tmp_path / "run1.log"
    args = [str(src), str(dst), "--config", str(config), "--models", "tiny", "--ray-address", hooked_ray]
    _kill_after_first_shard(args, dst, log)  # a second driver on this module's Ray; Ray ends its tasks when it dies
    first = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()
    assert 0 < len(first) < n, f"expected a half-finished video, found {len(first)} of {n} clips committed"

    rerun_cfg = dataclasses.replace(cfg, decode_batch_size=4, depth_batch_frames=16, clip_batch_frames=16)
    summary = run_preprocess(str(src), str(dst), rerun_cfg)  # same clips, fewer and larger batches
    assert (summary.skipped, summary.ok, summary.failed) == (len(first), n - len(first), 0), summary
    table = read_shards(str(dst), ["clip_id", "run_id"])
    rerun = [c for c, r in zip(*table.to_pydict().values(), strict=True) if r == summary.run_id]
    assert sorted(rerun) == sorted(expected - set(first))  # exactly the missing clips
    ids = table.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == n and set(ids) == expected
    assert read_errors(str(dst)).num_rows == 0


def _errors(*rows) -> object:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cols = {f.name: [] for f in ERRORS_SCHEMA}
    for i, (clip, uri, stage, run) in enumerate(rows):
        for k, v in dict(clip_id=clip, uri=uri, start=None, stage=stage, error_type="E", message="m",
                         traceback=None, run_id=run, timestamp=t0 + dt.timedelta(seconds=i),
                         schema_version=1).items():
            cols[k].append(v)
    import pyarrow as pa

    return pa.Table.from_pydict(cols, schema=ERRORS_SCHEMA)


def test_find_quarantined_counts_runs_not_rows_and_forgets_successes():
    errors = _errors(
        ("a", "v1", "decode", "r1"), ("a", "v1", "decode", "r1"),  # twice in one run: not yet
        ("b", "v1", "depth", "r1"), ("b", "v1", "timeout-free", "r2"),  # two runs: quarantined
        ("c", "v1", "decode", "r1"), ("c", "v1", "decode", "r2"),  # two runs, committed since: not
        ("d", "v2", "plan", "r1"), ("d", "v2", "plan", "r2"),  # a video: by URI
        ("e", "v3", "plan", "r1"), ("e", "v3", "plan", "r2"),  # a video with a committed clip since: not
        ("f", "v1", "pipeline", "r1"), ("f", "v1", "pipeline", "r2"),  # the stream broke: not the input's fault
    )
    q = find_quarantined(errors, committed_ids=KeySet.of(["c"]), committed_uris=KeySet.of(["v3"]))
    assert sorted(q.clips) == ["b"] and sorted(q.videos) == ["v2"] and len(q) == 2
    assert q.clips["b"]["failed_runs"] == ["r1", "r2"] and q.clips["b"]["stage"] == "timeout-free"
    assert q.table().column("kind").to_pylist() == ["clip", "video"]


def _counts(s) -> tuple[int, ...]:
    return s.ok, s.failed, s.skipped, s.quarantined, s.in_quarantine


@pytest.mark.timeout(240)
def test_a_corrupt_video_failing_two_runs_is_quarantined_skipped_and_retried_on_request(
        hooked_ray, bad_videos, make_synthetic_clip, tmp_path):
    from jobs.commands.preprocess import main as cli_main

    src = tmp_path / "src"
    src.mkdir()
    corrupt = str(shutil.copy(bad_videos / "corrupt.mp4", src / "corrupt.mp4"))
    good = make_synthetic_clip(src / "good.mp4", frames=14, width=64, height=48)  # 2 clips
    dst, cfg = str(tmp_path / "dst"), _cfg()
    good_ids = {p.clip_id for p in _plans([good], cfg)}

    first = run_preprocess(str(src), dst, cfg)
    assert _counts(first) == (2, 1, 0, 0, 0), first
    assert read_quarantine(dst).num_rows == 0  # one failed run is not enough
    second = run_preprocess(str(src), dst, cfg)
    assert _counts(second) == (0, 1, 2, 0, 1), second
    (entry,) = read_quarantine(dst).to_pylist()
    assert (entry["kind"], entry["uri"], entry["stage"], entry["error_type"]) == (
        "video", corrupt, "plan", "VideoDecodeError")
    assert entry["failed_runs"] == [first.run_id, second.run_id]

    third = run_preprocess(str(src), dst, cfg)  # skipped: not even probed, no new error rows
    assert _counts(third) == (0, 0, 2, 1, 1), third
    assert third.videos == 2 and third.planned == 2 and read_errors(dst).num_rows == 2

    argv = [str(src), dst, "--models", "tiny", "--size", "64x48", "--shard-size", "2", "--frames-format", "raw",
            "--no-progress", "--max-failure-fraction", "1", "--retry-quarantined"]
    assert cli_main(argv) == 0
    errors = read_errors(dst)
    assert errors.num_rows == 3 and set(errors.column("uri").to_pylist()) == {corrupt}
    (entry,) = read_quarantine(dst).to_pylist()
    assert len(entry["failed_runs"]) == 3 and entry["failed_runs"][:2] == [first.run_id, second.run_id]
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == 2 and set(ids) == good_ids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_clip_failing_two_runs_is_quarantined_and_skipped(hooked_ray, make_synthetic_clip, tmp_path):
    hang = make_synthetic_clip(tmp_path / "src" / "hang.mp4", frames=28, width=64, height=48)  # 4 clips
    dst, cfg = str(tmp_path / "dst"), _cfg(decode_timeout_s=2.0)
    victim = next(p.clip_id for p in _plans([hang], cfg) if p.start == HANG_START)
    first = run_preprocess(str(tmp_path / "src"), dst, cfg)
    assert _counts(first) == (3, 1, 0, 0, 0), first
    second = run_preprocess(str(tmp_path / "src"), dst, cfg)
    assert _counts(second) == (0, 1, 3, 0, 1), second
    (entry,) = read_quarantine(dst).to_pylist()
    assert (entry["kind"], entry["clip_id"], entry["stage"], entry["error_type"]) == (
        "clip", victim, "decode", "timeout")
    third = run_preprocess(str(tmp_path / "src"), dst, cfg)  # no pipeline: nothing left to do
    assert _counts(third) == (0, 0, 3, 1, 1), third
    assert third.seconds < 2.0 and read_errors(dst).num_rows == 2
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == 3 and victim not in ids


# ------------------------------------------------------------------ 5. bytes per shard, decodes in flight


@pytest.mark.timeout(240)
def test_shards_are_sized_by_bytes_and_decodes_in_flight_are_bounded(hooked_ray, decode_log, make_synthetic_clip,
                                                                     tmp_path):
    src = tmp_path / "src"
    uris = [make_synthetic_clip(src / f"paced{i}.mp4", frames=28, width=64, height=48, pattern="noise")
            for i in range(2)]  # 8 clips of noise: zstd cannot shrink them much
    target = 150_000  # about 2.4 rows of 4 raw 64x48 frames + float16 depth
    cfg = _cfg(target_shard_bytes=target, max_concurrent_decodes=1, shard_size=64, decode_batch_size=2)
    for f in decode_log.iterdir():
        f.unlink()
    dst = str(tmp_path / "dst")
    summary = run_preprocess(str(src), dst, cfg)
    assert (summary.ok, summary.failed) == (8, 0), summary

    store = TableStore(dst)
    parts = store.committed(SHARDS_DIR)
    tables = [store.read(p) for p in parts]
    rows = [t.slice(i, 1).nbytes for t in tables for i in range(t.num_rows)]
    biggest, total = max(rows), sum(rows)
    assert 60_000 < biggest < target / 2  # what the bounds below assume
    for path, table in zip(parts, tables, strict=True):
        assert table.nbytes <= target, (path, table.num_rows, table.nbytes)
        assert store.fs.size(path) <= target + biggest, (path, store.fs.size(path))
    assert math.ceil(total / target) <= len(parts) <= math.ceil(total / (target - biggest))
    ids = [i for t in tables for i in t.column("clip_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 8 and set(ids) == {p.clip_id for p in _plans(uris, cfg)}

    spans = sorted(tuple(map(float, line.split())) for f in decode_log.iterdir() for line in f.read_text().split("\n")
                   if line)
    assert len(spans) == 2  # each paced video logged its busy interval (4 clips x PACE_SECONDS)
    assert all(b - a >= 4 * PACE_SECONDS for a, b in spans)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
    assert not overlaps, f"videos decoded concurrently despite max_concurrent_decodes=1: {overlaps}"


# ------------------------------------------------------------- 2. one bad sample does not kill its batch


@pytest.mark.timeout(240)
def test_a_model_raising_on_one_clip_of_a_batched_actor_call_fails_only_that_clip(hooked_ray, decode_log,
                                                                                   tmp_path):
    from tests.fixtures.clips import encode_mp4, synthetic_frames

    src = tmp_path / "src"
    src.mkdir()
    frames = synthetic_frames(24, *SIZE)
    (src / "plain.mp4").write_bytes(encode_mp4(frames))
    cfg = _cfg(decode_batch_size=6, depth_batch_frames=24, shard_size=6)  # all 6 clips (4 frames each) in one depth call
    middle = _plans([str(src / "plain.mp4")], cfg)[1]  # 3 clips a video; black out the middle one's frames:
    frames[min(middle.frame_indices) : max(middle.frame_indices) + 1] = 0  # the hooked depth model raises on it
    (src / "dark.mp4").write_bytes(encode_mp4(frames))
    for f in decode_log.glob("poison-*"):
        f.unlink()
    dst = str(tmp_path / "dst")
    summary = run_preprocess(str(src), dst, cfg)

    victim = next(p.clip_id for p in _plans([str(src / "dark.mp4")], cfg) if p.start == middle.start)
    calls = [tuple(map(int, line.split())) for f in decode_log.glob("poison-*")
             for line in f.read_text().splitlines() if line]  # (clips in the call, black ones) per raising call
    assert sorted(calls) == [(1, 1), (6, 1)], calls  # the batched call raised, then the victim's own call
    assert (summary.ok, summary.failed, summary.error) == (5, 1, None), summary
    errors = read_errors(dst).to_pylist()
    assert [(e["clip_id"], e["stage"], e["error_type"]) for e in errors] == [(victim, "depth", "RuntimeError")]
    assert "black clip" in errors[0]["message"]
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    everything = {p.clip_id for p in _plans([str(src / "plain.mp4"), str(src / "dark.mp4")], cfg)}
    assert len(ids) == len(set(ids)) == 5 and set(ids) == everything - {victim}


# ------------------------------------------------------------------------------- 4. bounded memory

STORE_BYTES = 80 * 1024 * 1024  # the local Ray's object store: just over Ray's 75 MiB minimum
BIG_SIZE = (896, 512)  # a decoded clip of 2 frames is 2.6 MiB; the tiny depth model's cost hardly grows with it


def test_the_last_model_stage_drops_the_frames_when_they_are_not_stored(make_synthetic_clip, tmp_path):
    from pipelines.preprocess import ShardWriter

    cfg = _cfg()
    rows = DecodeStage().decode(_plan_rows([make_synthetic_clip(tmp_path / "a.mp4", frames=16, width=64, height=48)], cfg))
    kept = ClipStage(TINY.clip, device="cpu")(DepthStage(TINY.depth, device="cpu")(rows))
    dropped = ClipStage(TINY.clip, device="cpu", drop_frames=True)(DepthStage(TINY.depth, device="cpu")(rows))
    assert len(rows) == 2 and all(len(b) == 4 * 48 * 64 * 3 for b in kept.frames_raw)
    assert list(dropped.frames_raw) == [b"", b""] and list(dropped.status) == [STATUS_OK, STATUS_OK]
    assert list(dropped.clip_embedding) == list(kept.clip_embedding) and list(dropped.depth) == list(kept.depth)
    written = ShardWriter(str(tmp_path / "dst"), "run1", {"depth": TINY.depth, "clip": TINY.clip, "vae": None},
                          store_frames=False)(dropped)
    assert list(written.num_rows) == [2]


class _MemorySampler(threading.Thread):
    """Every second: the RSS of this process (the driver) and the largest RSS of one of its descendants (a local
    `ray.init` spawns the whole session as our children: GCS, the raylet with its plasma store, agents and
    every worker), the summed PSS of all of them (PSS splits a shared page among the processes mapping it,
    so plasma pages count once), and the object store's bytes in use."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address = address  # this session's GCS (other Ray instances may run on the machine)
        self.halt = threading.Event()
        self.pss_peak = self.rss_peak = self.driver_peak = self.store_peak = self.samples = 0

    def sample(self) -> None:
        import psutil
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        me = psutil.Process()
        pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += info.pss
            if p.pid == me.pid:
                self.driver_peak = max(self.driver_peak, info.rss)
            else:
                self.rss_peak = max(self.rss_peak, info.rss)
        self.pss_peak = max(self.pss_peak, pss)
        stats = get_memory_info_reply(get_state_from_address(self.address)).store_stats
        self.store_peak = max(self.store_peak, stats.object_store_bytes_used)
        self.samples += 1

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(1.0)

    def __enter__(self) -> _MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()
        self.sample()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_decoded_frames_several_object_stores_big_stream_in_bounded_memory_without_spilling(
        make_synthetic_clip, tmp_path):
    """Runs last in this module: it replaces the module's hooked cluster with a Ray of an 80 MiB store."""
    import json

    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    ray.shutdown()
    spill = tmp_path / "spill"
    spill.mkdir()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=STORE_BYTES, _system_config={
        "object_spilling_config": json.dumps({"type": "filesystem", "params": {"directory_path": str(spill)}}),
    })
    address = ray.get_runtime_context().gcs_address
    try:
        one = make_synthetic_clip(tmp_path / "one.mp4", frames=32, width=BIG_SIZE[0], height=BIG_SIZE[1])
        for name, copies in (("small", 1), ("big", 7)):  # same content, distinct URIs: distinct clip ids
            for i in range(copies):
                (tmp_path / name).mkdir(exist_ok=True)
                shutil.copy(one, tmp_path / name / f"v{i}.mp4")
        # 2 frames at stride 1: 16 clips a video. Blocks of one clip (2.6 MiB of frames, 4.4 MiB with depth:
        # under 1/16 of the store, see PreprocessConfig). No frames stored: small writes, frames leave after CLIP.
        # One clip per shard: a writer batch of 8 clips (14 MiB of full-size depth) starves this small store's
        # budgets and the run takes 5x as long (measured), though it stays as bounded. One decode actor: each
        # streams a video's clips, and two of them into this store spilled 80-140 MB (measured; see config).
        cfg = _cfg(size=BIG_SIZE, frames=2, stride=1, store_frames=False, shard_size=1, decode_batch_size=1,
                   depth_batch_frames=2, clip_batch_frames=4)  # one decode actor (the default on 2 CPUs)
        clip_bytes = 2 * BIG_SIZE[0] * BIG_SIZE[1] * 3
        runs = {}
        for name in ("small", "big"):
            with _MemorySampler(address) as mem:
                summary = run_preprocess(str(tmp_path / name), str(tmp_path / f"dst-{name}"), cfg)
            runs[name] = (summary, mem)
        stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    finally:
        ray.shutdown()

    (small, small_mem), (big, big_mem) = runs["small"], runs["big"]
    decoded = big.planned * clip_bytes
    report = (f"decoded {decoded / 2**20:.0f} MiB ({big.planned} clips); store peak "
              f"{big_mem.store_peak / 2**20:.0f} of {STORE_BYTES / 2**20:.0f} MiB; summed PSS peak small "
              f"{small_mem.pss_peak / 2**20:.0f} MiB, big {big_mem.pss_peak / 2**20:.0f} MiB; largest RSS of a Ray "
              f"process small {small_mem.rss_peak / 2**20:.0f} MiB, big {big_mem.rss_peak / 2**20:.0f} MiB; driver RSS "
              f"small {small_mem.driver_peak / 2**20:.0f} MiB, big {big_mem.driver_peak / 2**20:.0f} MiB; "
              f"{big_mem.samples} samples; runs {small.seconds:.0f} s, {big.seconds:.0f} s")
    print(report)
    assert decoded >= 3 * STORE_BYTES, report  # the corpus really is several object stores of frames
    for summary, dst, clips in ((small, "dst-small", 16), (big, "dst-big", 112)):  # 112 clips: 294 MiB
        assert (summary.planned, summary.ok, summary.failed) == (clips, clips, 0), summary
        ids = read_shards(str(tmp_path / dst), ["clip_id"]).column("clip_id").to_pylist()
        assert len(ids) == len(set(ids)) == clips, dst  # every clip written exactly once
    assert big_mem.samples >= 10, report
    # Nothing went to disk: no spilled or fallback-allocated (disk-mmapped) bytes, an empty spill directory.
    assert (stats.spilled_bytes_total, stats.spilled_objects_total, stats.object_store_bytes_fallback) == (0, 0, 0)
    assert not any(spill.rglob("*")), sorted(str(p) for p in spill.rglob("*"))[:5]
    assert big_mem.store_peak < STORE_BYTES, report
    # The stated bound, per process: over the big corpus (7x the clips, 3.7 object stores of frames) no Ray
    # process (worker, raylet, GCS) and not the driver peaks higher in RSS than the largest of its kind did over
    # the small corpus plus one object store (RSS counts the plasma pages a process touched: at most the store)
    # plus eight decoded clips (blocks in flight in a stage's heap). A stage or driver that held frames ahead of
    # the others would grow with the corpus, by a good part of the 294 MiB. (The summed PSS of the session is
    # reported, not bounded: it also counts how many task workers Ray happened to start.)
    slack = STORE_BYTES + 8 * clip_bytes
    assert big_mem.rss_peak < small_mem.rss_peak + slack, report
    assert big_mem.driver_peak < small_mem.driver_peak + slack, report
