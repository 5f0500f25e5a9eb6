"""Multi-resolution image steps (paper §3.4): one image size per optimizer step, drawn from the buckets and
their transposes with the generator every worker shares; images scaled to cover it, centre-cropped, mirrored
at random; clips and video steps untouched.

The end-to-end tests use the tiny models and images cut from Debian's opencv-doc clips (real footage) at
mixed aspect ratios, as an image corpus has them.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gen1.config import SD15, TINY, ConfigError
from gen1.train_data import ImageFeaturizer
from gen1.training import CheckpointStore, TrainConfig, draw_image_size, draw_image_step
from gen1.training.config import with_transposes
from gen1.video import resize_center_crop
from tests.test_training import (
    CONFIG_DIR,
    STAGES,
    Killed,
    load_tiny_features,
    shard_rows_from_clips,
    tiny_cfg,
    unet_state,
    write_feature_shards,
)

PAPER = ((320, 320), (384, 320), (448, 256))  # (width, height), §3.4
SD15_SIZES = ((320, 320), (384, 320), (320, 384), (448, 256), (256, 448))
TINY_SIZES = ((64, 64), (80, 64), (64, 80), (96, 48), (48, 96))
CORPUS_SIZES = [(160, 96), (72, 120), (100, 100)]  # (w, h) of the test corpus' images: landscape, portrait, square


# ------------------------------------------------------------------------------------------------ configs


def test_buckets_are_the_papers_with_transposes_and_the_tiny_preset_scales_them_down():
    cfg = TrainConfig()
    assert cfg.image_buckets is None and cfg.image_flip  # None: the preset's buckets
    assert SD15.image_buckets == PAPER
    assert cfg.image_sizes(SD15) == SD15_SIZES == with_transposes(PAPER)
    assert cfg.image_sizes(TINY) == TINY_SIZES
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in TINY_SIZES)  # the tiny VAE's 8 x the tiny UNet's 2
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in SD15_SIZES)  # SD's VAE 8 x its UNet's 8
    for specs in (SD15, TINY):  # image steps keep about the clips' area, as the paper's do
        area = specs.width * specs.height
        assert all(0.85 < w * h / area < 1.3 for w, h in cfg.image_sizes(specs)), specs.name

    own = TrainConfig(image_buckets=[[64, 32], [48, 48]], image_flip=False)
    assert own.image_buckets == ((64, 32), (48, 48)) and own.image_sizes(TINY) == ((64, 32), (32, 64), (48, 48))
    assert TrainConfig.from_dict(yaml.safe_load(own.to_yaml())) == own  # YAML round trip
    assert own.as_params()["image_buckets"] == "64x32,48x48" and TrainConfig().as_params()["image_buckets"] == "None"


@pytest.mark.parametrize("buckets", [[], [[64]], [[64, 0]], [["a", 64]], 5, [[64.5, 64]]])
def test_bad_buckets_say_what_is_wrong(buckets):
    with pytest.raises(ConfigError, match="image_buckets must be a non-empty list of \\[width, height\\]"):
        TrainConfig(image_buckets=buckets)


def test_stage_configs_document_the_image_corpus_and_its_buckets():
    for stage in STAGES:
        text = (CONFIG_DIR / f"{stage}.yaml").read_text()
        data = yaml.safe_load(text)
        assert {"image_data", "image_buckets", "image_flip"} <= set(data), stage
        assert (data["image_data"], data["image_buckets"], data["image_flip"]) == (None, None, True), stage
        assert "320x320, 384x320, 448x256" in text, stage


# --------------------------------------------------------------------------------------------------- draws


def test_one_size_per_step_alike_on_every_worker_and_every_size_drawn():
    workers = [torch.Generator().manual_seed(3) for _ in range(2)]
    first, second = ([draw_image_size(SD15_SIZES, g) for _ in range(500)] for g in workers)
    assert first == second  # two workers, the same seed: the same size every step
    counts = Counter(first)
    assert set(counts) == set(SD15_SIZES) and all(60 <= c <= 140 for c in counts.values()), counts  # ~100 each
    again = [draw_image_size(SD15_SIZES, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert again == [first[0]] * 3  # deterministic given the seed
    with pytest.raises(ValueError, match="at least one size"):
        draw_image_size((), workers[0])


class _MeanColour:
    """A stand-in CLIP: the mean colour of each image, so mirrored images embed alike."""

    def embed_images(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames.astype(np.float32)).mean(dim=(1, 2))


def _red_as_depth(frames: np.ndarray) -> torch.Tensor:
    """A stand-in depth estimator: the red channel in [-1, 1], (f, h, w)."""
    return torch.from_numpy(frames[..., 0].astype(np.float32)) / 127.5 - 1.0


def test_featurizer_scales_to_cover_crops_the_centre_and_mirrors():
    featurize = ImageFeaturizer(_MeanColour(), _red_as_depth, width=64, height=64)
    columns = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (100, 200, 3)).copy()  # 200x100, x
    batch = featurize([columns], ["wide"], size=(100, 100))
    assert batch.frames.shape == (1, 1, 100, 100, 3) and batch.depth.shape == (1, 1, 100, 100)
    assert np.array_equal(batch.frames[0, 0, 0, :, 0].numpy(), np.arange(50, 150))  # no scaling, centre 100 columns
    assert featurize([columns], ["wide"]).frames.shape[2:4] == (64, 64)  # no size: the featurizer's own

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in CORPUS_SIZES]
    for size in TINY_SIZES:
        w, h = size
        plain = featurize(images, ["a", "b", "c"], size)
        mirrored = featurize(images, ["a", "b", "c"], size, flip=[True, False, True])
        expected = np.stack([resize_center_crop(im[None], w, h)[0] for im in images])
        assert np.array_equal(plain.frames[:, 0].numpy(), expected), size  # aspect kept: cover, then centre crop
        assert torch.equal(mirrored.frames[[0, 2]], plain.frames[[0, 2]].flip(-2))  # (.., h, w, 3): w mirrored
        assert torch.equal(mirrored.frames[1], plain.frames[1])
        assert torch.equal(mirrored.depth[[0, 2]], plain.depth[[0, 2]].flip(-1))  # depth of the mirrored image
        assert torch.allclose(mirrored.clip_embedding, plain.clip_embedding)


# ------------------------------------------------------------------------------- tiny models, real images


def write_corpus(folder: Path, uri: str, n: int) -> Path:
    """``n`` frames of a real clip as PNG files at mixed aspect ratios (`CORPUS_SIZES`, in turn)."""
    from PIL import Image

    from gen1.decoding import load_clip

    folder.mkdir(parents=True, exist_ok=True)
    frames = load_clip(uri, n=n, stride=3, size=None).frames
    for i, frame in enumerate(frames):
        w, h = CORPUS_SIZES[i % len(CORPUS_SIZES)]
        Image.fromarray(resize_center_crop(frame[None], w, h)[0]).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_clips, tiny_models) -> str:
    """Feature shards with stored latents for the first clip of every opencv-doc video (64x64, 4 frames)."""
    return write_feature_shards(str(tmp_path_factory.mktemp("pre") / "latents"),
                                shard_rows_from_clips(real_clips, load_tiny_features()), parts=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_clips) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("corpus") / "images", real_clips[0], 9))


def test_an_image_step_at_every_size_runs_through_the_tiny_unet(shards, corpus, real_clips, tmp_path):
    from gen1.training import Runtime, build_task
    from pipelines.train import local_source

    subject = write_corpus(tmp_path / "subject", real_clips[-1], 4)
    cfg = tiny_cfg(image_data=corpus, subject_data=str(subject), image_batch_size=4, image_batch_prob=0.5,
                   use_structure=True, ts_range=(0, 7))
    task = build_task(cfg, TINY, Runtime(), TINY.unet, local_source(cfg, shards))
    assert task.image_sizes == TINY_SIZES
    g = torch.Generator().manual_seed(0)
    for w, h in TINY_SIZES:
        batch = task._image_batch(g, (w, h))  # 2 subject + 2 corpus images, all cut to the step's size
        assert len(batch) == 4 and batch.num_frames == 1 and sum("subject" in c for c in batch.clip_id) == 2
        assert batch.latents.shape == (4, 4, 1, h // 8, w // 8) and batch.depth.shape == (4, 1, h, w)
        inputs = task.micro_batch(image_step=True, gen=g, size=(w, h))
        assert inputs.latents.shape == inputs.structure.shape == (4, 4, 1, h // 8, w // 8) and not inputs.temporal
        loss, info = task.loss(task.model, image_step=True, gen=g, size=(w, h))
        loss.backward()
        assert math.isfinite(loss.item()) and info == {"samples": 4, "frames": 4}, (w, h)
    video = task.micro_batch(image_step=False, gen=g)
    assert video.latents.shape[-2:] == (8, 8) and video.temporal  # clips keep their 64x64
    with pytest.raises(ValueError, match="needs its size"):
        task.micro_batch(image_step=True, gen=g)


def record_steps(monkeypatch) -> list:
    """Every featurizer call (size, flips) and, after each optimizer step, ("step", metrics), in order."""
    log: list = []
    real = ImageFeaturizer.__call__

    def recording(self, images, ids, size=None, flip=None):
        log.append((size, list(flip) if flip is not None else None))
        return real(self, images, ids, size, flip)

    monkeypatch.setattr(ImageFeaturizer, "__call__", recording)
    return log


def by_step(log: list) -> list[tuple[dict, list]]:
    """The log cut at step ends: (that step's metrics, the featurizer calls made in it)."""
    steps, calls = [], []
    for entry in log:
        if entry[0] == "step":
            steps.append((entry[1], calls))
            calls = []
        else:
            calls.append(entry)
    return steps


def test_each_step_cuts_every_micro_batch_to_its_drawn_size(shards, corpus, tmp_path, monkeypatch):
    from pipelines.train import train_local

    log = record_steps(monkeypatch)
    cfg = tiny_cfg(image_data=corpus, image_batch_size=4, image_batch_prob=0.75, grad_accum=2, max_steps=12,
                   checkpoint_every=12, seed=1)
    train_local(cfg, TINY, shards, str(tmp_path / "run"), callbacks=[lambda step, m: log.append(("step", m))])
    steps = by_step(log)
    kind = torch.Generator().manual_seed(cfg.seed)  # the loop's shared generator, replayed
    drawn = []
    for _ in range(cfg.max_steps):
        image = draw_image_step(cfg.image_batch_prob, kind)
        drawn.append(draw_image_size(TINY_SIZES, kind) if image else None)
    seen = [(int(m["image_width"]), int(m["image_height"])) if m["image_step"] else None for m, _ in steps]
    assert seen == drawn
    assert set(drawn) - {None} == set(TINY_SIZES) and None in drawn  # every size and video steps (seed 1)
    for size, (_, calls) in zip(drawn, steps, strict=True):
        assert [c[0] for c in calls] == ([size] * cfg.grad_accum if size else [])  # each micro-batch, one size
    flips = [f for _, calls in steps for _, fl in calls for f in fl]
    assert len(flips) == 4 * cfg.grad_accum * sum(s is not None for s in drawn)
    assert 0.35 <= sum(flips) / len(flips) <= 0.65, flips  # each image mirrored with probability 1/2

    unflipped = record_steps(monkeypatch)
    train_local(cfg.replace(image_flip=False, max_steps=2, checkpoint_every=2), TINY, shards, str(tmp_path / "nf"))
    assert unflipped and all(fl is None for _, fl in unflipped)


def test_kill_and_resume_continues_the_size_draws_exactly(shards, corpus, tmp_path):
    from pipelines.train import train_local

    cfg = tiny_cfg(image_data=corpus, image_batch_size=3, image_batch_prob=0.75, ts_range=(0, 7),
                   content_dropout=0.5, grad_accum=2, frames=3, max_steps=4, checkpoint_every=2, seed=11)

    def sizes(into: list):
        return lambda step, m: into.append((m.get("image_width"), m.get("image_height")))

    straight_sizes: list = []
    straight = train_local(cfg, TINY, shards, str(tmp_path / "straight"), callbacks=[sizes(straight_sizes)])

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed()

    with pytest.raises(Killed):
        train_local(cfg, TINY, shards, str(tmp_path / "killed"), callbacks=[kill_at_3])
    assert CheckpointStore(str(tmp_path / "killed")).latest() == "step-00000002"
    resumed_sizes: list = []
    resumed = train_local(cfg, TINY, shards, str(tmp_path / "killed"), resume=True, callbacks=[sizes(resumed_sizes)])
    assert resumed_sizes == straight_sizes[2:]
    assert straight_sizes[1] == (None, None) and len(set(resumed_sizes) - {(None, None)}) == 2  # seed 11: a video
    # step before the checkpoint, image steps of two sizes after it
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)
    a, b = unet_state(tmp_path / "straight" / "final"), unet_state(tmp_path / "killed" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
