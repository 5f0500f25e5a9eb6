"""Training batches: decoded feature-shard rows -> tensors, image datasets, subject sets, prior pairs.

This module knows tensors, images and files, not the shard schema: `pipelines.train` reads the Parquet
feature shards (locally with pyarrow, or with Ray Data on a cluster), decodes rows with
`pipelines.schema`'s decoders, and hands the decoded rows to `collate_clips`. A decoded clip row is a
mapping with

- ``clip_id``: str
- ``clip_embedding``: float (f, d), one CLIP image embedding per frame
- ``depth``: float (f, H, W) in [-1, 1] (normalised per clip), at frame resolution
- ``latents`` (optional): float (4, f, H/8, W/8), scaled VAE latents of the frames (the shard layout, `pipelines.schema.row_latents`)
- ``frames`` (optional): uint8 (f, H, W, 3), the resized frames (to compute latents when none are stored)

A *batch source* yields the batches of one epoch in a fixed order given ``(epoch, skip)``, so a resumed
run continues exactly where the interrupted one stopped (`RowSource`, `ImageFolderSource`, and the Ray
Data source in `pipelines.train`). An image source yields decoded images (`RawImages`), which the trainer
cuts to each image step's size and featurizes (`ImageFeaturizer`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, Protocol

import fsspec
import numpy as np
import torch

from gen1.video import read_image, resize_center_crop

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class ClipBatch:
    """A batch of clips (``f`` frames each) or of images (``f == 1``), before VAE encoding.

    clip_embedding: (b, f, d); depth: (b, f, H, W) or None; latents: (b, 4, f, H/8, W/8) or None;
    frames: uint8 (b, f, H, W, 3) or None. At least one of latents and frames is present.
    """

    clip_id: list[str]
    clip_embedding: torch.Tensor
    depth: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, f = self.clip_embedding.shape[:2]
        if len(self.clip_id) != b:
            raise ValueError(f"{len(self.clip_id)} clip ids for a batch of {b}")
        if self.depth is not None and tuple(self.depth.shape[:2]) != (b, f):
            raise ValueError(f"depth shape {tuple(self.depth.shape)} does not start with (b, f) = {(b, f)}")
        if self.latents is not None and (self.latents.shape[0] != b or self.latents.shape[2] != f):
            raise ValueError(f"latents shape {tuple(self.latents.shape)} is not (b={b}, 4, f={f}, h, w)")
        if self.frames is not None and tuple(self.frames.shape[:2]) != (b, f):
            raise ValueError(f"frames shape {tuple(self.frames.shape)} does not start with (b, f) = {(b, f)}")

    def __len__(self) -> int:
        return self.clip_embedding.shape[0]

    @property
    def num_frames(self) -> int:
        return self.clip_embedding.shape[1]

    def to(self, device: torch.device | str) -> ClipBatch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return replace(
            self,
            clip_embedding=move(self.clip_embedding),
            depth=move(self.depth),
            latents=move(self.latents),
            frames=move(self.frames),
        )

    def take_frames(self, index: torch.Tensor) -> ClipBatch:
        """Per-example frame selection: index (b, k) long -> a batch of k frames each."""
        b, k = index.shape
        rows = torch.arange(b)[:, None].expand(b, k)
        return replace(
            self,
            clip_embedding=self.clip_embedding[rows, index],
            depth=None if self.depth is None else self.depth[rows, index],
            latents=None if self.latents is None else self.latents.permute(0, 2, 1, 3, 4)[rows, index].permute(0, 2, 1, 3, 4),
            frames=None if self.frames is None else self.frames[rows, index],
        )

    def as_images(self) -> ClipBatch:
        """Every frame as its own one-frame example: (b, f, ...) -> (b * f, 1, ...)."""
        b, f = len(self), self.num_frames

        def flat(x, frame_dim=1):
            if x is None:
                return None
            x = x.movedim(frame_dim, 1)
            x = x.reshape(b * f, 1, *x.shape[2:])
            return x.movedim(1, frame_dim)

        return ClipBatch(
            clip_id=[f"{cid}#{i}" for cid in self.clip_id for i in range(f)],
            clip_embedding=flat(self.clip_embedding),
            depth=flat(self.depth),
            latents=flat(self.latents, frame_dim=2),
            frames=flat(self.frames),
        )

    def select(self, rows: Sequence[int] | slice) -> ClipBatch:
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(list(rows))
        pick = [self.clip_id[i] for i in idx.tolist()]

        def sel(x):
            return None if x is None else x[idx]

        return ClipBatch(pick, sel(self.clip_embedding), sel(self.depth), sel(self.latents), sel(self.frames))


def concat_batches(batches: Sequence[ClipBatch]) -> ClipBatch:
    """Stack batches with the same frame count; a field is kept only where every batch has it."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    frames = {b.num_frames for b in batches}
    if len(frames) != 1:
        raise ValueError(f"cannot concatenate batches of different frame counts {sorted(frames)}")

    def cat(name):
        parts = [getattr(b, name) for b in batches]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return ClipBatch(
        clip_id=[c for b in batches for c in b.clip_id],
        clip_embedding=cat("clip_embedding"),
        depth=cat("depth"),
        latents=cat("latents"),
        frames=cat("frames"),
    )


