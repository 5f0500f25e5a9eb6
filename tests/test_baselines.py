"""The baselines of `gen1.baselines` on tiny models: the per-frame baseline is the image model alone (its
output does not depend on the temporal weights, unlike eq. 8 at w_t = 0), SDEdit and the ~s ablation feed
empty structure channels and differ only in the temporal layers."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from gen1.baselines import SDEditSettings, no_structure_video, per_frame_video, sdedit_video, start_index
from gen1.config import TINY
from gen1.guidance import classifier_free_guidance
from gen1.models import Gen1Models
from gen1.sampling import EditSettings, decode_latents, edit_video, encode_frames
from gen1.schedule import make_sampler
from gen1.structure import conditioning_input
from gen1.video import tensor_to_frames
from tests.fixtures.clips import tiny_square_video

STEPS = 3


def _with_temporal(models: Gen1Models, fill) -> Gen1Models:
    """A copy of ``models`` whose UNet's temporal parameters are set by ``fill(p)`` (in place)."""
    unet = copy.deepcopy(models.unet)
    with torch.no_grad():
        for p in unet.temporal_parameters():
            fill(p)
    return dataclasses.replace(models, unet=unet)


@pytest.fixture(scope="module")
def models(tiny_models) -> Gen1Models:
    """Tiny models whose extra conv_in channels (structure) are non-zero, so structure matters."""
    m = Gen1Models.load(TINY, device="cpu")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        w = m.unet.image_unet.conv_in.weight
        w[:, 4:].copy_(torch.randn(w[:, 4:].shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def random_temporal(models) -> Gen1Models:
    g = torch.Generator().manual_seed(5)
    return _with_temporal(models, lambda p: p.copy_(torch.randn(p.shape, generator=g) * 0.1))


@pytest.fixture(scope="module")
def zero_temporal(models) -> Gen1Models:
    return _with_temporal(models, lambda p: p.zero_())


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return tiny_square_video()


@pytest.fixture(scope="module")
def content() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(TINY.clip_dim, generator=torch.Generator().manual_seed(3)), dim=0)


def _record_unet(models: Gen1Models, monkeypatch) -> list[tuple[torch.Tensor, bool]]:
    """Every UNet call's input and ``temporal`` flag, recorded; the calls still run."""
    calls: list[tuple[torch.Tensor, bool]] = []
    forward = models.unet.forward

    def record(z, timestep, content, video_mask=None, temporal=True):
        calls.append((z.detach().clone(), temporal))
        return forward(z, timestep, content, video_mask=video_mask, temporal=temporal)

    monkeypatch.setattr(models.unet, "forward", record)
    return calls


# -------------------------------------------------------------------------------------------- per frame


def test_per_frame_baseline_does_not_depend_on_the_temporal_weights(random_temporal, zero_temporal, video, content):
    settings = EditSettings(structure_strength=2, guidance=5.0, steps=STEPS)
    a = per_frame_video(random_temporal, video, content, settings)
    b = per_frame_video(zero_temporal, video, content, settings)
    assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert a.stats["method"] == "per_frame" and a.unet_forwards == STEPS  # two branches, one batched call
    long = np.concatenate([video, video[::-1], video[:2]])  # 10 frames: windows of 4, as edit_video's
    a = per_frame_video(random_temporal, long, content, settings)
    b = per_frame_video(zero_temporal, long, content, settings)
    assert a.frames.shape == long.shape and np.array_equal(a.frames, b.frames)


def test_eq8_at_wt_zero_does_depend_on_the_temporal_weights(random_temporal, zero_temporal, video, content):
    """So the test above could fail: eq. 8 at w_t = 0 takes its content term from the video model."""
    settings = EditSettings(structure_strength=2, guidance=5.0, temporal_guidance=0.0, steps=STEPS)
    a = edit_video(random_temporal, video, content, settings)
    b = edit_video(zero_temporal, video, content, settings)
    assert (a.latents - b.latents).abs().max() > 1e-3


def test_per_frame_baseline_is_cfg_of_the_image_model_with_structure(random_temporal, video, content, monkeypatch):
    m = random_temporal
    s = EditSettings(structure_strength=2, guidance=5.0, steps=STEPS, batch_branches=False)
    # an independent loop: the image model (temporal=False) per branch, structure at t_s
    f, h, w, _ = video.shape
    structure = m.structure(video, s.structure_strength)[None].float()
    sched = make_sampler(s.sampler, s.steps)
    gen = torch.Generator().manual_seed(s.seed)
    z = torch.randn((1, 4, f, h // 8, w // 8), generator=gen) * sched.init_noise_sigma
    null = m.content.null()[None]
    for t in sched.timesteps:
        x = conditioning_input(sched.scale_model_input(z, t), structure, torch.tensor([s.structure_strength]))
        uncond, cond = (m.unet(x, t.expand(1), c, temporal=False).float() for c in (null, content[None]))
        z = sched.step(classifier_free_guidance(uncond, cond, s.guidance), t, z, generator=gen).prev_sample
    ours = per_frame_video(m, video, content, s)
    assert np.array_equal(ours.frames, tensor_to_frames(decode_latents(m, z[0])))
    assert ours.unet_forwards == 2 * STEPS
    calls = _record_unet(m, monkeypatch)
    other_ts = per_frame_video(m, video, content, dataclasses.replace(s, structure_strength=6))
    assert all(not temporal and x[:, 4:].abs().sum() > 0 for x, temporal in calls)  # structure in, temporal off
    assert (other_ts.latents - ours.latents).abs().max() > 1e-4  # t_s is the settings'


def test_per_frame_baseline_masks_as_edit_video(random_temporal, video, content):
    s = EditSettings(structure_strength=2, guidance=4.0, steps=STEPS)
    mask = np.zeros(video.shape[:3], np.float32)
    mask[:, :, 32:] = 1.0
    out = per_frame_video(random_temporal, video, content, s, mask=mask)
    known = encode_frames(random_temporal, video)
    round_trip = tensor_to_frames(decode_latents(random_temporal, known))
    assert np.array_equal(out.frames[:, :, :32], round_trip[:, :, :32])  # kept: the input's reconstruction
    torch.testing.assert_close(out.latents[..., :4], known[..., :4], atol=0, rtol=0)
    assert (out.latents[..., 4:] - known[..., 4:]).abs().mean() > 1e-2


# ----------------------------------------------------------------------------- SDEdit, no structure


def test_sdedit_starts_from_the_input_and_ignores_temporal_layers(random_temporal, zero_temporal, video, content):
    models = random_temporal
    assert [start_index(10, s) for s in (0.1, 0.55, 1.0)] == [9, 4, 0]
    z0 = encode_frames(models, video)
    drift = []
    for strength in (0.25, 0.5, 1.0):
        r = sdedit_video(models, video, content, SDEditSettings(strength=strength, steps=4, guidance=1.0))
        assert r.frames.shape == video.shape and r.frames.dtype == np.uint8
        assert r.unet_forwards == round(4 * strength)
        drift.append(float((r.latents - z0).abs().mean()))
    assert drift[0] < drift[1] < drift[2]  # more strength, further from the input's latents
    settings = SDEditSettings(strength=0.5, steps=4)
    base = sdedit_video(models, video, content, settings)
    again = sdedit_video(zero_temporal, video, content, settings)
    np.testing.assert_array_equal(base.frames, again.frames)  # per frame: temporal layers never run
    mask = np.zeros(video.shape[:3], np.float32)
    mask[:, :, :32] = 1
    masked = sdedit_video(models, video, content, settings, mask=mask)
    np.testing.assert_array_equal(masked.frames[:, :, 32:], video[:, :, 32:])
    np.testing.assert_array_equal(masked.frames[:, :, :32], base.frames[:, :, :32])
    with pytest.raises(ValueError, match="strength"):
        SDEditSettings(strength=0.0)


@pytest.mark.parametrize(("method", "temporal"), [(sdedit_video, False), (no_structure_video, True)])
def test_sdedit_style_methods_feed_empty_structure_channels(random_temporal, video, content, monkeypatch, method,
                                                            temporal):
    calls = _record_unet(random_temporal, monkeypatch)
    result = method(random_temporal, video, content, SDEditSettings(strength=0.5, steps=4))
    assert len(calls) == result.unet_forwards == 2 and result.depth is None
    for x, on in calls:
        assert x.shape[1] == 12 and on is temporal
        assert not x[:, 4:].any()  # zeros in the depth-latent and t_s channels, as training stages 1-2


def test_no_structure_is_sdedit_with_the_temporal_layers_on(random_temporal, zero_temporal, video, content):
    settings = SDEditSettings(strength=0.5, steps=4)
    video_model = no_structure_video(random_temporal, video, content, settings)
    assert video_model.stats["method"] == "no_structure"
    per_frame = sdedit_video(random_temporal, video, content, settings)
    assert (video_model.latents - per_frame.latents).abs().max() > 1e-3  # the temporal layers act
    # with zero temporal weights the video model is the image model on every frame: the two coincide
    torch.testing.assert_close(no_structure_video(zero_temporal, video, content, settings).latents,
                               sdedit_video(zero_temporal, video, content, settings).latents, atol=1e-5, rtol=1e-5)
    long = np.concatenate([video, video[::-1]])  # 8 frames through windows of 4
    out = no_structure_video(random_temporal, long, content, dataclasses.replace(settings, steps=2))
    assert out.frames.shape == long.shape
