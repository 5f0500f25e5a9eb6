"""Video I/O: decode clips from any fsspec URI, sample frames, resize/crop, convert to tensors, encode.

Reading is two-step on purpose. PyAV first *probes* the bytes (container opens, a video stream exists,
the first frame decodes, packets are counted); only a file that passes is handed to decord, which can
crash the interpreter or hang on garbage. decord then does the sparse reads (seek to keyframe, decode a
few frames). Some containers carry no usable timestamps (e.g. AVI with packed B-frames, such as
opencv-doc's ``Megamind.avi``): decord's seeks silently return the wrong frames there, so those files are
read by sequential PyAV decoding instead. Every failure surfaces as one typed error, `VideoDecodeError`,
naming the URI and the reason, with the library exception chained.

Frames are uint8 ``(f, h, w, 3)`` RGB in display orientation (a display-matrix rotation is applied);
model tensors are float32 ``(f, 3, h, w)`` in [-1, 1].
"""

from __future__ import annotations

import fractions
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import av
import cv2
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from gen1.libav_logging import apply_to_pyav

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
apply_to_pyav()  # every process that reads or writes video through PyAV: FFmpeg quiet unless $GEN1_LIBAV_LOG

DEFAULT_SIZE = (448, 256)  # (w, h) for landscape sources; portrait sources get (256, 448)


class VideoDecodeError(RuntimeError):
    """A video could not be read or sampled. ``str(e)`` names the URI and the reason."""

    kind = "video"  # what could not be decoded, as the message says it

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode {self.kind} {uri!r}: {reason}")

    def __reduce__(self):  # keep (uri, reason) across pickling (Ray workers, multiprocessing)
        return (type(self), (self.uri, self.reason))


class ImageDecodeError(VideoDecodeError):
    """An image (reference image, mask, dataset frame) could not be read. ``str(e)`` names the URI and the
    reason; it is a `VideoDecodeError`, so code that handles bad media handles both."""

    kind = "image"


@dataclass
class VideoInfo:
    """What a probe found. ``width``/``height`` are display dimensions (after ``rotation``)."""

    uri: str
    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int = 0  # degrees counter-clockwise from the display matrix, a multiple of 90


