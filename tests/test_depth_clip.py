"""DepthEstimator (DPT, MiDaS-style, per-clip normalisation) and ClipEmbedder (open_clip) on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen1.clip import ClipEmbedder
from gen1.depth import DepthEstimator, dpt_predict


def random_frames(f: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (f, h, w, 3): smooth colour gradients plus noise, different per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    frames = []
    for i in range(f):
        base = np.stack([xx * (i + 1), yy, (xx + yy) / 2], -1) * 200
        frames.append(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255))
    return np.asarray(frames, dtype=np.uint8)


@pytest.fixture(scope="module")
def depth(tiny_models) -> DepthEstimator:
    return DepthEstimator("tiny:depth", device="cpu")


@pytest.fixture(scope="module")
def clip(tiny_models) -> ClipEmbedder:
    return ClipEmbedder("tiny:clip", device="cpu")


# ---- depth ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(256, 448), (448, 256)])
def test_depth_is_per_clip_normalised_at_input_resolution(depth, h, w):
    frames = random_frames(3, h, w)
    out = depth(frames)
    assert out.shape == (3, h, w) and out.dtype == torch.float32
    assert out.min().item() == pytest.approx(-1.0, abs=1e-6)
    assert out.max().item() == pytest.approx(1.0, abs=1e-6)
    raw = depth.predict_raw(frames)
    assert raw.shape == (3, h, w)
    expected = (raw - raw.min()) / (raw.max() - raw.min()) * 2 - 1  # ONE min/max over all frames
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_depth_is_not_normalised_per_frame(depth, monkeypatch):
    raw = torch.stack([torch.linspace(0, 10, 12).reshape(3, 4), torch.linspace(2, 3, 12).reshape(3, 4)])
    monkeypatch.setattr(depth, "predict_raw", lambda frames: raw.clone())
    out = depth(np.zeros((2, 3, 4, 3), dtype=np.uint8))
    assert out[0].min().item() == -1.0 and out[0].max().item() == 1.0
    torch.testing.assert_close(out[1], raw[1] / 5 - 1)  # [2, 3] of the clip's [0, 10] -> [-0.6, -0.4]


def test_constant_depth_normalises_to_zeros(depth, monkeypatch):
    monkeypatch.setattr(depth, "predict_raw", lambda frames: torch.full((2, 3, 4), 7.0))
    assert torch.equal(depth(np.zeros((2, 3, 4, 3), dtype=np.uint8)), torch.zeros(2, 3, 4))


def test_depth_preprocessing_keeps_aspect_ratio_in_multiples_of_32(depth):
    for h, w in [(256, 448), (448, 256), (100, 300)]:
        pixels = depth.preprocess(torch.from_numpy(random_frames(1, h, w)))
        ph, pw = pixels.shape[-2:]
        assert ph % 32 == 0 and pw % 32 == 0
        assert (pw > ph) == (w > h)
        assert abs(pw / ph - w / h) / (w / h) < 0.35  # rounding to 32 on a 64-pixel tiny model is coarse


def test_dpt_predict_equals_the_library_forward_on_square_inputs(depth):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = dpt_predict(depth.model, pixels)
        theirs = depth.model(pixel_values=pixels).predicted_depth
    assert torch.equal(ours, theirs)


def test_depth_batching_does_not_change_results(tiny_models):
    frames = random_frames(5, 64, 96)
    one = DepthEstimator.from_model(*_depth_parts(), device="cpu", batch_size=1).predict_raw(frames)
    many = DepthEstimator("tiny:depth", device="cpu", batch_size=8).predict_raw(frames)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def _depth_parts():
    from gen1.weights import load_depth_model

    return load_depth_model("tiny:depth")


def test_depth_rejects_non_uint8_frames(depth):
    with pytest.raises(ValueError, match=r"uint8 \(f, h, w, 3\)"):
        depth(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"uint8 \(f, h, w, 3\)"):
        depth(np.zeros((32, 32, 3), dtype=np.uint8))


# ---- CLIP ----------------------------------------------------------------------------------------------


def test_image_embeddings_are_unit_norm_and_batch_invariant(clip):
    frames = random_frames(5, 48, 80)
    emb = clip.embed_images(frames)
    assert emb.shape == (5, clip.dim) and clip.dim == 32 and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)
    one_by_one = torch.cat([clip.embed_images(frames[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=1e-4)
    assert (emb[0] - emb[1]).abs().max() > 1e-3  # different frames, different embeddings
    assert torch.equal(clip.embed_images(torch.from_numpy(frames)), emb)  # torch input works the same


def test_text_embeddings_are_unit_norm_and_batch_invariant(clip):
    texts = ["a dog running on a beach", "a red car at night", "", "a watercolor painting of a city"]
    emb = clip.embed_texts(texts)
    assert emb.shape == (4, clip.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    one_by_one = torch.cat([clip.embed_texts([t]) for t in texts])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=1e-4)
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    with pytest.raises(TypeError, match="sequence of strings"):
        clip.embed_texts("a dog")


def test_text_tokens_and_pooled_feed_the_prior(clip):
    texts = ["a dog", "a cat sitting on a red couch"]
    tokens, pooled = clip.text_tokens_and_pooled(texts)
    assert tokens.shape == (2, 77, clip.width) and pooled.shape == (2, clip.dim)
    torch.testing.assert_close(F.normalize(pooled, dim=-1), clip.embed_texts(texts), atol=1e-6, rtol=0)
    # The pooled vector is the projection of the EOT token's final-LN state (open_clip's argmax pooling).
    ids = clip.tokenize(texts)
    eot = tokens[torch.arange(2), ids.argmax(-1)]
    torch.testing.assert_close(eot @ clip.model.text_projection.detach(), pooled, atol=1e-5, rtol=1e-5)
    mask = ids != 0
    assert mask.sum(1).tolist() == [2 + 2, 2 + 7]  # SOT + words + EOT


def test_text_tokens_and_pooled_with_the_tiny_prior(clip):
    from gen1.content import ContentEncoder
    from gen1.prior import Prior

    encoder = ContentEncoder(clip, Prior.load("tiny:prior"), prior_steps=3)
    emb = encoder.from_text("a dog", generator=torch.Generator().manual_seed(0))
    assert emb.shape == (clip.dim,) and torch.isfinite(emb).all()


def test_image_preprocessing_matches_open_clips_own_transform(clip):
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    frames = random_frames(2, 60, 90)
    transform = image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(clip.model)), is_train=False)
    theirs = torch.stack([transform(Image.fromarray(f)) for f in frames])
    ours = clip.preprocess(torch.from_numpy(frames))
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    # PIL and torch resample differently at the pixel level; the crop and normalisation must agree.
    assert (ours - theirs).abs().mean() < 0.05
    cos = F.cosine_similarity(clip.model.encode_image(ours), clip.model.encode_image(theirs))
    assert cos.min() > 0.99


def test_half_precision_path_used_on_cuda_agrees_with_fp32(clip, depth):
    # CUDA runs these models in fp16; CPU supports fp16 too, so the dtype handling is checked here.
    frames = random_frames(3, 64, 96)
    clip16 = ClipEmbedder("tiny:clip", device="cpu", dtype=torch.float16)
    assert clip16.dtype == torch.float16
    emb = clip16.embed_images(frames)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, clip.embed_images(frames), atol=5e-3, rtol=0)
    torch.testing.assert_close(clip16.embed_texts(["a dog"]), clip.embed_texts(["a dog"]), atol=5e-3, rtol=0)
    depth16 = DepthEstimator("tiny:depth", device="cpu", dtype=torch.float16)
    assert depth16.dtype == torch.float16
    torch.testing.assert_close(depth16(frames), depth(frames), atol=0.05, rtol=0)
