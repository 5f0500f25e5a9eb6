"""Structure conditioning: the t_s blur pyramid, the t_s sinusoid, the 12-channel input, depth -> latent."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from gen1.structure import (
    MAX_TS,
    StructureEncoder,
    blur_downsample_pyramid,
    conditioning_input,
    normalise_per_clip,
    ts_channels,
    ts_embedding,
)

SIZES = [(448, 256), (256, 448)]  # (w, h): landscape and portrait, as the paper trains


def depth_map(w: int, h: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """A real-ish depth map (n, 1, h, w): smooth random relief + a box and a diagonal step + sensor noise."""
    g = torch.Generator().manual_seed(seed)
    relief = F.interpolate(torch.randn(n, 1, h // 32, w // 32, generator=g), size=(h, w), mode="bicubic")
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    box = ((xx > w // 3) & (xx < 2 * w // 3) & (yy > h // 4) & (yy < 3 * h // 4)).float() * 2.0
    step = (xx + yy > (h + w) // 2).float()
    return relief + box + step + 0.05 * torch.randn(n, 1, h, w, generator=g)


def laplacian_energy(x: torch.Tensor) -> float:
    """Mean squared Laplacian: the high-frequency energy of (n, 1, h, w) maps."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(x.float(), k).pow(2).mean().item()


# ---- pyramid ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", SIZES)
def test_pyramid_ts0_is_exact_identity(w, h):
    d = depth_map(w, h)
    out = blur_downsample_pyramid(d, 0)
    assert torch.equal(out, d)
    assert out.data_ptr() != d.data_ptr()  # a copy: callers may modify it


@pytest.mark.parametrize("w,h", SIZES)
def test_high_frequency_energy_strictly_falls_with_ts(w, h):
    d = depth_map(w, h)
    energies = [laplacian_energy(blur_downsample_pyramid(d, ts)) for ts in range(MAX_TS + 1)]
    assert all(a > b for a, b in pairwise(energies)), energies
    assert energies[-1] < 1e-3 * energies[0]  # t_s = 7 leaves only the coarse layout


@pytest.mark.parametrize("w,h", SIZES)
def test_pyramid_keeps_shape_dtype_and_the_coarse_layout(w, h):
    d = depth_map(w, h).to(torch.float16)
    for ts in range(MAX_TS + 1):
        out = blur_downsample_pyramid(d, ts)
        assert out.shape == d.shape and out.dtype == torch.float16
    # Even at t_s = 7 the left/right and top/bottom halves keep their order (the structure is still there).
    coarse = blur_downsample_pyramid(depth_map(w, h), MAX_TS)
    ref = depth_map(w, h)
    for dim in (2, 3):
        a, b = ref.chunk(2, dim=dim)
        ca, cb = coarse.chunk(2, dim=dim)
        assert torch.sign(a.mean() - b.mean()) == torch.sign(ca.mean() - cb.mean())


def test_pyramid_preserves_constants():
    d = torch.full((3, 1, 256, 448), 0.37)
    for ts in range(MAX_TS + 1):
        torch.testing.assert_close(blur_downsample_pyramid(d, ts), d)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (3, 5), (8, 8), (64, 64), (2, 300)])
def test_pyramid_tiny_sizes_never_fail_and_never_add_detail(h, w):
    d = torch.randn(2, 1, h, w, generator=torch.Generator().manual_seed(1))
    energies = []
    for ts in range(MAX_TS + 1):
        out = blur_downsample_pyramid(d, ts)
        assert out.shape == d.shape and torch.isfinite(out).all()
        if h >= 3 and w >= 3:
            energies.append(laplacian_energy(out))
    assert all(a >= b - 1e-9 for a, b in pairwise(energies)), energies


def test_pyramid_blurs_a_side_that_is_already_one_pixel():
    # A 2 x 300 strip: the short side stops at 1 px after one step, the long side keeps losing detail.
    d = torch.randn(1, 1, 2, 300, generator=torch.Generator().manual_seed(2))
    rough = [(blur_downsample_pyramid(d, ts).diff(dim=-1) ** 2).mean().item() for ts in range(MAX_TS + 1)]
    assert all(a > b for a, b in pairwise(rough)), rough


