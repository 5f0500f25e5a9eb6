"""The prior (text -> CLIP image embedding) and the content encoder, with tiny models built here."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer, UnCLIPScheduler

from gen1.content import ContentEncoder
from gen1.prior import Prior
from gen1.schedule import KARLO_PRIOR_SCHEDULER_CONFIG, load_prior_scheduler

DIM = 16  # CLIP embedding width == text token width of the tiny "CLIP"
SEQ = 7  # tokens per prompt of the tiny "CLIP"


def tiny_prior_transformer(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    model = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        embedding_dim=DIM,
        num_embeddings=SEQ,
        additional_embeddings=4,
    ).eval()
    with torch.no_grad():
        model.clip_mean.copy_(torch.linspace(-0.1, 0.1, DIM)[None])
        model.clip_std.copy_(torch.linspace(0.05, 0.2, DIM)[None])
    return model


def text_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, DIM, generator=g)
    tokens = torch.randn(n, SEQ, DIM, generator=g)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    mask = torch.arange(SEQ)[None] < lengths[:, None]
    return pooled, tokens, mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def prior() -> Prior:
    return Prior(tiny_prior_transformer())


# ---- Prior: sampling ----------------------------------------------------------------------------------------


def test_sample_shape_and_determinism_for_a_seed(prior):
    text = text_batch(3)
    a = prior.sample(*text, generator=gen(1), steps=5)
    b = prior.sample(*text, generator=gen(1), steps=5)
    c = prior.sample(*text, generator=gen(2), steps=5)
    assert a.shape == (3, DIM) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sample_is_denormalised_with_the_priors_clip_stats(prior):
    # Karlo's scheduler clips the predicted clean sample to +-5 in normalised space; the output is
    # mean + std * x, so it must lie within mean +- 5 std (plus the last step's small noise: none at t=0).
    out = prior.sample(*text_batch(16), generator=gen(0), steps=4)
    mean, std = prior.prior.clip_mean.detach(), prior.prior.clip_std.detach()
    assert torch.all((out - mean).abs() <= 5 * std + 1e-5)


def test_guided_sampling_needs_and_uses_the_empty_prompt(prior):
    text = text_batch(2)
    with pytest.raises(ValueError, match="uncond"):
        prior.sample(*text, generator=gen(0), steps=3, guidance_scale=4.0)
    uncond = text_batch(1, seed=9)
    guided = prior.sample(*text, generator=gen(0), steps=3, guidance_scale=4.0, uncond=uncond)
    plain = prior.sample(*text, generator=gen(0), steps=3)
    assert guided.shape == (2, DIM) and not torch.allclose(guided, plain)


def test_text_inputs_are_checked(prior):
    pooled, tokens, mask = text_batch(2)
    with pytest.raises(ValueError, match="text_tokens"):
        prior.sample(pooled, tokens[:, :5], mask, steps=2)
    with pytest.raises(ValueError, match="text_pooled"):
        prior.sample(pooled[:, :8], tokens, mask, steps=2)


def test_fresh_prior_gets_identity_normalisation():
    torch.manual_seed(0)
    fresh = PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=DIM, num_embeddings=SEQ
    )
    assert torch.all(fresh.clip_std == 0)
    p = Prior(fresh)
    assert torch.equal(fresh.clip_std, torch.ones(1, DIM)) and torch.equal(
        fresh.clip_mean, torch.zeros(1, DIM)
    )
    out = p.sample(*text_batch(2), generator=gen(0), steps=3)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


# ---- Prior: training loss -----------------------------------------------------------------------------------


def test_loss_is_finite_and_falls_on_fixed_pairs(prior):
    text = text_batch(4)
    images = F.normalize(torch.randn(4, DIM, generator=gen(5)), dim=-1)
    stats = (prior.prior.clip_mean.clone(), prior.prior.clip_std.clone())
    opt = torch.optim.Adam(prior.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = prior.loss(*text, images, generator=gen(123))  # same timesteps and noise every step
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(a > b for a, b in pairwise(losses)), losses
    assert losses[-1] < 0.5 * losses[0]
    # The CLIP statistics are data, not weights: training leaves them alone.
    assert torch.equal(prior.prior.clip_mean, stats[0]) and torch.equal(prior.prior.clip_std, stats[1])


def test_loss_target_is_the_normalised_clean_embedding(prior):
    text = text_batch(2)
    images = torch.randn(2, DIM, generator=gen(3))
    t = torch.tensor([0, 999])
    with torch.no_grad():
        loss = prior.loss(*text, images, generator=gen(7), timesteps=t)
        x0 = prior.normalise(images)
        g = gen(7)
        noise = torch.randn(x0.shape, generator=g)
        x_t = prior.scheduler.add_noise(x0, noise, t)
        pred = prior.prior(
            x_t, t, proj_embedding=text[0], encoder_hidden_states=text[1], attention_mask=text[2]
        )
        ref = F.mse_loss(pred.predicted_image_embedding, x0)
    torch.testing.assert_close(loss, ref)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel(prior.prior)
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapper = Wrapper(prior.prior)
    with torch.no_grad():
        wrapped = prior.loss(*text, images, generator=gen(7), timesteps=t, model=wrapper)
    assert wrapper.calls == 1 and torch.equal(wrapped, loss)
    with pytest.raises(ValueError, match="image_embeds"):
        prior.loss(*text, images[:, :4])


# ---- Prior: persistence -------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_samples(prior, tmp_path):
    prior.scheduler = UnCLIPScheduler(**{**KARLO_PRIOR_SCHEDULER_CONFIG, "clip_sample_range": 3.0})
    prior.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert loaded.scheduler.config.clip_sample_range == 3.0
    text = text_batch(2)
    assert torch.equal(
        prior.sample(*text, generator=gen(4), steps=4), loaded.sample(*text, generator=gen(4), steps=4)
    )
    for (name, a), (_, b) in zip(
        prior.prior.state_dict().items(), loaded.prior.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_scheduler_lookup_follows_karlos_layout(tmp_path):
    (tmp_path / "karlo" / "prior").mkdir(parents=True)
    assert load_prior_scheduler(tmp_path / "karlo" / "prior").config.clip_sample_range == 5.0  # Karlo's default
    sched = tmp_path / "karlo" / "prior_scheduler"
    sched.mkdir()
    cfg = {"_class_name": "UnCLIPScheduler", **KARLO_PRIOR_SCHEDULER_CONFIG, "clip_sample_range": 2.5}
    (sched / "scheduler_config.json").write_text(json.dumps(cfg))
    assert load_prior_scheduler(tmp_path / "karlo" / "prior").config.clip_sample_range == 2.5


# ---- ContentEncoder -----------------------------------------------------------------------------------------


class StubClip:
    """A stand-in ClipEmbedder: image embedding = normalised per-channel means of a frame, so each frame's
    embedding identifies it; text states derived from the text; open_clip-style 0-padded token ids."""

    dim = DIM

    def __init__(self):
        self.embedded: list[np.ndarray] = []

    def embed_images(self, frames):
        frames = np.asarray(frames)
        self.embedded.append(frames)
        x = torch.as_tensor(frames).float().mean(dim=(1, 2))  # (n, 3)
        emb = torch.cat([x, torch.ones(len(x), DIM - 3)], dim=1)
        return F.normalize(emb, dim=-1)

    def tokenizer(self, texts):
        ids = torch.zeros(len(texts), SEQ, dtype=torch.long)
        for i, t in enumerate(texts):
            n = min(len(t.split()) + 2, SEQ)  # SOT + words + EOT
            ids[i, :n] = torch.arange(1, n + 1)
        return ids

    def text_tokens_and_pooled(self, texts):
        seeds = [sum(map(ord, t)) + 1 for t in texts]
        tokens = torch.stack([torch.randn(SEQ, DIM, generator=gen(s)) for s in seeds])
        pooled = torch.stack([torch.randn(DIM, generator=gen(s + 1)) for s in seeds])
        return tokens, pooled


def test_from_image_embeds_that_one_image():
    clip = StubClip()
    enc = ContentEncoder(clip, None)
    image = np.full((8, 8, 3), 40, dtype=np.uint8)
    out = enc.from_image(image)
    assert out.shape == (DIM,) and len(clip.embedded) == 1 and clip.embedded[0].shape == (1, 8, 8, 3)
    assert torch.equal(out, clip.embed_images(image[None])[0])
    with pytest.raises(ValueError, match=r"image must be uint8 \(h, w, 3\)"):
        enc.from_image(np.zeros((2, 8, 8, 3), dtype=np.uint8))


def test_from_text_through_the_prior_is_unit_norm_and_seeded():
    enc = ContentEncoder(StubClip(), Prior(tiny_prior_transformer()), prior_steps=4)
    a = enc.from_text("a red car", generator=gen(0))
    b = enc.from_text("a red car", generator=gen(0))
    c = enc.from_text("a snowy mountain road", generator=gen(0))
    assert a.shape == (DIM,)
    torch.testing.assert_close(a.norm(), torch.tensor(1.0))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    pooled, tokens, mask = enc.text_inputs(["a red car", ""])
    assert (
        mask.dtype == torch.bool and mask[0].sum() == 5 and mask[1].sum() == 2
    )  # SOT a red car EOT / SOT EOT


def test_null_and_misconfiguration():
    enc = ContentEncoder(StubClip(), None)
    assert torch.equal(enc.null(), torch.zeros(DIM))
    with pytest.raises(ValueError, match="needs a prior"):
        enc.from_text("a cat")
    wide = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=24)
    with pytest.raises(ValueError, match="24-d"):
        ContentEncoder(StubClip(), Prior(wide))
