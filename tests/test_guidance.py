"""Guidance math on known tensors (eq. 8 and classifier-free guidance)."""

import pytest
import torch

from gen1.guidance import GuidanceScales, classifier_free_guidance, guide, temporal_guidance


def test_cfg_on_known_values():
    uncond = torch.tensor([1.0, 2.0, -1.0])
    cond = torch.tensor([3.0, 2.0, 1.0])
    out = classifier_free_guidance(uncond, cond, w=7.5)
    assert torch.equal(out, torch.tensor([16.0, 2.0, 14.0]))
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)


def test_eq8_on_known_values():
    img = torch.tensor([0.0, 1.0])
    vid_u = torch.tensor([2.0, 1.0])
    vid_c = torch.tensor([3.0, 5.0])
    # img + w_t (vid_u - img) + w (vid_c - vid_u)
    out = temporal_guidance(img, vid_u, vid_c, w=2.0, w_t=1.5)
    assert torch.equal(out, torch.tensor([0.0 + 1.5 * 2.0 + 2.0 * 1.0, 1.0 + 0.0 + 2.0 * 4.0]))
    # w_t = 0 is the image model's unconditional prediction plus content guidance
    assert torch.equal(temporal_guidance(img, vid_u, vid_c, w=0.0, w_t=0.0), img)


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
def test_eq8_with_wt_one_matches_cfg_numerically(w):
    g = torch.Generator().manual_seed(0)
    img, vu, vc = (torch.randn(2, 4, 3, 5, 5, generator=g) for _ in range(3))
    torch.testing.assert_close(temporal_guidance(img, vu, vc, w, 1.0), classifier_free_guidance(vu, vc, w))


def test_branches_needed():
    assert GuidanceScales(7.5, 1.5).branches() == ("image_uncond", "video_uncond", "video_cond")
    assert GuidanceScales(7.5, 1.0).branches() == ("video_uncond", "video_cond")
    assert GuidanceScales(1.0, 1.0).branches() == ("video_cond",)
    # w = 1 but w_t != 1 still needs the unconditional video model (eq. 8's middle term)
    assert GuidanceScales(1.0, 0.5).branches() == ("image_uncond", "video_uncond", "video_cond")


def test_guide_dispatch_is_bitwise_cfg_and_cond():
    g = torch.Generator().manual_seed(1)
    preds = {k: torch.randn(1, 4, 2, 3, 3, generator=g) for k in ("image_uncond", "video_uncond", "video_cond")}
    assert torch.equal(
        guide(preds, GuidanceScales(5.0, 1.0)),
        classifier_free_guidance(preds["video_uncond"], preds["video_cond"], 5.0),
    )
    assert torch.equal(guide(preds, GuidanceScales(1.0, 1.0)), preds["video_cond"])
    assert torch.equal(
        guide(preds, GuidanceScales(5.0, 2.0)),
        temporal_guidance(preds["image_uncond"], preds["video_uncond"], preds["video_cond"], 5.0, 2.0),
    )


def test_image_model_guidance_is_cfg_of_the_image_branches():
    """The per-frame baseline: mu_pi(0) + w (mu_pi(c) - mu_pi(0)), no video branch, w_t unused."""
    assert GuidanceScales(7.5, image_model=True).branches() == ("image_uncond", "image_cond")
    assert GuidanceScales(7.5, 0.0, image_model=True).branches() == ("image_uncond", "image_cond")
    assert GuidanceScales(1.0, 1.5, image_model=True).branches() == ("image_cond",)
    g = torch.Generator().manual_seed(2)
    preds = {k: torch.randn(1, 4, 2, 3, 3, generator=g) for k in ("image_uncond", "image_cond")}
    assert torch.equal(
        guide(preds, GuidanceScales(5.0, 0.0, image_model=True)),
        classifier_free_guidance(preds["image_uncond"], preds["image_cond"], 5.0),
    )
    assert torch.equal(guide(preds, GuidanceScales(1.0, image_model=True)), preds["image_cond"])
