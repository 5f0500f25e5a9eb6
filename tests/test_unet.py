"""The inflated video UNet against diffusers' image UNet: equivalence at init, sharing, masks, round trip."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import gen1.temporal
import gen1.unet
from gen1.config import TemporalConfig
from gen1.temporal import FrameState, TemporalConv, TemporalTransformer, TemporalTransformerBlock
from gen1.unet import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, VideoUNet, load_video_unet

TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    cross_attention_dim=32,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
    sample_size=8,
)
TEMPORAL = TemporalConfig(max_frames=16, conv_kernel_size=3, attention_head_dim=8)
B, H, W, D = 2, 8, 8, 32


def image_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def reference() -> UNet2DConditionModel:
    """The diffusers image UNet, never inflated."""
    return image_unet()


@pytest.fixture
def video(reference) -> VideoUNet:
    """A freshly inflated copy of ``reference``."""
    return VideoUNet.from_image_unet(copy.deepcopy(reference), TEMPORAL).eval()


def inputs(f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 12, f, H, W, generator=g)  # the 8 extra channels get input too
    return z, torch.tensor([10, 700]), torch.randn(B, D, generator=g)


def per_frame(unet: UNet2DConditionModel, z, t, content) -> torch.Tensor:
    """The image UNet applied to each frame separately: z (b, 4, f, h, w) -> (b, 4, f, h, w)."""
    frames = [unet(z[:, :, i], t, encoder_hidden_states=content[:, None]).sample for i in range(z.shape[2])]
    return torch.stack(frames, dim=2)


def perturb(video: VideoUNet, kind: str = "both", scale: float = 0.1, seed: int = 1) -> None:
    """Give the chosen temporal layers random non-zero weights ("as if trained")."""
    g = torch.Generator().manual_seed(seed)
    kinds = {
        "conv": (TemporalConv,),
        "attention": (TemporalTransformer,),
        "both": (TemporalConv, TemporalTransformer),
    }
    with torch.no_grad():
        for m in video.modules():
            if isinstance(m, kinds[kind]):
                for p in m.temporal.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("f", [1, 3, 8])
@torch.no_grad()
def test_fresh_video_unet_equals_image_unet_per_frame(reference, video, f):
    z, t, content = inputs(f)
    expected = per_frame(reference, z[:, :4], t, content)
    out = video(z, t, content)
    assert out.shape == (B, 4, f, H, W)
    assert max_diff(out, expected) < 1e-5
    assert max_diff(video(z, t, content[:, None]), expected) < 1e-5  # (b, seq, d) content
    assert max_diff(video(z, t, content, temporal=False), expected) < 1e-5
    if f > 1:  # the comparison is not vacuous: frames differ
        assert max_diff(expected[:, :, 0], expected[:, :, 1]) > 1e-2


@pytest.mark.parametrize("kind", ["conv", "attention"])
@torch.no_grad()
def test_perturbed_temporal_layers_change_video_mode_only(reference, video, kind):
    z, t, content = inputs(4)
    expected = per_frame(reference, z[:, :4], t, content)
    perturb(video, kind)
    assert max_diff(video(z, t, content), expected) > 1e-3
    assert max_diff(video(z, t, content, temporal=False), expected) < 1e-5


@torch.no_grad()
def test_extra_input_channels_start_at_zero_and_are_used_once_nonzero(reference, video):
    z, t, content = inputs(2)
    w = video.image_unet.conv_in.weight
    assert w.shape[1] == 12 and torch.equal(w[:, :4], reference.conv_in.weight) and not w[:, 4:].any()
    w[:, 4:].normal_(std=0.05)
    assert max_diff(video(z, t, content), per_frame(reference, z[:, :4], t, content)) > 1e-3


def test_parameters_shared_with_image_unet_not_copied():
    unet = image_unet()
    originals = {n: p for n, p in unet.named_parameters() if n != "conv_in.weight"}
    video = VideoUNet.from_image_unet(unet, TEMPORAL)
    assert video.image_unet is unet
    spatial, temporal = video.spatial_parameters(), video.temporal_parameters()
    spatial_ids = {id(p) for p in spatial}
    assert all(id(p) in spatial_ids for p in originals.values())  # the same Parameter objects
    assert len(spatial) == len(originals) + 1  # + the widened conv_in weight
    assert not spatial_ids & {id(p) for p in temporal}
    assert {id(p) for p in video.parameters()} == spatial_ids | {id(p) for p in temporal}
    # resnets: 2 down + 2 mid + 4 up, 2 convs each; transformers: 1 down + 1 mid + 2 up
    assert sum(isinstance(m, TemporalConv) for m in video.modules()) == 16
    assert sum(isinstance(m, TemporalTransformer) for m in video.modules()) == 4
    # both modes read the very same storage
    ptr = unet.down_blocks[0].resnets[0].conv1.spatial.weight.data_ptr()
    assert ptr == originals["down_blocks.0.resnets.0.conv1.weight"].data_ptr()


def _step(video: VideoUNet, **mode) -> dict[str, list[torch.Tensor]]:
    """One SGD step on a random regression target; returns the grads of temporal and spatial params."""
    video.zero_grad(set_to_none=True)
    z, t, content = inputs(3, seed=5)
    opt = torch.optim.SGD(video.parameters(), lr=0.1)
    loss = video(z, t, content, **mode).square().mean()
    loss.backward()
    grads = {
        "temporal": [p.grad for p in video.temporal_parameters()],
        "spatial": [p.grad for p in video.spatial_parameters()],
    }
    opt.step()
    return grads


@pytest.mark.parametrize(
    "mode", [{"temporal": False}, {"video_mask": torch.zeros(B)}], ids=["image", "mask0"]
)
def test_image_mode_step_leaves_temporal_parameters_untouched(video, mode):
    video.train()
    perturb(video)  # non-zero temporal weights: gradients would flow through them if they were used
    before = [p.detach().clone() for p in video.temporal_parameters()]
    spatial_before = [p.detach().clone() for p in video.spatial_parameters()]
    grads = _step(video, **mode)
    assert all(g is None or not g.any() for g in grads["temporal"])
    assert all(torch.equal(a, p) for a, p in zip(before, video.temporal_parameters(), strict=True))
    assert sum(g is not None and bool(g.any()) for g in grads["spatial"]) > 0.9 * len(grads["spatial"])
    assert any(not torch.equal(a, p) for a, p in zip(spatial_before, video.spatial_parameters(), strict=True))


def test_video_step_gives_every_temporal_parameter_a_gradient(video):
    video.train()
    perturb(video)
    grads = _step(video, video_mask=torch.ones(B))
    assert all(g is not None and g.any() for g in grads["temporal"])


def test_gradient_checkpointing_gives_the_same_gradients(video):
    video.train()
    perturb(video)
    mask = torch.tensor([0.0, 1.0])
    plain = _step(copy.deepcopy(video), video_mask=mask)
    video.enable_gradient_checkpointing()
    checkpointed = _step(video, video_mask=mask)
    for kind in ("temporal", "spatial"):
        for a, b in zip(plain[kind], checkpointed[kind], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_frame_permutation(video):
    z, t, content = inputs(5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = video(z, t, content)
    assert max_diff(video(z[:, :, perm], t, content), out[:, :, perm]) < 1e-5  # spatial layers: per frame
    for kind in ("conv", "attention"):  # attention alone is order-aware only through the frame embedding
        inflated = copy.deepcopy(video)
        perturb(inflated, kind)
        out = inflated(z, t, content)
        assert max_diff(inflated(z[:, :, perm], t, content), out[:, :, perm]) > 1e-4, kind


@pytest.mark.parametrize(
    "mask", [torch.tensor([0.0, 1.0]), torch.tensor([False, True])], ids=["float", "bool"]
)
@torch.no_grad()
def test_mixed_batch_video_mask(reference, video, mask):
    perturb(video)
    z, t, content = inputs(4)
    out = video(z, t, content, video_mask=mask)
    image = per_frame(reference, z[:1, :4], t[:1], content[:1])
    assert max_diff(out[:1], image) < 1e-5
    alone = video(z[1:], t[1:], content[1:])
    assert max_diff(out[1:], alone) < 1e-5
    assert max_diff(alone, per_frame(reference, z[1:, :4], t[1:], content[1:])) > 1e-3


@torch.no_grad()
def test_save_pretrained_round_trip(video, tmp_path):
    perturb(video)
    video.image_unet.conv_in.weight[:, 4:].normal_(std=0.05)
    video.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    loaded = VideoUNet.from_pretrained(tmp_path)
    assert loaded.temporal_config == TEMPORAL and loaded.in_channels == 12
    z, t, content = inputs(3)
    mask = torch.tensor([1.0, 0.0])
    assert torch.equal(loaded(z, t, content, video_mask=mask), video(z, t, content, video_mask=mask))
    assert all(not p.is_meta for p in loaded.parameters())


def test_load_video_unet_saved_dir_or_inflated_image_unet(video, reference, tmp_path, monkeypatch):
    """A dir with gen1_unet_config.json loads as saved; any other spec inflates ``load_image_unet(spec)``.

    The weight loaders are stubbed so this checks the dispatch alone (`gen1.weights` is tested with them).
    """
    monkeypatch.setattr(gen1.unet, "resolve_spec", lambda spec: Path(spec.removeprefix("image:")))
    monkeypatch.setattr(gen1.unet, "load_image_unet", lambda spec: copy.deepcopy(reference))
    perturb(video)
    video.save_pretrained(tmp_path / "video")
    z, t, content = inputs(2)
    with torch.no_grad():
        loaded = load_video_unet(str(tmp_path / "video"), TEMPORAL)
        assert torch.equal(loaded(z, t, content), video(z, t, content))
        inflated = load_video_unet(f"image:{tmp_path}", TEMPORAL)
        assert max_diff(inflated(z, t, content), per_frame(reference, z[:, :4], t, content)) < 1e-5


def test_from_pretrained_rejects_mismatched_weights(video, tmp_path):
    video.save_pretrained(tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(config.read_text().replace('"max_frames": 16', '"max_frames": 8'))
    with pytest.raises(ValueError, match="does not match"):
        VideoUNet.from_pretrained(tmp_path)


def test_from_pretrained_rejects_another_format_version(video, tmp_path):
    video.save_pretrained(tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(
        config.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 1')
    )
    with pytest.raises(ValueError, match=f"expected format_version {FORMAT_VERSION}, found 1"):
        VideoUNet.from_pretrained(tmp_path)


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        video = VideoUNet.from_image_unet(UNet2DConditionModel(**TINY_UNET), TEMPORAL)
    assert all(p.is_meta for p in video.parameters()) and video.temporal_parameters()


@pytest.mark.parametrize("bad", ["channels", "frames", "mask", "content"])
def test_inputs_are_checked(video, bad):
    z, t, content = inputs(2)
    kwargs = {}
    if bad == "channels":
        z = z[:, :4]
    elif bad == "frames":
        z = torch.zeros(1, 12, TEMPORAL.max_frames + 1, 1, 1)
    elif bad == "mask":
        kwargs["video_mask"] = torch.ones(3)
    else:
        content = content[:, :8]
    with pytest.raises(ValueError, match="expected|at most"):
        video(z, t, content, **kwargs)


@torch.no_grad()
def test_temporal_transformer_returns_the_wrapped_output_structure(video):
    wrapper = video.image_unet.down_blocks[0].attentions[0]
    assert isinstance(wrapper, TemporalTransformer)
    x, enc = torch.randn(6, 32, 4, 4), torch.randn(6, 1, D)
    perturb(video, "attention")
    with video.context.use(FrameState(num_frames=3, temporal=True)):
        as_tuple = wrapper(x, encoder_hidden_states=enc, return_dict=False)
        as_output = wrapper(x, encoder_hidden_states=enc)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert isinstance(as_output, Transformer2DModelOutput)
    assert torch.equal(as_tuple[0], as_output.sample)
    spatial = wrapper.spatial(x, encoder_hidden_states=enc, return_dict=False)[0]
    assert max_diff(as_tuple[0], spatial) > 1e-3  # the temporal block ran on top of the spatial one


def test_temporal_block_is_built_like_its_spatial_counterpart(video):
    """GroupNorm, proj_in, BasicTransformerBlock (self-attention over frames, GEGLU), zero proj_out."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock

    wrappers = [m for m in video.modules() if isinstance(m, TemporalTransformer)]
    assert wrappers
    for wrapper in wrappers:
        spatial, temporal = wrapper.spatial, wrapper.temporal
        assert isinstance(temporal, TemporalTransformerBlock)
        c = spatial.out_channels
        assert (temporal.norm.num_groups, temporal.norm.eps) == (spatial.norm.num_groups, spatial.norm.eps)
        for name in ("proj_in", "proj_out"):
            assert type(getattr(temporal, name)) is type(getattr(spatial, name)), name
        assert len(temporal.transformer_blocks) == len(spatial.transformer_blocks)
        for block in temporal.transformer_blocks:
            assert type(block) is BasicTransformerBlock
            assert block.attn2 is None and not block.attn1.is_cross_attention  # self-attention only
            assert isinstance(block.ff.net[0], GEGLU)
            assert block.attn1.heads == c // TEMPORAL.attention_head_dim
        assert temporal.position.weight.shape == (TEMPORAL.max_frames, c)
        assert not temporal.proj_out.weight.any() and not temporal.proj_out.bias.any()