def collate_clips(rows: Sequence[Mapping[str, Any]]) -> ClipBatch:
    """Decoded shard rows (see the module docstring) -> a `ClipBatch`; every row must have the same shapes."""
    if not rows:
        raise ValueError("collate_clips needs at least one row")

    def stack(key: str, dtype: torch.dtype) -> torch.Tensor | None:
        present = [r.get(key) is not None for r in rows]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"column {key!r} is present in some rows of the batch and missing in others")
        arrays = [np.asarray(r[key]) for r in rows]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"rows of one batch must share the {key!r} shape, found {sorted(shapes)}")
        return torch.from_numpy(np.stack(arrays)).to(dtype)

    emb = stack("clip_embedding", torch.float32)
    if emb is None or emb.ndim != 3:
        raise ValueError("each row needs 'clip_embedding' of shape (f, d)")
    latents = stack("latents", torch.float32)  # the shards' (c, f, h, w) per row -> (b, c, f, h, w)
    if latents is not None and (latents.ndim != 5 or latents.shape[2] != emb.shape[1]):
        raise ValueError(f"latents must be (c, f={emb.shape[1]}, h, w) per row, found {tuple(latents.shape[1:])}")
    frames = stack("frames", torch.uint8)
    if latents is None and frames is None:
        raise ValueError(
            "shard rows carry neither 'latents' nor 'frames'; preprocess with latents or frames stored "
            "so training can encode them"
        )
    return ClipBatch(
        clip_id=[str(r.get("clip_id", i)) for i, r in enumerate(rows)],
        clip_embedding=emb,
        depth=stack("depth", torch.float32),
        latents=latents,
        frames=frames,
    )


# ------------------------------------------------------------------------------------------ batch sources


