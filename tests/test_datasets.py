"""DAVIS 2017 and LOVEU-TGVE-2023 readers on a DAVIS-layout fixture made from real footage, locally and
through an fsspec (memory://) URI."""

from __future__ import annotations

import csv
import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from gen1.video import resize_center_crop
from pipelines.datasets import (
    DatasetError,
    SequenceClip,
    choose_indices,
    load_sequence_mask,
    parse_dataset,
    parse_tgve_csv,
    read_dataset,
    read_davis,
    read_tgve,
)
from tests.fixtures.davis import DAVIS_FRAMES, TGVE_ROWS

SIZE = (64, 48)
NATIVE = (640, 480)  # the fixture's frame size: clips of it are not resized


def test_parse_dataset():
    assert parse_dataset("davis:s3://bucket/DAVIS") == ("davis", "s3://bucket/DAVIS")
    assert parse_dataset("tgve:/data/tgve") == ("tgve", "/data/tgve")
    for bad in ("/data/DAVIS", "kinetics:/x", "davis:"):
        with pytest.raises(DatasetError, match="KIND:URI"):
            parse_dataset(bad)


def test_read_davis_lists_sequences_frames_and_masks(davis_root):
    seqs = read_davis(str(davis_root))
    assert [s.name for s in seqs] == ["megamind", "walking"]
    megamind, walking = seqs
    assert megamind.num_frames == walking.num_frames == DAVIS_FRAMES
    assert walking.frame_uris[0] == f"{davis_root}/JPEGImages/480p/walking/00000.jpg"
    assert walking.frames_uri == f"{davis_root}/JPEGImages/480p/walking"
    assert walking.has_masks and len(walking.mask_uris) == DAVIS_FRAMES
    assert walking.mask_uris[3].endswith("Annotations/480p/walking/00003.png")
    assert not megamind.has_masks
    assert all(s.dataset == "davis" and s.fps == 24.0 for s in seqs)


def test_read_davis_split_selection_and_errors(davis_root, tmp_path):
    assert [s.name for s in read_davis(str(davis_root), split="train")] == ["walking"]
    assert [s.name for s in read_davis(str(davis_root), split="val")] == ["megamind", "walking"]
    assert [s.name for s in read_davis(str(davis_root), sequences=["walking"])] == ["walking"]
    assert [s.name for s in read_davis(str(davis_root), limit=1)] == ["megamind"]
    with pytest.raises(DatasetError, match=r"\['bear'\] not found"):
        read_davis(str(davis_root), sequences=["bear"])
    with pytest.raises(DatasetError, match="test-dev.txt"):
        read_davis(str(davis_root), split="test-dev")
    with pytest.raises(DatasetError, match=r"JPEGImages/480p/<sequence>/00000.jpg"):
        read_davis(str(tmp_path))
    assert [s.name for s in read_dataset(f"davis:{davis_root}", split="train")] == ["walking"]


def test_sequence_clip_reads_the_frames_it_names(davis_root):
    walking = read_davis(str(davis_root), sequences=["walking"])[0]
    clip = SequenceClip.from_sequence(walking, 4, SIZE, stride=3, start=1)
    frames = clip.load_frames()
    assert list(clip.frame_indices) == [1, 4, 7, 10] and clip.stride == 3
    assert frames.shape == (4, SIZE[1], SIZE[0], 3) and frames.dtype == np.uint8
    direct = np.asarray(Image.open(davis_root / "JPEGImages/480p/walking/00007.jpg").convert("RGB"))
    np.testing.assert_array_equal(frames[2], resize_center_crop(direct[None], *SIZE)[0])
    assert clip.fps == pytest.approx(24.0 / 3)
    assert clip.source_uri == walking.frames_uri
    # the clip id is stable and depends on the frames chosen
    again = SequenceClip.from_sequence(walking, 4, SIZE, stride=3, start=1)
    other = SequenceClip.from_sequence(walking, 4, SIZE, stride=2, start=1)
    assert clip.clip_id == again.clip_id != other.clip_id
    full = SequenceClip.from_sequence(walking, 2, NATIVE).load_frames()
    assert full.shape == (2, 480, 640, 3)  # 768x576 footage scaled to 480 lines


def test_choose_indices_shrinks_the_stride_to_fit():
    assert choose_indices(12, 4, 3) == ([0, 3, 6, 9], 3)
    assert choose_indices(12, 8, 4) == ([0, 1, 2, 3, 4, 5, 6, 7], 1)  # 4, 3 and 2 overrun 12 frames
    assert choose_indices(12, 5, 4, start=2) == ([2, 4, 6, 8, 10], 2)
    from gen1.video import VideoDecodeError

    with pytest.raises(VideoDecodeError):
        choose_indices(12, 13, 1)


