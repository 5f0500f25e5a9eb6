"""Decoding videos: probe a file, then cut planned clips out of it, each video opened once.

`decode_clips` takes one video and the clips wanted from it (`ClipRequest`: frame indices and an output
size) and yields each clip, resized, as soon as its last frame is decoded. It picks one of two ways:

- **one pass** (dense plans, the usual case: every clip of a video): PyAV decodes the stream from the
  start with FFmpeg's frame and slice threads, keeps only the frames some clip needs, resizes each as it
  arrives and hands a clip over when it is complete. Frames shared by overlapping clips are decoded once,
  and at most the clips still open are held: about one clip span plus the current batch, never the video.
- **seek** (sparse plans: the clips cover under `SEEK_BELOW_COVERAGE` of the frames a pass would decode,
  and a pass would skip more than `SEEK_MIN_SKIPPED` frames, e.g. 2 clips of an hour of footage): decord
  seeks to the keyframe before each clip and decodes from there. Decord, not TorchCodec: TorchCodec needs
  the system's FFmpeg libraries and a build matched to our torch pin (neither is on our machines; its
  0.17 wheel fails to load here), while decord ships its own FFmpeg and is already a dependency.
  Containers without usable timestamps (AVI with packed B-frames, such as opencv-doc's ``Megamind.avi``)
  make decord's seeks return wrong frames: those are read in one pass instead.

Probing (`probe`) validates a file with PyAV before decord ever sees it (decord can crash or hang on
garbage) and counts packets (headers can lie). Remote videos (any fsspec URI, with ``storage_options``)
are never read whole into memory: PyAV reads them through an fsspec file (range reads); decord, which
needs a path, gets a temporary local copy that lives only while the video is being read.

Frames are uint8 ``(f, h, w, 3)`` RGB in display orientation (a display-matrix rotation is applied).
Every failure is one typed error, `gen1.video.VideoDecodeError`, naming the URI and the reason.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import av
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from gen1.video import (
    DEFAULT_SIZE,
    Clip,
    VideoDecodeError,
    VideoInfo,
    cover_size,
    resize_center_crop,
    sample_indices,
    target_size,
)

logger = logging.getLogger(__name__)

# decord cannot index these ("failed to measure duration/frame-count"); they are always read in one pass.
_SEQUENTIAL_FORMATS = {"gif"}
SEEK_BELOW_COVERAGE = 0.2  # seek when the clips' spans cover less than this share of the frames a pass decodes
SEEK_MIN_SKIPPED = 250  # ... and a pass would decode at least this many frames no clip needs
REMOTE_BLOCK_SIZE = 8 * 2**20  # bytes per range read of a remote video


@dataclass(frozen=True)
class ClipRequest:
    """One clip wanted from a video: its frame ``indices`` (any order, repeats allowed), resized and
    centre-cropped to ``size`` (w, h) or kept at the native size when ``size`` is None."""

    indices: tuple[int, ...]
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.indices or min(self.indices) < 0:
            raise ValueError(f"expected at least one frame index, all >= 0; got {list(self.indices)}")


def decode_clips(uri: str, requests: Sequence[ClipRequest], storage_options: Mapping[str, Any] | None = None,
                 threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(i, frames)`` for each ``requests[i]``, uint8 (f, h, w, 3), as each clip completes.

    One pass or seeks, as `use_seeks` decides (see the module docstring). ``threads``: FFmpeg decoding
    threads of a pass (0: FFmpeg's choice). A failure raises `VideoDecodeError` after the clips that
    completed before it were yielded; the caller knows the others by their missing indices.
    """
    if not requests:
        return
    with VideoSource(uri, storage_options) as source:
        if use_seeks(requests):
            info = source.probe()
            if source.seekable(info):
                for i, req in enumerate(requests):
                    yield i, _sized(source.read_seeking(list(req.indices), info), req.size)
                return
        yield from source.read_one_pass(requests, threads)


def use_seeks(requests: Sequence[ClipRequest]) -> bool:
    """Whether seeking to each clip costs less than one pass: the clips' spans (first to last frame) cover
    under `SEEK_BELOW_COVERAGE` of the frames a pass decodes, and it would skip `SEEK_MIN_SKIPPED` or more."""
    spans = sorted((min(r.indices), max(r.indices)) for r in requests)
    covered, reach = 0, -1
    for lo, hi in spans:  # the union of the spans, in frames
        covered += max(0, hi - max(lo, reach + 1) + 1)
        reach = max(reach, hi)
    passed = reach + 1
    return covered < SEEK_BELOW_COVERAGE * passed and passed - covered >= SEEK_MIN_SKIPPED


def probe(uri: str, storage_options: Mapping[str, Any] | None = None) -> VideoInfo:
    """Open and validate a video: container, video stream, first frame decodes, frame count."""
    with VideoSource(uri, storage_options) as source:
        return source.probe()


