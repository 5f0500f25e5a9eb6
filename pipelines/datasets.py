"""Evaluation datasets stored as folders of frames: DAVIS 2017 and LOVEU-TGVE-2023, from any fsspec URI.

DAVIS 2017 (https://davischallenge.org) layout::

    <root>/JPEGImages/480p/<sequence>/00000.jpg ...
    <root>/Annotations/480p/<sequence>/00000.png ...   optional: palette PNGs, 0 = background, k = object k
    <root>/ImageSets/2017/{train,val}.txt               optional: sequence names of each split

LOVEU-TGVE-2023 (76 videos from DAVIS, YouTube and Videvo, 32 or 128 frames each) layout::

    <root>/{DAVIS_480p,youtube_480p,videvo_480p}/480p_frames/<video>/00000.jpg ...
    <root>/<any>.csv   columns "Video name", "Our GT caption", "Style Change Caption",
                       "Object Change Caption", "Background Change Caption", "Multiple Changes Caption";
                       a row holding only a subset folder name (e.g. "DAVIS_480p") starts that subset.

A sequence is listed cheaply (names and URIs only); frames and masks are read on demand, so a job lists
the whole dataset on the driver and reads pixels on workers. Every listing and read takes the job's fsspec
``storage_options`` (credentials, endpoint) as an argument; sequences and clips hold none. `SequenceClip` is
a sequence's clip as the edit pipeline takes it (`pipelines.edit.EditClip`), with its object masks and
prompts.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from gen1.config import ConfigError
from gen1.masks import mask_from_frames
from gen1.prompts import PromptSpec
from gen1.video import clip_id, open_uri, read_image, resize_center_crop, sample_indices, target_size
from pipelines.edit.clips import EditClip

log = logging.getLogger(__name__)

DAVIS_FPS = 24.0  # DAVIS and the TGVE videos carry no frame rate; 24 fps is DAVIS's capture rate
TGVE_SUBSETS = ("DAVIS_480p", "youtube_480p", "videvo_480p")
TGVE_PROMPT_KINDS = ("style", "object", "background", "multiple")
TGVE_COLUMNS = {
    "name": "Video name",
    "caption": "Our GT caption",
    "style": "Style Change Caption",
    "object": "Object Change Caption",
    "background": "Background Change Caption",
    "multiple": "Multiple Changes Caption",
}
DATASET_KINDS = ("davis", "tgve")


class DatasetError(ConfigError):
    """A dataset folder does not have the expected layout; the message says what was expected and found.
    (A `ConfigError`: bad input that ends a command with exit code 1.)"""


@dataclass(frozen=True)
class VideoSequence:
    """One video stored as numbered frames, with optional per-frame object masks and edit prompts."""

    name: str
    dataset: str  # "davis" | "tgve"
    frames_uri: str  # the folder of frames; the clip id's source URI
    frame_uris: tuple[str, ...]
    mask_uris: tuple[str, ...] | None = None  # aligned with frame_uris when present
    fps: float = DAVIS_FPS
    subset: str | None = None  # TGVE: DAVIS_480p | youtube_480p | videvo_480p
    caption: str | None = None  # TGVE: the original caption
    prompts: dict[str, str] = field(default_factory=dict)  # TGVE: style/object/background/multiple

    @property
    def num_frames(self) -> int:
        return len(self.frame_uris)

    @property
    def has_masks(self) -> bool:
        return self.mask_uris is not None


def parse_dataset(spec: str) -> tuple[str, str]:
    """``"davis:URI"`` or ``"tgve:URI"`` -> (kind, URI). The URI may itself hold a protocol (s3://...)."""
    kind, sep, uri = spec.partition(":")
    if not sep or kind not in DATASET_KINDS or not uri:
        raise DatasetError(f"dataset must be KIND:URI with KIND in {DATASET_KINDS}, e.g. davis:s3://b/DAVIS; got {spec!r}")
    return kind, uri


def read_dataset(spec: str, **kwargs) -> list[VideoSequence]:
    """List the sequences of ``"davis:URI"`` (`read_davis`) or ``"tgve:URI"`` (`read_tgve`)."""
    kind, uri = parse_dataset(spec)
    return read_davis(uri, **kwargs) if kind == "davis" else read_tgve(uri, **kwargs)


# --------------------------------------------------------------------------------------------- listing


def _join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path without touching its protocol."""
    return posixpath.join(uri.rstrip("/"), *parts)


def _fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def _list_dirs(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the sub-folders of ``uri``, sorted; [] if it does not exist."""
    fs, path = _fs(uri, storage_options)
    if not fs.isdir(path):
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "directory")


