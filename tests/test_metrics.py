"""Edit metrics on constructed inputs, and prompt consistency cross-checked against torchmetrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen1.metrics import (
    depth_fidelity,
    flow_warp_error,
    frame_consistency,
    frame_consistency_all_pairs,
    prompt_consistency,
    warp_back,
)


def trajectory(f: int = 8, d: int = 16, step: float = 0.15) -> np.ndarray:
    """(f, d) embeddings drifting smoothly: frame i is a rotation by i * step in one plane plus a fixed offset."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, d))
    u, v = base[0] / np.linalg.norm(base[0]), base[1]
    v = v - (v @ u) * u
    v /= np.linalg.norm(v)
    return np.stack([math.cos(i * step) * u + math.sin(i * step) * v for i in range(f)])


def test_frame_consistency_identical_frames_is_one():
    emb = np.tile(np.arange(1.0, 9.0), (5, 1)) * np.array([[1], [2], [3], [0.5], [7]])  # same direction
    assert frame_consistency(emb) == pytest.approx(1.0, abs=1e-12)
    assert frame_consistency_all_pairs(torch.tensor(emb)) == pytest.approx(1.0, abs=1e-12)


def test_frame_consistency_value_and_shuffled_is_lower():
    emb = trajectory(f=8, step=0.15)
    # consecutive frames are exactly `step` radians apart
    assert frame_consistency(emb) == pytest.approx(math.cos(0.15), abs=1e-9)
    shuffled = emb[[0, 4, 1, 7, 2, 6, 3, 5]]
    assert frame_consistency(shuffled) < frame_consistency(emb) - 0.1
    # all pairs: mean of cos(|i - j| * step) over i < j; the set of pairs is order-independent
    expected = np.mean([math.cos((j - i) * 0.15) for i in range(8) for j in range(i + 1, 8)])
    assert frame_consistency_all_pairs(emb) == pytest.approx(expected, abs=1e-9)
    assert frame_consistency_all_pairs(shuffled) == pytest.approx(expected, abs=1e-9)
    assert frame_consistency_all_pairs(emb) < frame_consistency(emb)


def test_all_pairs_matches_torchmetrics_pairwise_cosine():
    from torchmetrics.functional import pairwise_cosine_similarity

    emb = torch.randn(6, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sims = pairwise_cosine_similarity(emb, emb)
    iu = torch.triu_indices(6, 6, offset=1)
    assert frame_consistency_all_pairs(emb) == pytest.approx(sims[iu[0], iu[1]].mean().item(), abs=1e-9)
    assert frame_consistency(emb) == pytest.approx(torch.diagonal(sims, offset=1).mean().item(), abs=1e-9)


def test_frame_consistency_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"\(f, d\)"):
        frame_consistency(np.ones(4))
    with pytest.raises(ValueError, match="zero-norm"):
        frame_consistency(np.zeros((3, 4)))


def test_prompt_consistency_value():
    frames = trajectory(f=4, d=8, step=0.3)
    text = frames[0] * 3.0
    assert prompt_consistency(frames, text) == pytest.approx(np.mean([math.cos(i * 0.3) for i in range(4)]))
    assert prompt_consistency(frames, -text) == pytest.approx(-prompt_consistency(frames, text))
    with pytest.raises(ValueError, match="width"):
        prompt_consistency(frames, np.ones(5))