def test_masks_cover_the_moving_people(davis_root):
    walking = read_davis(str(davis_root), sequences=["walking"])[0]
    indices = list(range(0, DAVIS_FRAMES, 2))
    ids = np.stack([np.asarray(Image.open(walking.mask_uris[i])) for i in indices])
    assert set(np.unique(ids)) == {0, 1, 2}
    mask = load_sequence_mask(walking, indices)
    np.testing.assert_array_equal(mask, (ids > 0).astype(np.float32))
    assert 0.002 < mask.mean() < 0.2  # pedestrians, not the whole frame
    np.testing.assert_array_equal(load_sequence_mask(walking, indices, objects=[1]), (ids == 1).astype(np.float32))
    np.testing.assert_array_equal(load_sequence_mask(walking, indices, invert=True), 1 - mask)
    # the masked pixels are the ones that change between frames (people walking, static camera)
    frames = SequenceClip.from_sequence(walking, DAVIS_FRAMES, NATIVE).load_frames().astype(np.float32)
    motion = np.abs(np.diff(frames, axis=0)).mean(axis=-1)  # (f-1, h, w)
    m = load_sequence_mask(walking, range(DAVIS_FRAMES - 1)) > 0
    assert motion[m].mean() > 5 * motion[~m].mean()
    # resized like the frames: same size, still binary
    small = load_sequence_mask(walking, indices, size=SIZE)
    assert small.shape == (len(indices), SIZE[1], SIZE[0]) and set(np.unique(small)) <= {0.0, 1.0}
    megamind = read_davis(str(davis_root), sequences=["megamind"])[0]
    with pytest.raises(DatasetError, match="no per-frame masks"):
        load_sequence_mask(megamind, [0])


def test_read_davis_from_an_fsspec_uri(davis_root):
    fs = fsspec.filesystem("memory")
    fs.put(str(davis_root), "/davis-mem", recursive=True)
    try:
        seqs = read_davis("memory://davis-mem", split="val")
        assert [s.name for s in seqs] == ["megamind", "walking"]
        assert seqs[1].frame_uris[0] == "memory://davis-mem/JPEGImages/480p/walking/00000.jpg"
        local = read_davis(str(davis_root), sequences=["walking"])[0]
        a = SequenceClip.from_sequence(seqs[1], 3, SIZE, stride=2)
        b = SequenceClip.from_sequence(local, 3, SIZE, stride=2)
        np.testing.assert_array_equal(a.load_frames(), b.load_frames())
        np.testing.assert_array_equal(load_sequence_mask(seqs[1], [0, 5]), load_sequence_mask(local, [0, 5]))
    finally:
        fs.rm("/davis-mem", recursive=True)


def test_read_tgve_layout_and_prompts(tgve_root):
    videos = read_tgve(str(tgve_root))
    assert [(v.name, v.subset) for v in videos] == [("walking", "DAVIS_480p"), ("megamind", "videvo_480p")]
    walking = videos[0]
    assert walking.caption == TGVE_ROWS[0][1]
    assert walking.prompts == dict(zip(("style", "object", "background", "multiple"), TGVE_ROWS[0][2:], strict=True))
    assert walking.num_frames == DAVIS_FRAMES and walking.dataset == "tgve"
    assert walking.frames_uri == f"{tgve_root}/DAVIS_480p/480p_frames/walking"
    assert SequenceClip.from_sequence(walking, 2, SIZE).load_frames().shape == (2, SIZE[1], SIZE[0], 3)
    assert [v.name for v in read_dataset(f"tgve:{tgve_root}", limit=1)] == ["walking"]


def _csv(rows, header=("Video name", "Our GT caption", "Style Change Caption", "Object Change Caption",
                       "Background Change Caption", "Multiple Changes Caption")) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def test_parse_tgve_csv_sections_and_errors():
    rows = parse_tgve_csv(_csv([["youtube_480p", "", "", "", "", ""], ["a", "cap", "s", "o", "b", "m"],
                                ["", "", "", "", "", ""], ["b", "cap2", "s2", "o2", "b2", "m2"]]))
    assert [(r["name"], r["subset"]) for r in rows] == [("a", "youtube_480p"), ("b", "youtube_480p")]
    assert rows[1]["prompts"] == {"style": "s2", "object": "o2", "background": "b2", "multiple": "m2"}
    assert parse_tgve_csv(_csv([["a", "cap", "s", "o", "b", "m"]]))[0]["subset"] is None
    with pytest.raises(DatasetError, match=r"lacks columns \['Multiple Changes Caption'\]"):
        parse_tgve_csv(_csv([], header=("Video name", "Our GT caption", "Style Change Caption",
                                        "Object Change Caption", "Background Change Caption")))
    with pytest.raises(DatasetError, match=r"row 'a': empty \['object'\]"):
        parse_tgve_csv(_csv([["a", "cap", "s", "", "b", "m"]]))


def test_read_tgve_without_sections_finds_the_subset_and_names_missing_videos(tgve_root, tmp_path):
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text(_csv([list(TGVE_ROWS[1])]))
    (video,) = read_tgve(str(tgve_root), csv_uri=str(csv_path))
    assert (video.name, video.subset) == ("megamind", "videvo_480p")
    csv_path.write_text(_csv([["surfer", "c", "s", "o", "b", "m"]]))
    with pytest.raises(DatasetError, match="'surfer' .* has no frames"):
        read_tgve(str(tgve_root), csv_uri=str(csv_path))
    with pytest.raises(DatasetError, match="exactly one prompts .csv"):
        read_tgve(str(tmp_path / "nothing"))