def _list_files(uri: str, suffixes: tuple[str, ...], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """File names in ``uri`` with one of ``suffixes`` (lower case), sorted by name; [] if absent."""
    fs, path = _fs(uri, storage_options)
    if not fs.isdir(path):
        return []
    names = (posixpath.basename(e["name"]) for e in fs.ls(path, detail=True) if e["type"] == "file")
    return sorted(n for n in names if n.lower().endswith(suffixes))


def read_davis(
    uri: str,
    resolution: str = "480p",
    split: str | None = None,
    sequences: Sequence[str] | None = None,
    year: str = "2017",
    limit: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[VideoSequence]:
    """List DAVIS sequences under ``uri`` (any fsspec URI, listed with ``storage_options``).

    split: "train" | "val" | ... read from ``ImageSets/<year>/<split>.txt``; None = every sequence found.
    sequences: keep only these names (in this order). limit: keep the first ``limit``.
    A sequence's masks are attached only if ``Annotations/<resolution>/<sequence>`` has one PNG per frame.
    """
    frames_root = _join(uri, "JPEGImages", resolution)
    names = _list_dirs(frames_root, storage_options)
    if not names:
        raise DatasetError(
            f"no DAVIS sequences in {frames_root!r}: expected {uri}/JPEGImages/{resolution}/<sequence>/00000.jpg"
        )
    if split is not None:
        split_uri = _join(uri, "ImageSets", year, f"{split}.txt")
        try:
            with open_uri(split_uri, "rt", storage_options) as fh:
                wanted = [line.strip() for line in fh if line.strip()]
        except FileNotFoundError as err:
            raise DatasetError(f"DAVIS split {split!r}: {split_uri!r} not found") from err
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise DatasetError(f"DAVIS split {split!r} names sequences without frames in {frames_root}: {missing}")
        names = wanted
    if sequences is not None:
        missing = sorted(set(sequences) - set(names))
        if missing:
            raise DatasetError(f"DAVIS sequences {missing} not found in {frames_root}; found {names}")
        names = list(sequences)
    if limit is not None:
        names = names[:limit]

    out = []
    for name in names:
        frames_uri = _join(frames_root, name)
        frames = _list_files(frames_uri, (".jpg", ".jpeg"), storage_options)
        if not frames:
            raise DatasetError(f"DAVIS sequence {name!r}: no .jpg frames in {frames_uri!r}")
        masks_uri = _join(uri, "Annotations", resolution, name)
        masks = _list_files(masks_uri, (".png",), storage_options)
        mask_uris = None
        if masks:
            if [m.rsplit(".", 1)[0] for m in masks] == [f.rsplit(".", 1)[0] for f in frames]:
                mask_uris = tuple(_join(masks_uri, m) for m in masks)
            else:
                log.info("DAVIS %s: %d masks for %d frames; masked edits unavailable", name, len(masks), len(frames))
        out.append(
            VideoSequence(
                name=name,
                dataset="davis",
                frames_uri=frames_uri,
                frame_uris=tuple(_join(frames_uri, f) for f in frames),
                mask_uris=mask_uris,
            )
        )
    log.info("DAVIS %s: %d sequences (%s)", uri, len(out), resolution)
    return out


def parse_tgve_csv(text: str) -> list[dict]:
    """The TGVE CSV -> one dict per video: name, subset (None if the CSV has no subset rows), caption,
    prompts {style, object, background, multiple}. Blank rows and subset header rows are skipped."""
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    missing = [c for c in TGVE_COLUMNS.values() if c not in fields]
    if missing:
        raise DatasetError(f"TGVE CSV lacks columns {missing}; found {fields}")
    rows, subset = [], None
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        name = row[TGVE_COLUMNS["name"]]
        others = [row[c] for k, c in TGVE_COLUMNS.items() if k != "name"]
        if not name:
            continue
        if name in TGVE_SUBSETS and not any(others):
            subset = name
            continue
        empty = [k for k in ("caption", *TGVE_PROMPT_KINDS) if not row[TGVE_COLUMNS[k]]]
        if empty:
            raise DatasetError(f"TGVE CSV row {name!r}: empty {empty}")
        rows.append(
            {
                "name": name,
                "subset": subset,
                "caption": row[TGVE_COLUMNS["caption"]],
                "prompts": {k: row[TGVE_COLUMNS[k]] for k in TGVE_PROMPT_KINDS},
            }
        )
    return rows


def read_tgve(uri: str, csv_uri: str | None = None, limit: int | None = None, fps: float = DAVIS_FPS,
              storage_options: Mapping[str, Any] | None = None) -> list[VideoSequence]:
    """List LOVEU-TGVE-2023 videos under ``uri`` (listed with ``storage_options``) with their caption and four
    edit prompts.

    csv_uri: the prompts CSV; default: the one ``.csv`` file directly under ``uri``.
    """
    if csv_uri is None:
        found = _list_files(uri, (".csv",), storage_options)
        if len(found) != 1:
            raise DatasetError(f"expected exactly one prompts .csv in {uri!r} (or pass csv_uri), found {found}")
        csv_uri = _join(uri, found[0])
    with open_uri(csv_uri, "rb", storage_options) as fh:
        text = fh.read().decode("utf-8-sig")
    entries = parse_tgve_csv(text)
    if limit is not None:
        entries = entries[:limit]
    available = {s: set(_list_dirs(_join(uri, s, "480p_frames"), storage_options)) for s in TGVE_SUBSETS}
    out = []
    for entry in entries:
        subsets = [entry["subset"]] if entry["subset"] else [s for s in TGVE_SUBSETS if entry["name"] in available[s]]
        if not subsets or entry["name"] not in available.get(subsets[0], ()):
            raise DatasetError(
                f"TGVE video {entry['name']!r} listed in {csv_uri} has no frames under "
                f"{uri}/{{{','.join(TGVE_SUBSETS)}}}/480p_frames/"
            )
        subset = subsets[0]
        frames_uri = _join(uri, subset, "480p_frames", entry["name"])
        frames = _list_files(frames_uri, (".jpg", ".jpeg", ".png"), storage_options)
        if not frames:
            raise DatasetError(f"TGVE video {entry['name']!r}: no frames in {frames_uri!r}")
        out.append(
            VideoSequence(
                name=entry["name"],
                dataset="tgve",
                frames_uri=frames_uri,
                frame_uris=tuple(_join(frames_uri, f) for f in frames),
                fps=fps,
                subset=subset,
                caption=entry["caption"],
                prompts=entry["prompts"],
            )
        )
    log.info("TGVE %s: %d videos", uri, len(out))
    return out


# ------------------------------------------------------------------------------------------------ reading


def choose_indices(num_frames: int, n: int, stride: int, start: int = 0) -> tuple[list[int], int]:
    """``n`` frames ``stride`` apart from ``start``; the stride shrinks (down to 1) to fit short sequences.

    Returns (indices, stride used). Raises `VideoDecodeError` if even stride 1 does not fit.
    """
    for s in range(stride, 0, -1):
        if start + (n - 1) * s < num_frames:
            return sample_indices(num_frames, n, s, start), s
    return sample_indices(num_frames, n, 1, start), 1  # raises, naming the shortfall


def load_sequence_mask(
    seq: VideoSequence,
    indices: Sequence[int],
    size: tuple[int, int] | None = None,
    objects: Sequence[int] | None = None,
    invert: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Object masks of frames ``indices`` (read with ``storage_options``) -> float32 (f, h, w) in {0, 1},
    1 = edit.

    objects: DAVIS object ids to include (None = every object). invert: edit the background instead.
    size: (w, h), resized and cropped exactly like a `SequenceClip`'s frames.
    """
    if seq.mask_uris is None:
        raise DatasetError(f"sequence {seq.name!r} has no per-frame masks (Annotations) for a masked edit")
    masks = []
    for i in indices:
        ids = read_image(seq.mask_uris[i], "P", storage_options)
        if ids.ndim == 3:  # an RGB annotation: any non-black pixel is an object
            ids = (ids.max(axis=-1) > 0).astype(np.uint8)
        on = ids > 0 if objects is None else np.isin(ids, list(objects))
        masks.append(on)
    m = np.stack(masks)
    if invert:
        m = ~m
    if size is not None:
        return mask_from_frames(np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=-1), *size)
    return m.astype(np.float32)


# -------------------------------------------------------------------------------------------- as clips


@dataclass(frozen=True)
class SequenceClip(EditClip):
    """A clip of a `VideoSequence` for the edit pipeline (`pipelines.edit`), with the sequence's object
    masks when ``mask_objects`` is set (() = every object)."""

    sequence: Any = None  # VideoSequence
    mask_objects: tuple[int, ...] | None = None  # None: no mask
    invert_mask: bool = False  # edit the background instead of the objects

    @property
    def masked(self) -> bool:
        return self.mask_objects is not None

    @property
    def mask_key(self) -> str:
        if self.mask_objects is None:
            return ""
        return f"objects={list(self.mask_objects) or 'all'};invert={self.invert_mask}"

    def load_frames(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        frames = np.stack([read_image(self.sequence.frame_uris[i], "RGB", storage_options) for i in self.frame_indices])
        return resize_center_crop(frames, self.width, self.height)

    def middle_frame(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        index = self.frame_indices[len(self.frame_indices) // 2]
        return resize_center_crop(
            read_image(self.sequence.frame_uris[index], "RGB", storage_options)[None], self.width, self.height
        )[0]

    def load_mask(self, storage_options: Mapping[str, Any] | None = None) -> np.ndarray | None:
        if self.mask_objects is None:
            return None
        objects = list(self.mask_objects) or None
        return load_sequence_mask(
            self.sequence, self.frame_indices, (self.width, self.height), objects, self.invert_mask, storage_options
        )

    @classmethod
    def from_sequence(
        cls,
        seq: VideoSequence,
        frames: int,
        size: tuple[int, int],
        stride: int = 1,
        start: int = 0,
        mask_objects: Sequence[int] | None = None,
        invert_mask: bool = False,
        prompts: Sequence[PromptSpec] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> SequenceClip:
        """``frames`` frames of ``seq`` ``stride`` apart (shrunk to fit short sequences), edited at ``size``
        (w, h) for landscape frames (transposed for portrait; the first frame is read, with
        ``storage_options``, for its size). ``prompts`` default to the sequence's own (TGVE), tagged with
        their kind; its caption is kept."""
        indices, used = choose_indices(seq.num_frames, frames, stride, start)
        h, w = read_image(seq.frame_uris[indices[0]], "RGB", storage_options).shape[:2]
        width, height = target_size(w, h, size)
        if prompts is None:
            prompts = [PromptSpec(text=t, tag=k) for k, t in (seq.prompts or {}).items()]
        return cls(
            clip_id=clip_id(seq.frames_uri, start, len(indices), used),
            source_uri=seq.frames_uri,
            start=start,
            stride=used,
            frame_indices=tuple(indices),
            fps=max(seq.fps / used, 1.0),
            width=width,
            height=height,
            caption=seq.caption,
            prompts=tuple(prompts),
            sequence=seq,
            mask_objects=None if mask_objects is None else tuple(mask_objects),
            invert_mask=invert_mask,
        )
