"""Editing with tiny models: guidance reductions, determinism, batching, masks, structure caching, windows."""

import copy

import numpy as np
import pytest
import torch

from gen1.config import TINY
from gen1.guidance import classifier_free_guidance
from gen1.models import Gen1Models
from gen1.sampling import (
    Content,
    EditSettings,
    decode_latents,
    edit_video,
    encode_frames,
    window_starts,
    window_weights,
)
from gen1.schedule import make_sampler
from gen1.structure import conditioning_input
from tests.fixtures.clips import tiny_square_video

STEPS = 4


@pytest.fixture(scope="module")
def models(tiny_models) -> Gen1Models:
    """Tiny models whose temporal layers and extra conv_in channels are non-zero ("as if trained"),

    so the image and video branches differ and the structure input matters.
    """
    m = Gen1Models.load(TINY, device="cpu")
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.unet.temporal_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        w = m.unet.image_unet.conv_in.weight
        w[:, 4:].copy_(torch.randn(w[:, 4:].shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return tiny_square_video()


@pytest.fixture(scope="module")
def content(models) -> torch.Tensor:
    emb = torch.randn(TINY.clip_dim, generator=torch.Generator().manual_seed(7))
    return emb / emb.norm()


def reference_sample(models, video, content, settings, branch_fn):
    """An independent DDIM loop: ``branch_fn(unet_call) -> prediction`` per step; separate UNet calls."""
    f, h, w, _ = video.shape
    structure = models.structure(video, settings.structure_strength)[None].float()
    ts = torch.tensor([settings.structure_strength])
    sched = make_sampler(settings.sampler, settings.steps)
    gen = torch.Generator().manual_seed(settings.seed)
    z = torch.randn((1, 4, f, h // 8, w // 8), generator=gen) * sched.init_noise_sigma
    null = models.content.null()[None]
    for t in sched.timesteps:
        x = conditioning_input(sched.scale_model_input(z, t), structure, ts)

        def call(emb, on, x=x, t=t):
            return models.unet(x, t.expand(1), emb, video_mask=torch.tensor([on])).float()

        v = branch_fn(lambda which: call(null if which == "uncond" else content[None], 1.0))
        z = sched.step(v, t, z, generator=gen).prev_sample
    return decode_latents(models, z[0])


def as_frames(x: torch.Tensor) -> np.ndarray:
    from gen1.video import tensor_to_frames

    return tensor_to_frames(x)


def test_wt_one_is_plain_cfg_bit_for_bit(models, video, content):
    s = EditSettings(structure_strength=2, guidance=5.0, temporal_guidance=1.0, steps=STEPS, batch_branches=False)
    ours = edit_video(models, video, content, s)
    ref = reference_sample(
        models, video, content, s, lambda call: classifier_free_guidance(call("uncond"), call("cond"), 5.0)
    )
    assert np.array_equal(ours.frames, as_frames(ref))
    assert ours.unet_forwards == 2 * STEPS  # the image branch is skipped at w_t = 1


def test_w_one_wt_one_is_unguided_conditional(models, video, content):
    s = EditSettings(structure_strength=2, guidance=1.0, temporal_guidance=1.0, steps=STEPS, batch_branches=False)
    ours = edit_video(models, video, content, s)
    ref = reference_sample(models, video, content, s, lambda call: call("cond"))
    assert np.array_equal(ours.frames, as_frames(ref))
    assert ours.unet_forwards == STEPS


def test_same_seed_same_output_different_seed_differs(models, video, content):
    s = EditSettings(structure_strength=1, guidance=3.0, temporal_guidance=1.5, steps=STEPS, seed=3)
    a = edit_video(models, video, content, s)
    b = edit_video(models, video, content, s)
    c = edit_video(models, video, content, EditSettings(**{**s.as_dict(), "seed": 4}))
    assert np.array_equal(a.frames, b.frames)
    assert not torch.allclose(a.latents, c.latents)


def test_batched_three_way_equals_separate_calls(models, video, content):
    s = EditSettings(structure_strength=2, guidance=4.0, temporal_guidance=1.7, steps=STEPS)
    batched = edit_video(models, video, content, s)
    separate = edit_video(models, video, content, EditSettings(**{**s.as_dict(), "batch_branches": False}))
    torch.testing.assert_close(batched.latents, separate.latents, atol=1e-4, rtol=1e-4)
    assert batched.unet_forwards == STEPS and separate.unet_forwards == 3 * STEPS


def test_temporal_guidance_changes_the_result(models, video, content):
    base = dict(structure_strength=2, guidance=4.0, steps=STEPS)
    one = edit_video(models, video, content, EditSettings(**base, temporal_guidance=1.0))
    two = edit_video(models, video, content, EditSettings(**base, temporal_guidance=2.0))
    assert (one.latents - two.latents).abs().max() > 1e-3


def test_all_zero_mask_returns_vae_round_trip(models, video, content):
    s = EditSettings(structure_strength=2, guidance=4.0, temporal_guidance=1.2, steps=STEPS)
    mask = np.zeros(video.shape[:3], np.float32)
    out = edit_video(models, video, content, s, mask=mask)
    round_trip = as_frames(decode_latents(models, encode_frames(models, video)))
    assert np.array_equal(out.frames, round_trip)


def test_half_mask_keeps_the_kept_half(models, video, content):
    s = EditSettings(structure_strength=2, guidance=4.0, temporal_guidance=1.2, steps=STEPS)
    mask = np.zeros(video.shape[:3], np.float32)
    mask[:, :, 32:] = 1.0  # edit the right half (a latent-cell boundary: 32 = 4 * 8)
    out = edit_video(models, video, content, s, mask=mask)
    round_trip = as_frames(decode_latents(models, encode_frames(models, video)))
    assert np.array_equal(out.frames[:, :, :32], round_trip[:, :, :32])
    # the edited half is the model's, not the input's
    assert np.abs(out.frames[:, :, 32:].astype(int) - round_trip[:, :, 32:].astype(int)).mean() > 1.0
    # and outside the mask the latents are exactly the input's (no leakage of the edit)
    known = encode_frames(models, video)
    torch.testing.assert_close(out.latents[..., :4], known[..., :4], atol=0, rtol=0)
    assert (out.latents[..., 4:] - known[..., 4:]).abs().mean() > 1e-2


def test_structure_latent_computed_once_per_edit(models, video, content, monkeypatch):
    calls = {"depth": 0, "encode": 0}
    structure = copy.copy(models.structure)
    orig_depth, orig_encode = structure.depth, structure.encode

    def depth(frames):
        calls["depth"] += 1
        return orig_depth(frames)

    def encode(d, ts):
        calls["encode"] += 1
        return orig_encode(d, ts)

    monkeypatch.setattr(structure, "depth", depth)
    monkeypatch.setattr(structure, "encode", encode)
    counted = copy.copy(models)
    counted.structure = structure
    edit_video(counted, video, content, EditSettings(steps=5, temporal_guidance=1.5))
    assert calls == {"depth": 1, "encode": 1}


def test_text_and_image_content(models, video):
    s = EditSettings(steps=2)
    by_text = edit_video(models, video, Content(text="a watercolor painting of a dog"), s)
    by_image = edit_video(models, video, Content(image=video[0]), s)
    assert by_text.content_kind == "text" and by_image.content_kind == "image"
    assert by_text.frames.shape == video.shape
    assert not torch.allclose(by_text.latents, by_image.latents)


def test_dpm_solver_is_deterministic(models, video, content):
    s = EditSettings(steps=3, sampler="dpmpp", temporal_guidance=1.3)
    a, b = edit_video(models, video, content, s), edit_video(models, video, content, s)
    assert np.array_equal(a.frames, b.frames)
    assert np.isfinite(a.latents.numpy()).all()


def test_window_plan():
    assert window_starts(4, 8, 2) == [0]
    assert window_starts(8, 8, 2) == [0]
    assert window_starts(14, 8, 2) == [0, 6]
    assert window_starts(15, 8, 2) == [0, 6, 7]
    starts = window_starts(37, 8, 3)
    covered = set()
    for s in starts:
        covered |= set(range(s, s + 8))
    assert covered == set(range(37)) and starts[-1] == 29
    w = window_weights(8, 2)
    assert torch.all(w > 0) and w[3] == 1 and w[0] < w[1] < w[2]


def test_long_video_in_overlapping_windows(models, video, content):
    long = np.concatenate([video, video[::-1], video], axis=0)  # 12 frames, window 4
    s = EditSettings(steps=2, window_overlap=2)
    out = edit_video(models, long, content, s)
    assert out.frames.shape == long.shape
    assert out.unet_forwards == 2 * len(window_starts(12, TINY.frames, 2))


def test_bad_inputs_raise_clear_errors(models, video, content):
    with pytest.raises(ValueError, match="t_s"):
        EditSettings(structure_strength=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        edit_video(models, video[:, :60], content, EditSettings(steps=1))
    with pytest.raises(ValueError, match="mask must have shape"):
        edit_video(models, video, content, EditSettings(steps=1), mask=np.zeros((1, 64, 64)))