class BatchSource(Protocol):
    """Yields one epoch's batches in a fixed order for ``(epoch, skip)``; ``skip`` batches are left out."""

    def batches(self, epoch: int, skip: int) -> Iterator[Any]: ...


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The row order of one epoch: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class RowSource:
    """Batches of rows ``get_rows(indices)`` in a per-epoch shuffled order, collated by ``collate``.

    ``get_rows`` returns decoded rows for a list of row indices (e.g. a pyarrow table's ``take``).
    """

    def __init__(
        self,
        num_rows: int,
        get_rows: Callable[[list[int]], Sequence[Mapping[str, Any]]],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        collate: Callable[[Sequence[Mapping[str, Any]]], Any] = collate_clips,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_rows < (batch_size if drop_last else 1):
            raise ValueError(f"{num_rows} rows cannot fill one batch of {batch_size}")
        self.num_rows = num_rows
        self.get_rows = get_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate = collate

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        order = epoch_order(self.num_rows, self.seed, epoch, self.shuffle)
        for i in range(skip, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.collate(self.get_rows([int(j) for j in idx]))


# ----------------------------------------------------------------------------------------- image datasets


def _is_parquet(uri: str) -> bool:
    return uri.rstrip("/").endswith(".parquet")


def list_images(uri: str) -> list[str]:
    """Image files under a folder URI (any fsspec URI), sorted; error if there are none."""
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder {uri!r} does not exist or is not a folder")
    files = sorted(p for p in fs.find(root) if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {uri!r}")
    return [fs.unstrip_protocol(p) for p in files]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (h, w, 3) RGB."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def read_image_parquet(uri: str, column: str = "image") -> list[bytes]:
    """Encoded images from a Parquet file or folder: a binary column or a ``{bytes, path}`` struct."""
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(uri)
    table = pq.read_table(path, filesystem=fs, columns=[column])
    values = table.column(column).to_pylist()
    out = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("bytes")
        if not isinstance(v, bytes | bytearray):
            raise ValueError(f"{uri}: column {column!r} must hold encoded image bytes, found {type(v).__name__}")
        out.append(bytes(v))
    if not out:
        raise ValueError(f"{uri}: no images in column {column!r}")
    return out


class ImageFeaturizer:
    """Images -> a one-frame `ClipBatch`: CLIP image embedding, per-image depth, frames cut to a size.

    ``clip`` is a `gen1.clip.ClipEmbedder`, ``depth`` a `gen1.depth.DepthEstimator` (or None when the
    model does not use structure); latents are left to the trainer's VAE. ``width`` x ``height`` is the size
    when a call names none.
    """

    def __init__(self, clip, depth, width: int, height: int):
        self.clip = clip
        self.depth = depth
        self.width = width
        self.height = height

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[np.ndarray],
        ids: Sequence[str],
        size: tuple[int, int] | None = None,
        flip: Sequence[bool] | None = None,
    ) -> ClipBatch:
        """Each image scaled to cover ``size`` (width, height; aspect kept) and centre-cropped to it, mirrored
        where ``flip`` says, then embedded and its depth estimated: a flipped image is an image of its own."""
        width, height = size or (self.width, self.height)
        frames = np.stack([resize_center_crop(np.asarray(im)[None], width, height)[0] for im in images])
        if flip is not None:
            mirror = np.asarray(flip, dtype=bool)
            frames[mirror] = frames[mirror][:, :, ::-1]
        emb = self.clip.embed_images(frames).float().cpu()  # (n, d)
        depth = None
        if self.depth is not None:  # one image at a time: depth is normalised per clip, here per image
            depth = torch.stack([self.depth(frames[i : i + 1]).float().cpu()[0] for i in range(len(frames))])
            depth = depth[:, None]
        return ClipBatch(
            clip_id=list(ids),
            clip_embedding=emb[:, None],
            depth=depth,
            frames=torch.from_numpy(frames)[:, None],
        )


@dataclass
class RawImages:
    """Decoded images at their own sizes, before they are cut to a training size: uint8 (h_i, w_i, 3) each."""

    ids: list[str]
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


class ImageFolderSource:
    """Batches of `RawImages` from a folder of images or a Parquet file of encoded images.

    The batches are decoded, not featurized: the trainer cuts each step's images to that step's size.
    """

    def __init__(self, uri: str, batch_size: int, seed: int = 0):
        self.uri = uri
        self.batch_size = batch_size
        self.seed = seed
        if _is_parquet(uri):
            self._items: list[Any] = read_image_parquet(uri)
            self._read = decode_image
        else:
            self._items = list_images(uri)
            self._read = read_image
        if len(self._items) < batch_size:
            raise ValueError(f"{uri}: {len(self._items)} images cannot fill one image batch of {batch_size}")

    def __len__(self) -> int:
        return len(self._items) // self.batch_size

    def batches(self, epoch: int, skip: int = 0) -> Iterator[RawImages]:
        order = epoch_order(len(self._items), self.seed, epoch)
        for i in range(skip, len(self)):
            idx = [int(j) for j in order[i * self.batch_size : (i + 1) * self.batch_size]]
            images = [self._read(self._items[j]) for j in idx]
            ids = [self._items[j] if isinstance(self._items[j], str) else f"{self.uri}#{j}" for j in idx]
            yield RawImages(ids=ids, images=images)


class ImageSet:
    """A small in-memory image set (e.g. 15-30 images of a customization subject), featurized once per size."""

    def __init__(self, images: RawImages, featurize: ImageFeaturizer, flip: bool = True):
        if not len(images):
            raise ValueError("an ImageSet needs at least one image")
        self.images = images
        self.featurize = featurize
        self.flip = flip
        self._featurized: dict[tuple[int, int] | None, ClipBatch] = {}

    @classmethod
    def from_uri(cls, uri: str, featurize: ImageFeaturizer, flip: bool = True) -> ImageSet:
        if _is_parquet(uri):
            images = [decode_image(b) for b in read_image_parquet(uri)]
            ids = [f"{uri}#{i}" for i in range(len(images))]
        else:
            ids = list_images(uri)
            images = [read_image(u) for u in ids]
        log.info("subject set %s: %d images", uri, len(images))
        return cls(RawImages(ids=ids, images=images), featurize, flip=flip)

    def __len__(self) -> int:
        return len(self.images)

    def featurized(self, size: tuple[int, int] | None = None) -> ClipBatch:
        """Every image at ``size`` (width, height; None: the featurizer's), computed once per size."""
        if size not in self._featurized:
            self._featurized[size] = self.featurize(self.images.images, self.images.ids, size)
        return self._featurized[size]

    def sample(self, n: int, generator: torch.Generator, size: tuple[int, int] | None = None) -> ClipBatch:
        """``n`` examples at ``size`` drawn with replacement; with ``flip``, each mirrored with probability 1/2.

        A mirrored example keeps its CLIP embedding (the subject is the same) and mirrors depth and pixels.
        """
        batch = self.featurized(size)
        idx = torch.randint(len(batch), (n,), generator=generator)
        out = batch.select(idx.tolist())
        if self.flip:
            mirror = torch.rand(n, generator=generator) < 0.5
            if mirror.any():

                def flip(x, dim):
                    if x is None:
                        return None
                    x = x.clone()
                    x[mirror] = x[mirror].flip(dim)
                    return x

                out = replace(out, depth=flip(out.depth, -1), frames=flip(out.frames, -2), latents=flip(out.latents, -1))
        return out


# ------------------------------------------------------------------------------------------ prior pairs


@dataclass
class PriorBatch:
    """(CLIP text, CLIP image) training pairs for the prior: texts and image embeddings (b, d)."""

    texts: list[str]
    image_embeds: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)


def collate_prior_rows(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> PriorBatch:
    """Rows with ``caption`` and ``clip_embedding`` ((d,) or per frame (f, d)) -> a `PriorBatch`.

    For per-frame embeddings one frame is chosen per row, fixed by (seed, clip id), so a clip's caption is
    paired with an actual frame embedding rather than an average no image has.
    """
    texts, embeds = [], []
    for r in rows:
        caption = r.get("caption")
        if not caption:
            raise ValueError(f"row {r.get('clip_id')!r} has no caption; prior training needs (caption, image) pairs")
        emb = np.asarray(r["clip_embedding"], dtype=np.float32)
        if emb.ndim == 2:
            key = int(hashlib.sha1(f"{seed}:{r.get('clip_id')}".encode()).hexdigest()[:8], 16)
            emb = emb[np.random.default_rng(key).integers(len(emb))]
        texts.append(str(caption))
        embeds.append(emb)
    return PriorBatch(texts=texts, image_embeds=torch.from_numpy(np.stack(embeds)))


def read_captioned_images(uri: str, clip) -> list[dict]:
    """A folder of images with same-name ``.txt`` captions -> rows ``{clip_id, caption, clip_embedding}``."""
    rows = []
    for image_uri in list_images(uri):
        stem = image_uri.rsplit(".", 1)[0]
        try:
            with fsspec.open(stem + ".txt", "r") as fh:
                caption = fh.read().strip()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"image {image_uri!r} has no caption file {stem + '.txt'!r}") from err
        emb = clip.embed_images(read_image(image_uri)[None]).float().cpu()[0].numpy()
        rows.append({"clip_id": image_uri, "caption": caption, "clip_embedding": emb})
    return rows
