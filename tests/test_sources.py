"""Sources: listing videos (local, s3://, manifests) and planning clips with stable ids."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen1.decoding import probe
from gen1.video import VideoDecodeError, VideoInfo, clip_id
from pipelines.sources import list_videos, normalize_uri, plan_clips, plan_video, read_manifest


def _touch(path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_list_videos_recurses_filters_by_extension_and_sorts(tmp_path):
    a = _touch(tmp_path / "b" / "a.MP4")
    b = _touch(tmp_path / "a.avi")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "b" / "c" / "d.webm")
    found = list_videos(str(tmp_path), extensions=(".mp4", ".avi"))
    assert found == sorted([a, b])
    assert list_videos(str(tmp_path), extensions=("webm",)) == [str(tmp_path / "b" / "c" / "d.webm")]


def test_list_videos_normalises_relative_and_file_uris(tmp_path, monkeypatch):
    video = _touch(tmp_path / "v" / "x.mp4")
    monkeypatch.chdir(tmp_path)
    assert list_videos("v") == [video]
    assert list_videos(f"file://{tmp_path}/v") == [video]
    assert list_videos("v/x.mp4") == [video]  # a single video
    assert normalize_uri("v/x.mp4") == video


def test_list_videos_missing_source_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_videos(str(tmp_path / "nope"))


def test_manifest_csv_and_parquet_resolve_relative_entries_and_drop_duplicates(tmp_path):
    a = _touch(tmp_path / "clips" / "a.mp4")
    b = _touch(tmp_path / "elsewhere" / "b.mp4")
    (tmp_path / "m.csv").write_text(f"uri,caption\nclips/a.mp4,first\n{b},second\nclips/a.mp4,again\n")
    assert list_videos(str(tmp_path / "m.csv")) == [a, b]
    pq.write_table(pa.table({"video": ["clips/a.mp4", b]}), tmp_path / "m.parquet")
    assert read_manifest(str(tmp_path / "m.parquet"), column="video") == [a, b]
    with pytest.raises(ValueError, match="'uri'.*video"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_plan_clips_non_overlapping_windows_with_stable_unique_ids():
    info = VideoInfo(uri="s3://b/v.mp4", num_frames=30, fps=24.0, width=640, height=360)
    plans = plan_clips(info, frames=4, stride=2, size=(64, 32))
    span = 3 * 2 + 1
    assert [p.start for p in plans] == list(range(0, 30 - span + 1, span)) == [0, 7, 14, 21]
    assert plans[1].frame_indices == [7, 9, 11, 13]
    assert {(p.width, p.height) for p in plans} == {(64, 32)}
    assert [p.clip_id for p in plans] == [clip_id("s3://b/v.mp4", s, 4, 2) for s in (0, 7, 14, 21)]
    assert len({p.clip_id for p in plans}) == 4
    assert plan_clips(info, 4, 2, size=(64, 32)) == plans  # stable


def test_plan_clips_portrait_size_clips_per_video_and_too_short():
    portrait = VideoInfo(uri="/v.mp4", num_frames=100, fps=10.0, width=360, height=640)
    plans = plan_clips(portrait, frames=8, stride=4, clips_per_video=3, size=(448, 256))
    assert [(p.width, p.height) for p in plans] == [(256, 448)] * 3
    span = 7 * 4 + 1
    all_starts = list(range(0, 100 - span + 1, span))
    assert [p.start for p in plans] == [all_starts[0], all_starts[1], all_starts[-1]]
    with pytest.raises(VideoDecodeError, match="too short"):
        plan_clips(VideoInfo(uri="/s.mp4", num_frames=6, fps=10.0, width=8, height=8), frames=4, stride=2)


def test_plan_video_on_real_footage(real_clips):
    vtest = next(c for c in real_clips if c.endswith("vtest.avi"))
    info = probe(vtest)
    plans = plan_video(vtest, frames=8, stride=4, clips_per_video=5)
    assert len(plans) == 5
    assert plans[0].start == 0 and plans[-1].frame_indices[-1] < info.num_frames
    assert (plans[0].width, plans[0].height) == (448, 256)  # 768x576 is landscape
    assert plans[0].fps == pytest.approx(info.fps)


@pytest.mark.timeout(120)
def test_list_videos_on_s3(s3_endpoint, make_synthetic_clip):
    bucket = s3_endpoint.make_bucket("sources-test")
    a = make_synthetic_clip(f"{bucket}/corpus/a.mp4", frames=6)
    b = make_synthetic_clip(f"{bucket}/corpus/sub/b.mp4", frames=6)
    import fsspec

    fsspec.filesystem("s3").pipe_file("sources-test/corpus/readme.txt", b"hi")
    assert list_videos(f"{bucket}/corpus") == [a, b]
    assert os.path.basename(list_videos(f"{bucket}/corpus/sub/b.mp4")[0]) == "b.mp4"