def read_frames(uri: str, indices: Sequence[int], storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Decode the given frame indices (any order, repeats allowed): uint8 (f, h, w, 3) RGB, native size."""
    return next(iter(decode_clips(uri, [ClipRequest(tuple(int(i) for i in indices))],
                                  storage_options=storage_options)))[1]


def load_clip(
    uri: str, n: int, stride: int, start: int = 0, size: tuple[int, int] | None = DEFAULT_SIZE
) -> Clip:
    """Probe, sample ``n`` frames ``stride`` apart from ``start``, resize/center-crop to ``size``.

    ``size`` is (w, h) for landscape sources and is transposed for portrait ones (`target_size`);
    None keeps the native size.
    """
    info = probe(uri)
    indices = sample_indices(info.num_frames, n, stride, start, uri=uri)
    out_size = target_size(info.width, info.height, size) if size is not None else None
    frames = next(iter(decode_clips(uri, [ClipRequest(tuple(indices), out_size)])))[1]
    return Clip(source_uri=uri, start=start, indices=indices, fps=info.fps, frames=frames, stride=stride)


def _sized(frames: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    return frames if size is None else resize_center_crop(frames, size[0], size[1])


def _frame_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as uint8 (h, w, 3) RGB in display orientation, native or at ``size`` (w, h: scaled to
    cover it, centre-cropped, as `gen1.video.resize_center_crop`).

    FFmpeg's swscale converts from the codec's YUV and scales in one step (area filter down, bilinear up),
    at the output size: on opencv-doc's clips at 64x64 it costs half of a full-size RGB frame resized by
    OpenCV, and the two differ by about one grey level on average.
    """
    rotation = int(round((frame.rotation or 0) / 90.0)) * 90 % 360
    turned = rotation in (90, 270)
    if size is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        w, h = (frame.height, frame.width) if turned else (frame.width, frame.height)  # display size
        new_w, new_h, x0, y0 = cover_size(w, h, *size)
        interpolation = "AREA" if size[0] < w and size[1] < h else "BILINEAR"
        coded_w, coded_h = (new_h, new_w) if turned else (new_w, new_h)
        rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24", interpolation=interpolation).to_ndarray()
    if rotation:
        rgb = np.rot90(rgb, k=rotation // 90)
    if size is not None:
        rgb = rgb[y0 : y0 + size[1], x0 : x0 + size[0]]
    return np.ascontiguousarray(rgb)


class VideoSource:
    """One video at a local path or fsspec URI, open while the ``with`` block runs. PyAV reads remote
    bytes through an fsspec file (range reads); decord gets a temporary local copy, made on first need
    and removed on exit."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri, self.storage_options = uri, dict(storage_options or {})
        self.fs, self.path, self.local = None, None, None  # local: a path decord can open
        self._tmp, self._reader = None, None
        self.format_name = ""  # the container format, known after probe()

    def __enter__(self) -> VideoSource:
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.uri, **self.storage_options)
            if isinstance(self.fs, LocalFileSystem) and not os.path.isfile(self.path):
                raise VideoDecodeError(self.uri, f"no such file ({self.path})")
            size = self.fs.size(self.path)
        except VideoDecodeError:
            raise
        except FileNotFoundError as e:
            raise VideoDecodeError(self.uri, f"no such file ({e})") from e
        except (ValueError, ImportError) as e:  # fsspec: unknown protocol / protocol package missing
            raise VideoDecodeError(self.uri, f"cannot open this URI: {e}") from e
        except Exception as e:
            raise VideoDecodeError(self.uri, f"cannot read: {type(e).__name__}: {e}") from e
        if isinstance(self.fs, LocalFileSystem):
            self.local = self.path
        if not size:
            raise VideoDecodeError(self.uri, "file is empty (0 bytes)")
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def _open_container(self) -> av.container.InputContainer:
        try:
            if self.local is not None:
                return av.open(self.local, mode="r", metadata_errors="ignore")
            f = self.fs.open(self.path, "rb", block_size=REMOTE_BLOCK_SIZE, cache_type="readahead")
            return av.open(f, mode="r", metadata_errors="ignore")
        except Exception as e:
            raise VideoDecodeError(self.uri, f"not a readable video ({type(e).__name__}: {e})") from e

    def _local_path(self) -> str:
        if self.local is None:
            fd, self._tmp = tempfile.mkstemp(prefix="gen1-video-", suffix=os.path.splitext(self.path)[1])
            os.close(fd)
            try:
                self.fs.get_file(self.path, self._tmp)
            except Exception as e:
                raise VideoDecodeError(self.uri, f"cannot fetch: {type(e).__name__}: {e}") from e
            self.local = self._tmp
        return self.local

    def probe(self) -> VideoInfo:
        """Validate with PyAV before decord sees the file; count packets (headers can lie)."""
        try:
            with self._open_container() as container:
                if not container.streams.video:
                    kinds = [s.type for s in container.streams] or ["none"]
                    raise VideoDecodeError(self.uri, f"no video stream (streams: {', '.join(kinds)})")
                stream = container.streams.video[0]
                first = None
                packets = 0
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-stream flush packet
                        continue
                    packets += 1
                    if first is None:
                        first = next(iter(packet.decode()), None)
                if first is None:
                    first = next(iter(stream.decode(None)), None)  # drain frames held back by the decoder
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                self.format_name = container.format.name
                header_frames = stream.frames
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.uri, f"not a readable video ({type(e).__name__}: {e})") from e
        if first is None:
            raise VideoDecodeError(self.uri, f"no decodable video frame ({packets} packets)")
        if header_frames and header_frames != packets:
            logger.debug("%s: header says %d frames, %d packets found", self.uri, header_frames, packets)
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            logger.warning("%s: no frame rate in the container; assuming 25 fps", self.uri)
            fps = 25.0
        rotation = int(round((first.rotation or 0) / 90.0)) * 90 % 360
        w, h = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        return VideoInfo(uri=self.uri, num_frames=packets, fps=fps, width=w, height=h, rotation=rotation)

    # --------------------------------------------------------------------------------------- one pass

    def read_one_pass(self, requests: Sequence[ClipRequest], threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Decode from the first frame to the last one any request needs, yielding each request when its
        last frame arrives (see `decode_clips`)."""
        need: dict[int, list[tuple[int, int]]] = {}  # frame index -> (request, position in it)
        for r, req in enumerate(requests):
            for pos, i in enumerate(req.indices):
                need.setdefault(int(i), []).append((r, pos))
        last, open_clips, filled, decoded = max(need), {}, [0] * len(requests), 0
        try:
            with self._open_container() as container:
                if not container.streams.video:
                    raise VideoDecodeError(self.uri, "no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # frame and slice threads
                stream.codec_context.thread_count = threads
                for i, frame in enumerate(container.decode(stream)):
                    decoded = i + 1
                    if i in need:
                        sized = {}
                        for r, pos in need.pop(i):
                            size = requests[r].size
                            if size not in sized:
                                sized[size] = _frame_rgb(frame, size)
                            if r not in open_clips:
                                open_clips[r] = np.empty((len(requests[r].indices), *sized[size].shape), np.uint8)
                            open_clips[r][pos] = sized[size]
                            filled[r] += 1
                            if filled[r] == len(requests[r].indices):
                                yield r, open_clips.pop(r)
                    if i >= last:
                        break
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.uri, f"decoding frames failed ({type(e).__name__}: {e})") from e
        if need:
            missing = sorted(need)
            raise VideoDecodeError(
                self.uri, f"frames {missing[:5]} out of range: the stream ended after {decoded} frames"
            )

    # ------------------------------------------------------------------------------------------ seeks

    def seekable(self, info: VideoInfo) -> bool:
        """Whether decord can seek in this (probed) video: a format it indexes, with usable timestamps."""
        if self.format_name in _SEQUENTIAL_FORMATS:
            return False
        try:
            reader = self._decord()
        except Exception as e:
            logger.warning("%s: decord cannot open it (%s); decoding in one pass", self.uri,
                           f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            return False
        starts = reader.get_frame_timestamp(list(range(len(reader))))[:, 0]
        # Without pts (decord reports AV_NOPTS_VALUE, about -3.8e17 s) decord seeks to wrong frames.
        if not (np.isfinite(starts).all() and starts.min() > -1e6 and (np.diff(starts) > 0).all()):
            logger.info("%s: no usable frame timestamps; decoding in one pass", self.uri)
            return False
        return True

    def _decord(self):
        if self._reader is None:
            import decord  # imported late: only files that passed the probe get here

            from gen1.libav_logging import apply_to_decord

            apply_to_decord(decord)
            self._reader = decord.VideoReader(self._local_path(), ctx=decord.cpu(0), num_threads=1)
        return self._reader

    def read_seeking(self, indices: list[int], info: VideoInfo) -> np.ndarray:
        """Frames ``indices`` through decord's seeks (decord applies the display rotation itself)."""
        reader = self._decord()
        frames_in_video = min(info.num_frames, len(reader))
        bad = [i for i in indices if not 0 <= i < frames_in_video]
        if bad:
            raise VideoDecodeError(self.uri, f"frame indices {bad[:5]} out of range: the video has {frames_in_video} frames")
        try:
            frames = reader.get_batch(indices).asnumpy()
        except Exception as e:
            raise VideoDecodeError(self.uri, f"decoding frames failed ({type(e).__name__}: {e})") from e
        if frames.shape[1:3] != (info.height, info.width):
            raise VideoDecodeError(
                self.uri,
                f"decoded frames are {frames.shape[2]}x{frames.shape[1]}, the probe found "
                f"{info.width}x{info.height} (rotation {info.rotation})",
            )
        return frames