def textured(h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth colour texture (blurred noise) with structure at several scales: uint8 (h, w, 3)."""
    import cv2

    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32), (0, 0), 3)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def test_flow_warp_error_static_clip_is_zero():
    frames = np.repeat(textured()[None], 4, axis=0)
    # Farneback finds sub-pixel noise flow (< 0.25 px) even between identical frames: 0 to 1e-5
    assert flow_warp_error(frames) == pytest.approx(0.0, abs=1e-5)


def test_flow_warp_error_noise_is_large():
    noise = np.random.default_rng(0).integers(0, 256, size=(4, 48, 48, 3), dtype=np.uint8)
    assert flow_warp_error(noise) > 0.02


def test_flow_warp_error_compensates_motion():
    """A texture translating 2 px/frame: warping along the flow removes most of the frame difference."""
    big = textured(96, 96)
    frames = np.stack([big[16 : 16 + 64, 16 + 2 * i : 16 + 2 * i + 64] for i in range(4)])
    raw_mse = np.mean((frames[1:].astype(np.float32) / 255 - frames[:-1].astype(np.float32) / 255) ** 2)
    err = flow_warp_error(frames)
    assert raw_mse > 1e-3
    assert err < 0.25 * raw_mse


def test_warp_back_direction():
    """Content at x in frame t sits at x + 3 in frame t+1 (flow +3): warping t+1 back recovers frame t."""
    t0 = np.zeros((8, 16), np.float32)
    t0[:, 5] = 1.0
    t1 = np.roll(t0, 3, axis=1)
    flow = np.zeros((8, 16, 2), np.float32)
    flow[..., 0] = 3.0
    np.testing.assert_allclose(warp_back(t1, flow)[:, :12], t0[:, :12])


def test_flow_warp_error_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        flow_warp_error(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 frames"):
        flow_warp_error(np.zeros((1, 8, 8, 3), np.uint8))


def test_depth_fidelity():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(4, 16, 16))
    assert depth_fidelity(d, d) == pytest.approx(1.0)
    assert depth_fidelity(d, 0.5 * d + 3) == pytest.approx(1.0)  # affine-invariant (relative depth)
    assert depth_fidelity(d, -d) == pytest.approx(-1.0)
    assert abs(depth_fidelity(d, rng.normal(size=d.shape))) < 0.1
    noisy = d + 0.5 * rng.normal(size=d.shape)  # corr = 1 / sqrt(1 + 0.25)
    assert depth_fidelity(torch.tensor(d), torch.tensor(noisy)) == pytest.approx(
        1 / math.sqrt(1.25), abs=0.03
    )
    assert math.isnan(depth_fidelity(d, np.ones_like(d)))
    with pytest.raises(ValueError, match=r"\(f, h, w\)"):
        depth_fidelity(d, d[:, :8])


# ------------------------------------------------------------- cross-check against torchmetrics' CLIPScore


class _OpenClipAsHF:
    """The HF CLIPModel / CLIPProcessor surface torchmetrics' clip_score calls, over an open_clip model."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = object()  # no text_config: torchmetrics then skips its HF-specific truncation
        size = model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    # --- processor
    def __call__(self, images=None, text=None, **_):
        if images is not None:
            x = torch.stack([torch.as_tensor(i).float() / 255 for i in images])  # (n, 3, h, w)
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            return {"pixel_values": (x - self.mean) / self.std}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # --- model
    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    @torch.no_grad()
    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


def test_prompt_consistency_matches_torchmetrics_clip_score(tiny_models):
    """torchmetrics' clip_score (100 * mean cosine, floored at 0) on the same tiny open_clip model."""
    from torchmetrics.functional.multimodal import clip_score

    from gen1.weights import load_clip_model

    model, tokenizer = load_clip_model("tiny:clip")
    adapter = _OpenClipAsHF(model, tokenizer)
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 48, 48), dtype=np.uint8))
    frame_emb = adapter.get_image_features(adapter(images=list(frames))["pixel_values"])
    checked = 0
    for prompt in (
        "a dog running on a beach",
        "a red car at night",
        "a watercolor painting of a city",
        "a robot in the snow",
        "an astronaut riding a horse",
        "a cat",
    ):
        text_emb = adapter.get_text_features(adapter(text=[prompt])["input_ids"])[0]
        ours = prompt_consistency(frame_emb, text_emb)
        theirs = clip_score(list(frames), [prompt] * len(frames), lambda: (adapter, adapter)).item()
        assert theirs == pytest.approx(max(100 * ours, 0.0), abs=1e-3)
        checked += ours > 0.01  # the floor hides the value for negative cosines; need real comparisons
    assert checked >= 1


# ---- the miniature reproduction's measures (no pretrained model) ---------------------------------------


def test_frame_mse_of_a_static_clip_is_zero_and_of_a_flip_is_hand_computed():
    from gen1.metrics import frame_mse

    static = np.full((3, 4, 4, 3), 100, np.uint8)
    assert frame_mse(static) == 0.0
    flip = np.zeros((2, 4, 4, 3), np.uint8)
    flip[1, :2] = 255  # half the pixels go from 0 to 1
    assert frame_mse(flip) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        frame_mse(static[:1])


def test_gradient_correlation_keeps_edges_and_ignores_colour():
    from gen1.metrics import gradient_correlation, gradient_magnitude

    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :] * 30, (8, 1))
    frames = np.repeat(ramp[None, :, :, None], 3, axis=-1).repeat(2, axis=0)  # (2, 8, 8, 3)
    # a horizontal ramp of 30 grey levels per pixel: |grad| = 30/255 inside, half at the borders
    g = gradient_magnitude(frames)
    assert g.shape == (2, 8, 8) and g[0, 3, 3] == pytest.approx(30 / 255)
    step = np.zeros((2, 8, 8, 3), np.uint8)
    step[:, :, 4:] = 200
    darker = (step // 2).astype(np.uint8)  # same edge, other brightness: correlation 1
    assert gradient_correlation(step, darker) == pytest.approx(1.0)
    moved = np.zeros_like(step)
    moved[:, 4:, :] = 200  # the edge turned by 90 degrees: by symmetry uncorrelated
    assert gradient_correlation(step, moved) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(gradient_correlation(np.zeros_like(step), step))
    with pytest.raises(ValueError):
        gradient_correlation(step, step[:1])


def test_colour_histograms_and_their_distance_are_hand_checkable():
    from gen1.metrics import colour_histogram, histogram_distance

    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[..., 2] = 255
    h = colour_histogram(red, bins=2)
    assert h.shape == (2, 2, 2) and h.sum() == pytest.approx(1.0) and h[1, 0, 0] == 1.0
    assert histogram_distance(h, colour_histogram(red, bins=2)) == 0.0
    assert histogram_distance(h, colour_histogram(blue, bins=2)) == 1.0
    half = np.concatenate([red[:2], blue[:2]])  # half red, half blue
    assert histogram_distance(h, colour_histogram(half, bins=2)) == pytest.approx(0.5)
    video = np.stack([red, blue])  # (f, h, w, 3) works too
    assert colour_histogram(video, bins=2)[0, 0, 1] == pytest.approx(0.5)


def test_psnr_is_hand_computed():
    from gen1.metrics import psnr

    a = np.zeros((1, 3, 4, 4))
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    with pytest.raises(ValueError):
        psnr(a, a[..., :2])
