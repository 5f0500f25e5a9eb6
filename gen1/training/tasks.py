"""What is trained, on what: the video UNet's task and the prior's, each with its data streams and loss.

A task holds the model being trained and the frozen helpers its inputs need (VAE, depth, CLIP), turns the
next batch into a loss (`loss`), and saves and restores its data position (`data_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen1.config import ModelSpecs
from gen1.schedule import make_train_scheduler
from gen1.train_data import (
    BatchSource,
    ClipBatch,
    ImageFeaturizer,
    ImageFolderSource,
    ImageSet,
    PriorBatch,
    RawImages,
    concat_batches,
)
from gen1.training.config import LATENT_CHANNELS, TrainConfig
from gen1.training.distributed import Runtime
from gen1.training.objective import (
    UNetInputs,
    drop_content,
    frame_window,
    pick_content_frame,
    sample_structure_strength,
    v_prediction_loss,
)
from gen1.training.trainable import Trainable, select_trainable

log = logging.getLogger(__name__)


class Cursor:
    """An endless stream over a `BatchSource`, epoch after epoch, whose position can be saved and restored."""

    def __init__(self, source: BatchSource, name: str):
        self.source = source
        self.name = name
        self.epoch = 0
        self.index = 0
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                fresh = self.index == 0  # a whole epoch ahead: it must yield something
                self._it = self.source.batches(self.epoch, self.index)
            else:
                fresh = False
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                if fresh:
                    raise ValueError(f"{self.name} data yielded no batch in epoch {self.epoch}") from None
                self.epoch, self.index = self.epoch + 1, 0
                continue
            self.index += 1
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


class UNetTask:
    """The video UNet's training: data -> inputs (VAE, structure, content) -> loss; frozen helpers."""

    kind = "unet"

    def __init__(
        self,
        cfg: TrainConfig,
        specs: ModelSpecs,
        runtime: Runtime,
        model_spec: str,
        video: BatchSource,
        images: BatchSource | None = None,
        subject: ImageSet | None = None,
        featurize: ImageFeaturizer | None = None,
    ):
        """``images`` yields `RawImages` that ``featurize`` cuts to each image step's size; without it image
        steps take the frames of ``video``'s clips (at the clips' size)."""
        from gen1.structure import StructureEncoder
        from gen1.unet import load_video_unet
        from gen1.weights import load_vae

        self.cfg, self.specs, self.runtime = cfg, specs, runtime
        device = runtime.device
        self.amp_dtype = _amp_dtype(cfg, device)
        self.model = load_video_unet(model_spec, specs.temporal).to(device=device, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.vae = load_vae(specs.vae, device=str(device), dtype=self.amp_dtype or torch.float32).eval()
        self.vae.requires_grad_(False)
        self.structure = StructureEncoder(None, self.vae)
        self.scheduler = make_train_scheduler()
        self.extra_channels = self.model.in_channels - LATENT_CHANNELS
        self.video = Cursor(video, "video")
        self.images = Cursor(images, "image") if images is not None else None
        self.subject = subject
        if images is not None and featurize is None:
            raise ValueError("image data needs a featurizer (CLIP, depth) to cut its images to each step's size")
        self.featurize = featurize
        # the sizes an image step draws from (the loop draws one per step); none when images come from clips
        self.image_sizes = cfg.image_sizes(specs) if images is not None else ()
        self._check_image_sizes()
        self.trainable = select_trainable(self.model, cfg.trainable)
        temporal_ids = {id(p) for p in self.model.temporal_parameters()}
        # image steps leave the temporal layers out of the graph; DDP must be told they may go unused
        self.find_unused_parameters = cfg.image_batch_prob > 0 and any(
            id(p) in temporal_ids for p in self.trainable.parameters
        )

    def _check_image_sizes(self) -> None:
        """Image sizes the VAE encodes exactly (an error otherwise) and, ideally, on the UNet's grid."""
        if self.images is None:
            if self.cfg.image_buckets is not None:
                log.warning("image_buckets %s are unused: they size image_data's images, and image steps take the "
                            "frames of the clips (no image_data)", self.cfg.as_dict()["image_buckets"])
            return
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        grid = vae_factor * 2 ** self.model.image_unet.num_upsamplers
        bad = [f"{w}x{h}" for w, h in self.image_sizes if w % vae_factor or h % vae_factor]
        if bad:
            raise ValueError(f"image sizes {bad} are not multiples of {vae_factor} (the VAE's downsampling); "
                             "set image_buckets to multiples of it")
        off_grid = [f"{w}x{h}" for w, h in self.image_sizes if w % grid or h % grid]
        if off_grid:
            log.warning("image sizes %s are not multiples of %d (VAE x UNet downsampling): the UNet's up path "
                        "interpolates to their odd feature-map sizes", off_grid, grid)
        log.info("image steps: image_data at %s (one size per step), %s",
                 ", ".join(f"{w}x{h}" for w, h in self.image_sizes),
                 "half of them mirrored" if self.cfg.image_flip else "none mirrored")

    # -- data ---------------------------------------------------------------------------------------------

    def _check(self, batch: ClipBatch, expected_size: tuple[int, int] | None = None) -> None:
        """The data fits the model: CLIP width, and frame size ``expected_size`` (w, h; None: the config's)."""
        d = batch.clip_embedding.shape[-1]
        if d != self.model.cross_attention_dim:
            raise ValueError(
                f"the data's CLIP embeddings are {d}-d; the UNet's cross-attention takes "
                f"{self.model.cross_attention_dim}-d (preprocess with the preset's CLIP model)"
            )
        size = None
        if batch.depth is not None:
            size = tuple(batch.depth.shape[-2:])
        elif batch.frames is not None:
            size = tuple(batch.frames.shape[2:4])
        expected = (self.cfg.height, self.cfg.width) if expected_size is None else expected_size[::-1]
        if size is not None and None not in expected and size != expected:
            raise ValueError(f"the data's frames are {size[1]}x{size[0]}; the config expects {expected[1]}x{expected[0]}")

    @torch.no_grad()
    def encode_latents(self, batch: ClipBatch) -> ClipBatch:
        """Fill in VAE latents (posterior mean, scaled) for a batch that carries only frames."""
        if batch.latents is not None:
            return batch
        if batch.frames is None:
            raise ValueError("a batch without latents needs frames to encode")
        from gen1.video import frames_to_tensor

        b, f = len(batch), batch.num_frames
        frames = batch.frames.reshape(b * f, *batch.frames.shape[2:]).cpu().numpy()
        x = frames_to_tensor(frames).to(self.runtime.device, next(self.vae.parameters()).dtype)
        z = torch.cat([self.vae.encode(chunk).latent_dist.mean for chunk in x.split(16)])
        z = (z.float() * self.vae.config.scaling_factor).unflatten(0, (b, f)).transpose(1, 2)
        return dataclasses.replace(batch, latents=z.cpu())

    def _video_batch(self, gen: torch.Generator) -> ClipBatch:
        batch: ClipBatch = self.video.next()
        self._check(batch)
        if self.cfg.frames is not None and (self.cfg.frames != batch.num_frames or self.cfg.frame_stride != 1):
            batch = batch.take_frames(frame_window(batch.num_frames, self.cfg.frames, self.cfg.frame_stride, len(batch), gen))
        return batch

    def _regular_images(self, n: int, gen: torch.Generator, size: tuple[int, int] | None) -> ClipBatch:
        """``n`` images from the image data cut to ``size`` (width, height), or from the frames of video clips
        (at their own size) when there is none."""
        parts, have = [], 0
        while have < n:
            if self.images is not None:
                raw: RawImages = self.images.next()
                flip = (torch.rand(len(raw), generator=gen) < 0.5).tolist() if self.cfg.image_flip else None
                part = self.featurize(raw.images, raw.ids, size, flip)
                self._check(part, size)
            else:
                part = self._video_batch(gen).as_images()
            part = self.encode_latents(part)
            parts.append(dataclasses.replace(part, frames=None))
            have += len(part)
        pool = concat_batches(parts)
        if len(pool) == n:
            return pool
        return pool.select(torch.randperm(len(pool), generator=gen)[:n].tolist())

    def _image_batch(self, gen: torch.Generator, size: tuple[int, int] | None = None) -> ClipBatch:
        """An image micro-batch; with image data, every image at ``size`` (width, height), the step's draw."""
        if self.images is not None and size is None:
            raise ValueError(f"an image step from image_data needs its size, one of {list(self.image_sizes)}")
        n = self.cfg.images_per_batch(self.cfg.frames or self.specs.frames)
        if self.subject is None:
            return self._regular_images(n, gen, size)
        n_subject = min(n, max(1, round(n * self.cfg.subject_fraction)))
        subject = self.encode_latents(self.subject.sample(n_subject, gen, size))
        parts = [dataclasses.replace(subject, frames=None)]
        if n > n_subject:
            parts.append(self._regular_images(n - n_subject, gen, size))
        return concat_batches(parts)

    def inputs(self, batch: ClipBatch, temporal: bool, gen: torch.Generator) -> UNetInputs:
        """A batch -> UNet inputs: latents, t_s and structure latents, one frame's content (maybe dropped)."""
        batch = self.encode_latents(batch)
        device = self.runtime.device
        b = len(batch)
        content = drop_content(pick_content_frame(batch.clip_embedding, gen), self.cfg.content_dropout, gen)
        ts = sample_structure_strength(b, self.cfg.ts_range, gen)
        structure = None
        if self.cfg.use_structure:
            if batch.depth is None:
                raise ValueError("use_structure is on but the data carries no depth")
            structure = self.structure_latents(batch.depth, ts)
            if structure.shape != batch.latents.shape:
                raise ValueError(
                    f"structure latents {tuple(structure.shape)} do not match the frame latents "
                    f"{tuple(batch.latents.shape)}: depth must be at frame resolution"
                )
        return UNetInputs(
            latents=batch.latents.to(device),
            structure=structure,
            ts=ts.to(device),
            content=content.to(device),
            temporal=temporal,
            extra_channels=self.extra_channels,
        )

    @torch.no_grad()
    def structure_latents(self, depth: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """depth (b, f, H, W), ts (b,) -> structure latents (b, 4, f, H/8, W/8), one VAE pass per t_s value."""
        b, f = depth.shape[:2]
        out: list[torch.Tensor | None] = [None] * b
        for value in sorted(set(ts.tolist())):
            rows = [i for i in range(b) if int(ts[i]) == value]
            z = self.structure.encode(depth[rows].reshape(len(rows) * f, *depth.shape[2:]), value)  # (4, n*f, h, w)
            for j, z_i in enumerate(z.float().unflatten(1, (len(rows), f)).unbind(1)):
                out[rows[j]] = z_i
        return torch.stack(out).to(self.runtime.device)

    # -- steps --------------------------------------------------------------------------------------------

    def micro_batch(self, image_step: bool, gen: torch.Generator, size: tuple[int, int] | None = None) -> UNetInputs:
        """The next micro-batch's inputs; an image step's images at ``size`` (width, height) when it reads
        image data (one of ``image_sizes``, drawn once per step by the loop)."""
        if image_step:
            return self.inputs(self._image_batch(gen, size), temporal=False, gen=gen)
        return self.inputs(self._video_batch(gen), temporal=True, gen=gen)

    def loss(
        self, model: nn.Module, image_step: bool, gen: torch.Generator, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        inputs = self.micro_batch(image_step, gen, size)
        with _autocast(self.runtime.device, self.amp_dtype):
            loss = v_prediction_loss(model, self.scheduler, inputs, gen)
        return loss, {"samples": len(inputs), "frames": len(inputs) * inputs.num_frames}

    def data_state(self) -> dict:
        state = {"video": self.video.state_dict()}
        if self.images is not None:
            state["images"] = self.images.state_dict()
        return state

    def load_data_state(self, state: dict) -> None:
        self.video.load_state_dict(state["video"])
        if self.images is not None and "images" in state:
            self.images.load_state_dict(state["images"])

    def save_model(self, path: Path) -> None:
        self.model.save_pretrained(path)


class PriorTask:
    """The prior's training on (caption, CLIP image embedding) pairs; the CLIP text encoder is frozen."""

    kind = "prior"
    find_unused_parameters = False
    image_sizes: tuple[tuple[int, int], ...] = ()  # no image steps

    def __init__(self, cfg: TrainConfig, specs: ModelSpecs, runtime: Runtime, model_spec: str, pairs: BatchSource):
        from gen1.clip import ClipEmbedder
        from gen1.content import ContentEncoder
        from gen1.prior import Prior

        self.cfg, self.specs, self.runtime = cfg, specs, runtime
        device = runtime.device
        self.prior = Prior.load(model_spec, device=device)
        self.prior.prior.to(dtype=torch.float32)
        self.model = self.prior.prior
        self.text = ContentEncoder(ClipEmbedder(specs.clip, device=str(device), convention=specs.content), None)
        self.pairs = Cursor(pairs, "prior pairs")
        self.amp_dtype = _amp_dtype(cfg, device)
        self.model.requires_grad_(False)
        params = self.prior.trainable_parameters()
        for p in params:
            p.requires_grad_(True)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.trainable = Trainable(parameters=params, names=[names[id(p)] for p in params])

    def fit_clip_stats(self, batches: int = 8) -> None:
        """Set the prior's embedding normalisation from the first ``batches`` batches of the data."""
        embeds = torch.cat([b.image_embeds for b in _take(self.pairs.source.batches(0, 0), batches)])
        self.prior.fit_clip_stats(embeds)
        log.info("prior clip stats fitted on %d embeddings", len(embeds))

    def loss(
        self, model: nn.Module, image_step: bool, gen: torch.Generator, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        batch: PriorBatch = self.pairs.next()
        drop = torch.rand(len(batch), generator=gen) < self.cfg.content_dropout
        texts = ["" if d else t for t, d in zip(batch.texts, drop.tolist(), strict=True)]
        with torch.no_grad():
            pooled, tokens, mask = self.text.text_inputs(texts)
        device = self.runtime.device
        with _autocast(device, self.amp_dtype):
            loss = self.prior.loss(
                pooled.to(device), tokens.to(device), mask.to(device), batch.image_embeds.to(device), generator=gen
            )
        return loss, {"samples": len(batch), "frames": len(batch)}

    def data_state(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def load_data_state(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])

    def save_model(self, path: Path) -> None:
        self.prior.save_pretrained(path)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on GPU when asked, None (float32) otherwise."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_task(
    cfg: TrainConfig,
    specs: ModelSpecs,
    runtime: Runtime,
    model_spec: str,
    data: BatchSource,
) -> UNetTask | PriorTask:
    """The task of ``cfg.task`` with its data: image steps read ``cfg.image_data`` and ``cfg.subject_data``."""
    if cfg.task == "prior":
        return PriorTask(cfg, specs, runtime, model_spec, data)
    images = subject = featurize = None
    if cfg.image_data is not None or cfg.subject_data is not None:
        featurize = image_featurizer(cfg, specs, runtime)
        if cfg.image_data is not None:
            n = cfg.images_per_batch(cfg.frames or specs.frames)
            images = ImageFolderSource(cfg.image_data, n, seed=cfg.seed + runtime.rank)
        if cfg.subject_data is not None:
            subject = ImageSet.from_uri(cfg.subject_data, featurize, flip=cfg.subject_flip)
    return UNetTask(cfg, specs, runtime, model_spec, data, images, subject, featurize)


def image_featurizer(cfg: TrainConfig, specs: ModelSpecs, runtime: Runtime) -> ImageFeaturizer:
    """CLIP + depth on this worker's device for image folders (the image dataset, the subject set)."""
    from gen1.clip import ClipEmbedder
    from gen1.depth import DepthEstimator
    from gen1.structure import StructureEncoder

    clip = ClipEmbedder(specs.clip, device=str(runtime.device), convention=specs.content)
    depth = StructureEncoder(DepthEstimator(specs.depth, device=str(runtime.device)), None).depth
    return ImageFeaturizer(clip, depth if cfg.use_structure else None, cfg.width or specs.width, cfg.height or specs.height)