def test_pyramid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(n, 1, h, w\)"):
        blur_downsample_pyramid(torch.zeros(2, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="t_s"):
        blur_downsample_pyramid(torch.zeros(2, 1, 8, 8), -1)


# ---- t_s embedding ------------------------------------------------------------------------------------------


def test_ts_embedding_shape_determinism_and_distinct_values():
    ts = torch.arange(MAX_TS + 1)
    emb = ts_embedding(ts)
    assert emb.shape == (8, 4) and emb.dtype == torch.float32
    assert torch.equal(emb, ts_embedding(ts.clone()))
    assert torch.equal(ts_embedding(3), emb[3:4])
    dists = torch.cdist(emb, emb) + torch.eye(8) * 10
    assert dists.min() > 0.1  # every t_s distinguishable
    assert emb.abs().max() <= 1.0
    # The slow cosine channel is monotonic in t_s: nearby strengths get nearby embeddings.
    assert torch.all(emb[1:, 1] < emb[:-1, 1])


def test_ts_embedding_rejects_odd_channels():
    with pytest.raises(ValueError, match="even"):
        ts_embedding(torch.tensor([1]), channels=3)


def test_ts_channels_broadcast_the_embedding():
    ts = torch.tensor([0, 5])
    c = ts_channels(ts, f=3, h=4, w=5)
    assert c.shape == (2, 4, 3, 4, 5)
    emb = ts_embedding(ts)
    for b in range(2):
        assert torch.equal(c[b], emb[b][:, None, None, None].expand(4, 3, 4, 5))


def test_conditioning_input_layout():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 4, 5, generator=g, dtype=torch.float64)
    s = torch.randn(1, 4, 3, 4, 5, generator=g)
    x = conditioning_input(z, s, torch.tensor([1, 6]))
    assert x.shape == (2, 12, 3, 4, 5) and x.dtype == torch.float64
    assert torch.equal(x[:, :4], z)
    assert torch.equal(x[:, 4:8], s.double().expand(2, -1, -1, -1, -1))
    assert torch.equal(x[:, 8:], ts_channels(torch.tensor([1, 6]), 3, 4, 5).double())
    with pytest.raises(ValueError, match="structure latent"):
        conditioning_input(z, torch.zeros(2, 4, 2, 4, 5), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="t_s"):
        conditioning_input(z, s, torch.tensor([1, 2, 3]))


# ---- StructureEncoder ------------------------------------------------------------------------------------------


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.5,
    ).eval()


class StubDepth:
    """Raw 'depth' that grows by frame (so per-frame normalisation would be visible); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, frames):
        self.calls += 1
        f, h, w, _ = frames.shape
        x = torch.as_tensor(np.asarray(frames)).float().mean(-1)
        return x + 300.0 * torch.arange(f, dtype=torch.float32)[:, None, None]


@pytest.fixture(scope="module")
def encoder():
    return StructureEncoder(StubDepth(), tiny_vae())


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, size=(3, 64, 96, 3), dtype=np.uint8)


def test_depth_is_normalised_per_clip_not_per_frame(encoder, frames):
    d = encoder.depth(frames)
    assert d.shape == (3, 64, 96) and d.dtype == torch.float32
    assert d.min().item() == pytest.approx(-1.0) and d.max().item() == pytest.approx(1.0)
    # Frame 0 is the clip's nearest, frame 2 its farthest: per-clip normalisation keeps that apart.
    assert d[0].max() < d[2].min()
    assert torch.equal(normalise_per_clip(torch.full((2, 4, 4), 3.0)), torch.zeros(2, 4, 4))


def test_structure_encoder_shape_and_one_depth_call_per_clip(frames):
    stub = StubDepth()
    enc = StructureEncoder(stub, tiny_vae(), batch_size=2)  # 3 frames in 2 VAE batches
    z = enc(frames, 3)
    assert z.shape == (4, 3, 8, 12)
    assert stub.calls == 1


def test_structure_latent_is_the_scaled_vae_mean_of_the_pyramid(encoder, frames):
    depth = encoder.depth(frames)
    for ts in (0, 4):
        z = encoder.encode(depth, ts)
        x = blur_downsample_pyramid(depth[:, None], ts).expand(-1, 3, -1, -1)
        with torch.no_grad():
            ref = encoder.vae.encode(x).latent_dist.mean * 0.5
        torch.testing.assert_close(z, ref.permute(1, 0, 2, 3))
    assert torch.equal(encoder.encode(depth, 2), encoder.encode(depth, 2))  # deterministic (no sampling)
    assert not torch.allclose(encoder.encode(depth, 0), encoder.encode(depth, 5))


def test_structure_encoder_rejects_sizes_the_vae_cannot_take(encoder):
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder.encode(torch.zeros(2, 60, 64), 1)
    with pytest.raises(ValueError, match=r"\(f, h, w, 3\)"):
        encoder.depth(np.zeros((2, 8, 8), dtype=np.uint8))