@torch.no_grad()
def test_temporal_attention_chunking_is_exact(video, monkeypatch):
    """Sequences beyond the CUDA grid limit go through the block in chunks, with the same result."""
    perturb(video, "attention")
    z, t, content = inputs(3)
    whole = video(z, t, content)
    monkeypatch.setattr(gen1.temporal, "_MAX_ATTENTION_BATCH", 37)  # chunks of 9 or 4 pixel sequences
    torch.testing.assert_close(video(z, t, content), whole, rtol=1e-5, atol=1e-6)


def test_sd15_config_inflates_on_meta():
    """SD 1.5's UNet (diffusers defaults + cross_attention_dim 768): 22 ResNet blocks, 16 transformers."""
    with torch.device("meta"):
        video = VideoUNet.from_image_unet(
            UNet2DConditionModel(cross_attention_dim=768, sample_size=64), TemporalConfig()
        )
    assert sum(isinstance(m, TemporalConv) for m in video.modules()) == 44
    assert sum(isinstance(m, TemporalTransformer) for m in video.modules()) == 16
    assert video.in_channels == 12 and video.out_channels == 4 and video.cross_attention_dim == 768
    spatial = sum(p.numel() for p in video.spatial_parameters())
    assert spatial == 859_520_964 + 8 * 320 * 9  # SD 1.5 UNet + the zero input weights
    assert all(p.is_meta for p in video.parameters())
    assert dataclasses.asdict(video.temporal_config) == dataclasses.asdict(TemporalConfig())
