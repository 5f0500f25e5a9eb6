"""The prior (text -> CLIP image embedding) and the content encoder, with tiny models built here."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer, UnCLIPScheduler

from gen1.clip import OPENAI_MEAN, OPENAI_STD
from gen1.config import SDIV, SDIV_CONTENT, UNIT_CONTENT, ContentConvention
from gen1.content import ContentEncoder, prior_to_convention
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

    def __init__(self, convention: ContentConvention = UNIT_CONTENT):
        self.embedded: list[np.ndarray] = []
        self.convention = convention

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


# ---- the sdiv convention (lambdalabs/sd-image-variations-diffusers' UNet) ------------------------------------


def open_clip_visual_to_transformers(model) -> torch.nn.Module:
    """open_clip ``CLIP``'s image tower -> a transformers ``CLIPVisionModelWithProjection`` (the checkpoint's
    ``image_encoder`` class) holding the same weights, as OpenAI's ViT-L/14 exists in both formats."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    v = model.visual
    blocks = v.transformer.resblocks
    width = v.conv1.out_channels
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=v.image_size[0],
        patch_size=v.patch_size[0],
        projection_dim=v.output_dim,
        hidden_act="quick_gelu",  # OpenAI's activation (open_clip's quick_gelu=True)
        layer_norm_eps=v.ln_pre.eps,
    )
    hf = CLIPVisionModelWithProjection(config).eval()
    state = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight,
        "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,  # open_clip: x @ proj; transformers: Linear(x) = x @ W.T
    }
    for i, block in enumerate(blocks):
        hf_layer = f"vision_model.encoder.layers.{i}"
        q, k, val = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        state.update({
            f"{hf_layer}.self_attn.q_proj.weight": q, f"{hf_layer}.self_attn.q_proj.bias": qb,
            f"{hf_layer}.self_attn.k_proj.weight": k, f"{hf_layer}.self_attn.k_proj.bias": kb,
            f"{hf_layer}.self_attn.v_proj.weight": val, f"{hf_layer}.self_attn.v_proj.bias": vb,
            f"{hf_layer}.self_attn.out_proj.weight": block.attn.out_proj.weight,
            f"{hf_layer}.self_attn.out_proj.bias": block.attn.out_proj.bias,
            f"{hf_layer}.layer_norm1.weight": block.ln_1.weight, f"{hf_layer}.layer_norm1.bias": block.ln_1.bias,
            f"{hf_layer}.layer_norm2.weight": block.ln_2.weight, f"{hf_layer}.layer_norm2.bias": block.ln_2.bias,
            f"{hf_layer}.mlp.fc1.weight": block.mlp.c_fc.weight, f"{hf_layer}.mlp.fc1.bias": block.mlp.c_fc.bias,
            f"{hf_layer}.mlp.fc2.weight": block.mlp.c_proj.weight, f"{hf_layer}.mlp.fc2.bias": block.mlp.c_proj.bias,
        })
    missing, unexpected = hf.load_state_dict({k: t.detach().clone() for k, t in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf


def frames_hw(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3) with detail at every scale (noise over a gradient), so resampling choices show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, w)[None, :, None]
    return np.clip(ramp + rng.normal(0, 50, (n, h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clips(tiny_models):
    from gen1.clip import ClipEmbedder

    return {c: ClipEmbedder("tiny:clip", device="cpu", convention=c) for c in (UNIT_CONTENT, SDIV_CONTENT)}


def test_sdiv_preset_names_the_checkpoint_pinned_and_its_convention():
    assert SDIV.unet == "hf:lambdalabs/sd-image-variations-diffusers@v2.0/unet"
    assert SDIV.clip == "hf:timm/vit_large_patch14_clip_224.openai" and SDIV.clip_dim == 768
    assert (SDIV.content.resize, SDIV.content.antialias, SDIV.content.unit_norm) == ("squash", False, False)
    assert SDIV_CONTENT.model_id(SDIV.clip).endswith("(squash, no antialias, raw norm)")
    assert UNIT_CONTENT.model_id(SDIV.clip) == SDIV.clip


def test_sdiv_preprocessing_squashes_without_antialias_as_the_unet_was_trained(clips):
    sdiv, unit = clips[SDIV_CONTENT], clips[UNIT_CONTENT]
    frames = frames_hw(2, 40, 72)  # not square: a crop and a squash see different pixels
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    # the training code's kornia.geometry.resize((224, 224), "bicubic", align_corners=True, antialias=False)
    want = (F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=True) - mean) / std
    torch.testing.assert_close(sdiv.preprocess(torch.from_numpy(frames)), want, atol=1e-6, rtol=0)
    assert (unit.preprocess(torch.from_numpy(frames)) - want).abs().mean() > 0.1  # crop + antialias differ


def test_sdiv_embedding_is_the_image_variation_encoders_image_embeds_with_converted_weights(clips):
    sdiv = clips[SDIV_CONTENT]
    image_encoder = open_clip_visual_to_transformers(sdiv.model)
    frames = frames_hw(3, 48, 64, seed=1)
    with torch.no_grad():
        theirs = image_encoder(sdiv.preprocess(torch.from_numpy(frames))).image_embeds  # diffusers' _encode_image
    ours = sdiv.embed_images(frames)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours.norm(dim=-1) - 1).abs().min() > 0.1  # raw: not normalised, as the UNet saw it
    # up to scale it is the unit-norm convention's embedding of the same pixels
    unit_same_pixels = ContentConvention(resize="squash", antialias=False, unit_norm=True)
    from gen1.clip import ClipEmbedder

    unit = ClipEmbedder.from_model(sdiv.model, sdiv.tokenizer, device="cpu", convention=unit_same_pixels)
    torch.testing.assert_close(unit.embed_images(frames), F.normalize(theirs, dim=-1), atol=1e-5, rtol=1e-4)


def test_prior_samples_are_brought_to_the_convention():
    g = gen(3)
    raw = torch.randn(4, DIM, generator=g) * torch.linspace(0.5, 3.0, 4)[:, None]
    unit = prior_to_convention(raw, unit_norm=True, norm=9.0)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(4))
    scaled = prior_to_convention(raw, unit_norm=False, norm=9.0)
    torch.testing.assert_close(scaled.norm(dim=-1), torch.full((4,), 9.0))
    torch.testing.assert_close(F.normalize(scaled, dim=-1), unit)  # direction kept


def test_typical_norm_is_the_norm_of_the_embeddings_the_prior_was_fitted_on():
    g = gen(4)
    directions = F.normalize(torch.randn(4096, DIM, generator=g) + 2.0, dim=-1)  # not centred, as CLIP's
    raw = directions * (12.0 + torch.randn(4096, 1, generator=g))  # raw image_embeds: norms around 12
    prior = Prior(tiny_prior_transformer())
    prior.fit_clip_stats(raw)
    assert prior.typical_norm() == pytest.approx(raw.norm(dim=-1).square().mean().sqrt().item(), rel=1e-3)
    prior.fit_clip_stats(directions)
    assert prior.typical_norm() == pytest.approx(1.0, rel=1e-3)


def test_from_text_under_the_sdiv_convention_has_the_priors_typical_norm():
    prior = Prior(tiny_prior_transformer())
    raw_enc = ContentEncoder(StubClip(SDIV_CONTENT), prior, prior_steps=4)
    unit_enc = ContentEncoder(StubClip(UNIT_CONTENT), prior, prior_steps=4)
    raw, unit = raw_enc.from_text("a red car", generator=gen(0)), unit_enc.from_text("a red car", generator=gen(0))
    assert abs(prior.typical_norm() - 1.0) > 0.3  # the test prior's stats: far from unit norm
    torch.testing.assert_close(raw.norm(), torch.tensor(prior.typical_norm()))
    torch.testing.assert_close(F.normalize(raw, dim=0), unit)