def open_uri(uri: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> IO:
    """Open a local path or fsspec URI (``s3://``, ``file://``, ``memory://``, ...) with fsspec's
    ``storage_options`` (credentials, endpoint: a job's); caller closes it.

    Errors are fsspec's own (FileNotFoundError, ValueError for an unknown protocol, ImportError when the
    protocol's package is missing); the decode functions below turn them into `VideoDecodeError`.
    """
    return fsspec.open(uri, mode, **dict(storage_options or {})).open()


# ----------------------------------------------------------------------------------------------- sampling


def sample_indices(
    num_frames: int, n: int, stride: int, start: int = 0, *, uri: str = "<video>"
) -> list[int]:
    """Frame indices ``start, start + stride, ..., start + (n - 1) * stride``.

    Raises `VideoDecodeError` (naming ``uri``) when the video has too few frames for them.
    """
    if n < 1 or stride < 1 or start < 0:
        raise ValueError(
            f"expected n >= 1, stride >= 1, start >= 0; got n={n}, stride={stride}, start={start}"
        )
    last = start + (n - 1) * stride
    if last >= num_frames:
        raise VideoDecodeError(
            uri,
            f"clip too short: {n} frames at stride {stride} from frame {start} need {last + 1} frames, "
            f"the video has {num_frames}",
        )
    return list(range(start, last + 1, stride))


def clip_starts(num_frames: int, n: int, stride: int, max_clips: int | None = None) -> list[int]:
    """Start frames of non-overlapping clips of ``n`` frames ``stride`` apart; [] if none fits.

    Each clip spans ``(n - 1) * stride + 1`` frames. With ``max_clips``, that many starts are chosen
    evenly over the video (first and last included) rather than the first ones.
    """
    if n < 1 or stride < 1:
        raise ValueError(f"expected n >= 1 and stride >= 1; got n={n}, stride={stride}")
    span = (n - 1) * stride + 1
    starts = list(range(0, num_frames - span + 1, span))
    if max_clips is not None:
        if max_clips < 0:
            raise ValueError(f"expected max_clips >= 0 or None; got {max_clips}")
        if len(starts) > max_clips:
            picks = np.linspace(0, len(starts) - 1, max_clips).round().astype(int) if max_clips else []
            starts = [starts[i] for i in picks]
    return starts


# ------------------------------------------------------------------------------------------ size, tensors


def target_size(width: int, height: int, size: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """Output ``(w, h)`` for a ``width x height`` source: ``size`` in the source's orientation.

    ``size`` is read as (long side, short side) laid out landscape; portrait sources (height > width) get
    it transposed, square sources get it as given.
    """
    long_side, short_side = max(size), min(size)
    if height > width:
        return short_side, long_side
    if width > height:
        return long_side, short_side
    return size


def cover_size(w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """How a ``w x h`` image is scaled to cover ``width x height`` (aspect kept) and cropped to its centre:
    ``(new_w, new_h, x0, y0)``, the scaled size and the crop's top-left corner in it."""
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    return new_w, new_h, (new_w - width) // 2, (new_h - height) // 2


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover ``width x height`` (aspect kept), then crop the centre.

    frames: uint8 (f, h, w, 3) -> uint8 (f, height, width, 3).
    """
    _check_frames(frames)
    f, h, w, _ = frames.shape
    if (w, h) == (width, height):
        return frames
    new_w, new_h, x0, y0 = cover_size(w, h, width, height)
    interp = cv2.INTER_AREA if width < w and height < h else cv2.INTER_LINEAR  # scale < 1
    out = np.empty((f, height, width, 3), dtype=np.uint8)
    for i in range(f):
        resized = cv2.resize(frames[i], (new_w, new_h), interpolation=interp)
        out[i] = resized[y0 : y0 + height, x0 : x0 + width]
    return out


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> float32 (f, 3, h, w) in [-1, 1]."""
    import torch  # imported here: decoding (`gen1.decoding`, its child processes) needs no torch

    _check_frames(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float (f, 3, h, w) in [-1, 1] (clamped) -> uint8 (f, h, w, 3); inverse of `frames_to_tensor`."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a tensor of shape (f, 3, h, w); got {tuple(x.shape)}")
    import torch

    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _check_frames(frames: np.ndarray) -> None:
    if (
        not isinstance(frames, np.ndarray)
        or frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[-1] != 3
    ):
        found = f"{type(frames).__name__} {getattr(frames, 'dtype', '')} {getattr(frames, 'shape', '')}"
        raise ValueError(f"expected uint8 frames of shape (f, h, w, 3); got {found}")


# ------------------------------------------------------------------------------------------------- clips


def clip_id(source_uri: str, start: int, num_frames: int, stride: int) -> str:
    """Stable id of a clip: sha1 hex[:16] of (source URI as given, start, frame count, stride)."""
    key = json.dumps([source_uri, int(start), int(num_frames), int(stride)], separators=(",", ":"))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


@dataclass
class Clip:
    """Sampled frames of one source video. frames: uint8 (f, h, w, 3)."""

    source_uri: str
    start: int
    indices: list[int]
    fps: float
    frames: np.ndarray
    stride: int | None = None  # None: derived from ``indices`` (1 for a single frame)

    @property
    def clip_id(self) -> str:
        stride = self.stride
        if stride is None:
            stride = self.indices[1] - self.indices[0] if len(self.indices) > 1 else 1
        return clip_id(self.source_uri, self.start, len(self.indices), stride)



def read_image(uri: str, mode: str = "RGB", storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """An image file at any fsspec URI (read with ``storage_options``) -> uint8 array: ``(h, w, 3)`` for mode
    "RGB", ``(h, w)`` palette ids for "P" (segmentation masks keep their ids). A missing, unreadable or
    non-image file raises `ImageDecodeError` naming ``uri``."""
    from PIL import Image

    try:
        with open_uri(uri, "rb", storage_options) as fh:
            image = Image.open(io.BytesIO(fh.read()))
            image.load()
    except (OSError, ValueError, ImportError) as err:  # FileNotFoundError, PIL's UnidentifiedImageError, ...
        raise ImageDecodeError(uri, f"cannot read image: {type(err).__name__}: {err}") from err
    return np.asarray(image if mode == "P" else image.convert(mode))


# -------------------------------------------------------------------------------------------- encoding


def write_video(frames: np.ndarray, uri: str, fps: float, *, crf: int = 18,
                storage_options: Mapping[str, Any] | None = None) -> None:
    """Encode uint8 (f, h, w, 3) frames to ``uri`` (any fsspec URI, written with ``storage_options``), format
    by suffix.

    ``.mp4``: H.264 (libx264, yuv420p, quality ``crf``); odd sizes are edge-padded to even ones, which
    yuv420p requires. ``.gif``: one adaptive 256-colour palette per frame; every frame is kept (GIF delays
    are whole centiseconds, so the stored rate is approximate).
    """
    _check_frames(frames)
    if len(frames) == 0:
        raise ValueError("expected at least one frame to write; got 0")
    if not fps > 0:
        raise ValueError(f"expected fps > 0; got {fps}")
    suffix = os.path.splitext(uri.split("?", 1)[0])[1].lower()
    rate = fractions.Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    if suffix == ".mp4":
        _encode_mp4(frames, buf, rate, crf)
    elif suffix == ".gif":
        _encode_gif(frames, buf, rate)
    else:
        raise ValueError(f"expected a .mp4 or .gif URI; got {uri!r}")
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    logger.debug("wrote %d frames (%s) to %s", len(frames), suffix, uri)


def _encode_mp4(frames: np.ndarray, buf: io.BytesIO, rate: fractions.Fraction, crf: int) -> None:
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        logger.warning("padding %dx%d frames to even size for yuv420p", w, h)
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _encode_gif(frames: np.ndarray, buf: io.BytesIO, rate: fractions.Fraction) -> None:
    from PIL import Image

    with av.open(buf, mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "pal8"
        for frame in frames:
            image = Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            rgb = np.zeros((256, 3), dtype=np.uint8)
            used = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)[:256]
            rgb[: len(used)] = used
            argb = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray((np.asarray(image), argb), format="pal8")))
        container.mux(stream.encode(None))
