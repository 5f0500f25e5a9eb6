"""gen1.video: decoding from local / file:// / memory:// / s3:// URIs, sampling, resizing, tensors, encoding."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
import torch

from gen1 import decoding as D
from gen1 import video as V
from tests.fixtures.clips import synthetic_frames

# What PyAV finds in each opencv-doc clip: (frames, width, height). tree.avi's header claims 444 frames.
REAL_CLIP_FACTS = {
    "Megamind.avi": (270, 720, 528),
    "Megamind_bugy.avi": (270, 720, 528),
    "tree.avi": (68, 320, 240),
    "vtest.avi": (795, 768, 576),
}


def pyav_frames(path: str, indices: list[int]) -> np.ndarray:
    """Ground truth: decode sequentially with PyAV and keep ``indices``. uint8 (f, h, w, 3)."""
    found = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return np.stack([found[i] for i in indices])


def clip_path(real_clips: list[str], name: str) -> str:
    return next(p for p in real_clips if Path(p).name == name)


# ------------------------------------------------------------------------------------- real footage


def test_real_clips_probe_and_decode_the_right_frames(real_clips):
    """Every opencv-doc clip: frame count/size from the probe, sampled frames equal sequential decoding.

    The Megamind clips have no timestamps, so decord would return wrong frames there (index 100 gives
    frame 2); the reader must notice and still return the right ones.
    """
    assert sorted(Path(p).name for p in real_clips) == sorted(REAL_CLIP_FACTS)
    for path in real_clips:
        frames, width, height = REAL_CLIP_FACTS[Path(path).name]
        info = D.probe(path)
        assert (info.num_frames, info.width, info.height, info.rotation) == (frames, width, height, 0), path
        assert 5 < info.fps < 31
        indices = [3, 37, 50, 66] + ([100, 150, frames - 1] if frames > 150 else [])
        got = D.read_frames(path, indices)
        want = pyav_frames(path, indices)
        assert got.shape == want.shape == (len(indices), height, width, 3)
        assert got.dtype == np.uint8
        # decord and PyAV convert YUV -> RGB slightly differently (measured max 2 grey levels)
        assert np.abs(got.astype(int) - want).max() <= 3, path


def test_load_clip_real_footage_resized(real_clips):
    clip = D.load_clip(clip_path(real_clips, "vtest.avi"), n=8, stride=4, start=16)
    assert clip.frames.shape == (8, 256, 448, 3)
    assert clip.indices == [16, 20, 24, 28, 32, 36, 40, 44]
    assert clip.fps == pytest.approx(10.0)
    assert clip.clip_id == V.clip_id(clip.source_uri, 16, 8, 4)
    diffs = np.abs(np.diff(clip.frames.astype(int), axis=0)).mean(axis=(1, 2, 3))
    assert (diffs > 0.2).all(), diffs  # people walk: consecutive sampled frames differ


def test_same_frames_via_file_and_memory_uris(real_clips):
    path = clip_path(real_clips, "tree.avi")
    local = D.load_clip(path, n=4, stride=8, start=2)
    memory_uri = "memory://test_video/tree.avi"
    fsspec.filesystem("memory").pipe_file("/test_video/tree.avi", Path(path).read_bytes())
    try:
        for uri in (f"file://{path}", memory_uri):
            other = D.load_clip(uri, n=4, stride=8, start=2)
            assert other.source_uri == uri
            np.testing.assert_array_equal(other.frames, local.frames)
            assert D.probe(uri).num_frames == 68
    finally:
        fsspec.filesystem("memory").rm("/test_video", recursive=True)


# -------------------------------------------------------------------------------------------------- S3


def test_decode_and_write_via_s3(s3_endpoint, real_clips, tmp_path):
    path = clip_path(real_clips, "tree.avi")
    bucket = s3_endpoint.make_bucket("gen1-video-test")
    uri = f"{bucket}/raw/tree.avi"
    with V.open_uri(uri, "wb") as f:
        f.write(Path(path).read_bytes())

    clip = D.load_clip(uri, n=4, stride=8, start=2)
    np.testing.assert_array_equal(clip.frames, D.load_clip(path, n=4, stride=8, start=2).frames)

    out = f"{bucket}/edits/clip.mp4"
    V.write_video(clip.frames, out, fps=clip.fps)
    back = D.read_frames(out, range(4))
    assert back.shape == clip.frames.shape

    with pytest.raises(V.VideoDecodeError, match="no such file") as e:
        D.probe(f"{bucket}/raw/missing.avi")
    assert f"{bucket}/raw/missing.avi" in str(e.value)


def test_s3_endpoint_env_reaches_s3fs_in_subprocesses(s3_endpoint):
    """No storage options anywhere: the env vars alone must route s3fs to moto, in a child process too."""
    bucket = s3_endpoint.make_bucket("gen1-env-test")
    with fsspec.open(f"{bucket}/hello.txt", "wb") as f:
        f.write(b"from the parent")
    code = f"import fsspec, sys; sys.stdout.write(fsspec.open('{bucket}/hello.txt').open().read().decode())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "from the parent"


# -------------------------------------------------------------------------------------------- sampling


def test_sample_indices():
    assert V.sample_indices(32, n=8, stride=4) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert V.sample_indices(10, n=3, stride=2, start=5) == [5, 7, 9]
    assert V.sample_indices(1, n=1, stride=7) == [0]
    with pytest.raises(V.VideoDecodeError, match="need 11 frames, the video has 10") as e:
        V.sample_indices(10, n=3, stride=2, start=6, uri="s3://b/short.mp4")
    assert e.value.uri == "s3://b/short.mp4"
    assert "s3://b/short.mp4" in str(e.value)
    for bad in ({"n": 0, "stride": 1}, {"n": 2, "stride": 0}, {"n": 2, "stride": 1, "start": -1}):
        with pytest.raises(ValueError):
            V.sample_indices(10, **bad)


def test_clip_starts():
    assert V.clip_starts(32, n=8, stride=4) == [0]  # one clip spans 29 frames
    assert V.clip_starts(100, n=8, stride=4) == [0, 29, 58]
    assert V.clip_starts(28, n=8, stride=4) == []
    assert V.clip_starts(10, n=2, stride=1) == [0, 2, 4, 6, 8]
    assert V.clip_starts(10, n=2, stride=1, max_clips=3) == [0, 4, 8]  # spread over the video
    assert V.clip_starts(10, n=2, stride=1, max_clips=0) == []
    starts = V.clip_starts(795, n=8, stride=4, max_clips=10)
    assert len(starts) == 10 and all(b - a >= 29 for a, b in zip(starts, starts[1:], strict=False))


def test_too_short_clip_raises_naming_uri(bad_videos):
    short = str(bad_videos / "short.mp4")
    assert D.probe(short).num_frames == 3
    assert D.load_clip(short, n=3, stride=1).frames.shape[0] == 3
    with pytest.raises(V.VideoDecodeError, match="clip too short") as e:
        D.load_clip(short, n=4, stride=1)
    assert short in str(e.value)
    with pytest.raises(V.VideoDecodeError, match="out of range"):
        D.read_frames(short, [0, 3])


# ---------------------------------------------------------------------------------------- size, crop


def test_target_size():
    assert V.target_size(720, 528) == (448, 256)
    assert V.target_size(528, 720) == (256, 448)
    assert V.target_size(100, 100) == (448, 256)
    assert V.target_size(1080, 1920, size=(256, 448)) == (256, 448)  # size given either way round
    assert V.target_size(1920, 1080, size=(256, 448)) == (448, 256)


def test_resize_center_crop_keeps_the_centre():
    frames = np.zeros((2, 100, 200, 3), dtype=np.uint8)
    frames[:, :, :50] = 255  # left quarter white: cropped away when 200x100 -> 100x100
    frames[:, 40:60, 90:110] = (255, 0, 0)  # a red square in the centre
    out = V.resize_center_crop(frames, 100, 100)
    assert out.shape == (2, 100, 100, 3) and out.dtype == np.uint8
    assert out[:, :, :, 1].max() == 0  # no white left
    red = np.argwhere((out[0, :, :, 0] > 128) & (out[0, :, :, 1] < 128))
    assert red.min(axis=0).tolist() == [40, 40] and red.max(axis=0).tolist() == [59, 59]
    up = V.resize_center_crop(frames, 448, 256)  # upscale: covers, then crops
    assert up.shape == (2, 256, 448, 3)
    red = np.argwhere((up[0, :, :, 0] > 128) & (up[0, :, :, 1] < 128)).mean(axis=0)
    np.testing.assert_allclose(red, [127.5, 223.5], atol=1.5)
    with pytest.raises(ValueError, match="uint8 frames"):
        V.resize_center_crop(frames.astype(np.float32), 10, 10)


def test_load_clip_landscape_and_portrait(synthetic_clip, synthetic_portrait_clip):
    land = D.load_clip(synthetic_clip, n=8, stride=2)
    assert land.frames.shape == (8, 256, 448, 3)
    portrait = D.load_clip(synthetic_portrait_clip, n=8, stride=2)
    assert portrait.frames.shape == (8, 448, 256, 3)
    native = D.load_clip(synthetic_portrait_clip, n=2, stride=1, size=None)
    assert native.frames.shape == (2, 96, 64, 3)
    small = D.load_clip(synthetic_clip, n=2, stride=1, size=(64, 32))
    assert small.frames.shape == (2, 32, 64, 3)


def test_synthetic_clip_frames_match_what_was_encoded(synthetic_clip):
    indices = [0, 1, 5, 23, 5]
    got = D.read_frames(synthetic_clip, indices)
    want = synthetic_frames(24)[indices]
    assert got.shape == (5, 64, 96, 3)
    assert np.abs(got.astype(int) - want).mean() < 3
    np.testing.assert_array_equal(got[2], got[4])  # repeats allowed, in the order asked
    assert np.abs(got[1].astype(int) - got[0]).mean() > 5  # motion


@pytest.mark.parametrize("rotation", [90, 270])
@pytest.mark.parametrize("seek", [False, True])
def test_display_rotation_is_applied(make_synthetic_clip, tmp_path, monkeypatch, rotation, seek):
    """Phones store portrait video as landscape + a display matrix: frames come back upright, whether
    read in one pass (PyAV) or by seeks (decord)."""
    monkeypatch.setattr(D, "use_seeks", lambda requests: seek)
    path = make_synthetic_clip(tmp_path / f"rot{rotation}.mp4", frames=6, rotation=rotation)
    info = D.probe(path)
    assert (info.width, info.height, info.rotation) == (64, 96, rotation)
    got = D.read_frames(path, [0, 4])
    want = np.rot90(synthetic_frames(6)[[0, 4]], k=rotation // 90, axes=(1, 2))
    assert got.shape == (2, 96, 64, 3)
    assert np.abs(got.astype(int) - want).mean() < 3
    assert D.load_clip(path, n=2, stride=1).frames.shape == (2, 448, 256, 3)


@pytest.mark.parametrize("rotation", [0, 90])
def test_one_pass_resizes_like_resize_center_crop(make_synthetic_clip, tmp_path, rotation):
    """A pass scales in FFmpeg's swscale, at the output size; it agrees with OpenCV's resize of the native
    frames (`resize_center_crop`) down and up, upright and rotated: same shape, the same crop, about one grey
    level apart; a crop from the wrong place or a turn before the scale would be tens of levels off."""
    path = make_synthetic_clip(tmp_path / f"r{rotation}.mp4", frames=6, rotation=rotation)
    native = D.read_frames(path, [0, 3, 5])
    for size in [(32, 24), (24, 40), (160, 120)]:
        got = next(D.decode_clips(path, [D.ClipRequest((0, 3, 5), size)]))[1]
        want = V.resize_center_crop(native, *size)
        assert got.shape == want.shape == (3, size[1], size[0], 3)
        assert np.abs(got.astype(int) - want).mean() < 2.5, (size, rotation)
        moved = np.roll(want, 4, axis=2)  # the square 4 pixels off: what a misplaced crop gives
        assert np.abs(got.astype(int) - moved).mean() > 2 * np.abs(got.astype(int) - want).mean()


# -------------------------------------------------------------------------------------------- tensors


def test_tensor_range_and_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    frames[0, 0, 0] = (0, 255, 128)
    x = V.frames_to_tensor(frames)
    assert x.shape == (3, 3, 8, 10) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(V.tensor_to_frames(x), frames)
    clamped = V.tensor_to_frames(torch.full((1, 3, 2, 2), 5.0))
    assert clamped.dtype == np.uint8 and (clamped == 255).all()
    with pytest.raises(ValueError, match=r"\(f, 3, h, w\)"):
        V.tensor_to_frames(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name, reason",
    [
        ("corrupt.mp4", "not a readable video"),
        ("empty.mp4", "file is empty"),
        ("text.mp4", "not a readable video"),
    ],
)
def test_bad_files_raise_video_decode_error(bad_videos, name, reason):
    path = str(bad_videos / name)
    for call in (
        lambda: D.probe(path),
        lambda: D.load_clip(path, n=2, stride=1),
        lambda: D.read_frames(path, [0]),
    ):
        with pytest.raises(V.VideoDecodeError, match=reason) as e:
            call()
        assert e.value.uri == path and path in str(e.value)
        if name != "empty.mp4":
            assert isinstance(e.value.__cause__, av.FFmpegError)  # the library error is chained


def test_bad_uris_raise_video_decode_error(tmp_path):
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(V.VideoDecodeError, match="no such file") as e:
        D.load_clip(missing, n=1, stride=1)
    assert missing in str(e.value)
    with pytest.raises(V.VideoDecodeError, match="cannot open this URI") as e:
        D.probe("nosuchscheme://bucket/clip.mp4")
    assert "nosuchscheme://bucket/clip.mp4" in str(e.value)
    with pytest.raises(V.VideoDecodeError, match="no such file"):
        D.probe("memory://test_video/missing.mp4")


def test_video_decode_error_pickles():
    e = pickle.loads(pickle.dumps(V.VideoDecodeError("s3://b/x.mp4", "file is empty (0 bytes)")))
    assert (e.uri, e.reason) == ("s3://b/x.mp4", "file is empty (0 bytes)")
    assert str(e) == "cannot decode video 's3://b/x.mp4': file is empty (0 bytes)"


# -------------------------------------------------------------------------------------------- writing


def test_write_mp4_round_trip(tmp_path):
    frames = synthetic_frames(20, 96, 64)
    uri = str(tmp_path / "out" / "edit.mp4")  # parent directory created
    V.write_video(frames, uri, fps=12)
    info = D.probe(uri)
    assert (info.num_frames, info.width, info.height) == (20, 96, 64)
    assert info.fps == pytest.approx(12)
    back = D.read_frames(uri, range(20))
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 3
    with av.open(uri) as c:
        assert (c.streams.video[0].codec_context.name, c.streams.video[0].format.name) == ("h264", "yuv420p")


def test_write_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = synthetic_frames(4, 96, 64)[:, :63, :95]
    V.write_video(frames, str(tmp_path / "odd.mp4"), fps=8)
    back = D.read_frames(str(tmp_path / "odd.mp4"), range(4))
    assert back.shape == (4, 64, 96, 3)
    assert np.abs(back[:, :63, :95].astype(int) - frames).mean() < 3


def test_write_gif_round_trip_via_memory():
    frames = synthetic_frames(10, 96, 64)
    frames[5] = frames[4]  # a repeated frame must stay a frame (Pillow's GIF writer would merge it)
    uri = "memory://test_video_gif/anim.gif"
    try:
        V.write_video(frames, uri, fps=10)
        assert fsspec.open(uri).open().read(6) == b"GIF89a"
        info = D.probe(uri)
        assert (info.num_frames, info.width, info.height) == (10, 96, 64)
        back = D.read_frames(uri, range(10))
        assert back.shape == frames.shape
        assert np.abs(back.astype(int) - frames).mean() < 2  # an adaptive palette per frame
    finally:
        fsspec.filesystem("memory").rm("/test_video_gif", recursive=True)


def test_write_rejects_bad_arguments(tmp_path):
    frames = synthetic_frames(2, 16, 16)
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        V.write_video(frames, str(tmp_path / "x.avi"), fps=8)
    with pytest.raises(ValueError, match="fps > 0"):
        V.write_video(frames, str(tmp_path / "x.mp4"), fps=0)
    with pytest.raises(ValueError, match="uint8 frames"):
        V.write_video(frames[0], str(tmp_path / "x.mp4"), fps=8)


# ------------------------------------------------------------------------------------------- clip ids


def test_clip_id_is_stable_and_distinct():
    cid = V.clip_id("s3://bucket/videos/a.mp4", 16, 8, 4)
    assert cid == V.clip_id("s3://bucket/videos/a.mp4", 16, 8, 4)
    assert len(cid) == 16 and int(cid, 16) >= 0
    # pinned: ids are stored in shards; changing the hash would orphan every existing row
    assert cid == "fa44be698f0ec6dc"  # sha1('["s3://bucket/videos/a.mp4",16,8,4]')[:16]
    others = {
        V.clip_id("s3://bucket/videos/b.mp4", 16, 8, 4),
        V.clip_id("s3://bucket/videos/a.mp4", 17, 8, 4),
        V.clip_id("s3://bucket/videos/a.mp4", 16, 9, 4),
        V.clip_id("s3://bucket/videos/a.mp4", 16, 8, 2),
    }
    assert cid not in others and len(others) == 4
    clip = V.Clip("u", start=3, indices=[3, 5, 7], fps=8.0, frames=np.zeros((3, 2, 2, 3), np.uint8))
    assert clip.clip_id == V.clip_id("u", 3, 3, 2)  # stride derived from the indices
    single = V.Clip("u", start=3, indices=[3], fps=8.0, frames=np.zeros((1, 2, 2, 3), np.uint8), stride=4)
    assert single.clip_id == V.clip_id("u", 3, 1, 4)


def test_read_image_rgb_palette_and_typed_errors(tmp_path):
    from PIL import Image

    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    np.testing.assert_array_equal(V.read_image(str(tmp_path / "frame.png")), rgb)
    with fsspec.open("memory://images/frame.png", "wb") as fh:
        fh.write((tmp_path / "frame.png").read_bytes())
    np.testing.assert_array_equal(V.read_image("memory://images/frame.png"), rgb)

    ids = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)  # a DAVIS-style palette mask keeps its ids
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(V.read_image(str(tmp_path / "mask.png"), "P"), ids)
    assert V.read_image(str(tmp_path / "mask.png")).shape == (2, 3, 3)

    (tmp_path / "notes.png").write_text("not an image")
    for uri, cause in ((str(tmp_path / "missing.png"), "FileNotFoundError"),
                       (str(tmp_path / "notes.png"), "UnidentifiedImageError")):
        with pytest.raises(V.ImageDecodeError) as info:
            V.read_image(uri)
        assert str(info.value).startswith(f"cannot decode image {uri!r}: cannot read image: {cause}")
        assert isinstance(info.value, V.VideoDecodeError) and info.value.uri == uri
        assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
