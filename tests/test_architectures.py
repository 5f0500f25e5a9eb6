"""Full-size architectures built on `meta` (nothing allocated) match the published parameter counts;
`gen1 models` reports each component of a preset."""

from __future__ import annotations

import pytest
from torch import nn

from gen1.architectures import COMPONENTS, build_component, parameter_count
from gen1.config import COMPONENT_CONFIGS, SD15, TINY
from jobs.cli import main
from jobs.exit_codes import EXIT_BAD_INPUT

# Published counts. SD 1.5 UNet: diffusers' ModelMixin.num_parameters docstring (859520964 for
# stable-diffusion-v1-5/unet). SD VAE: 83,653,863 (the usual SD 1.x budget: UNet 859,520,964 + VAE
# 83,653,863 + text encoder 123,060,480 = 1,066,235,307). open_clip ViT-L-14: 427.62M. Karlo prior: "1B".
SD15_UNET_PARAMS = 859_520_964
SD_VAE_PARAMS = 83_653_863
VIT_L_14_PARAMS = 427_616_513
CONV_IN_EXTRA = 320 * 8 * 3 * 3  # depth latent (4) + t_s channels (4) more inputs to conv_in


def temporal_transformer_params(c: int, max_frames: int) -> int:
    """One temporal transformer block of width c, counted by hand (SD's spatial layout, no cross-attention)."""
    norm = 2 * c  # GroupNorm, and each LayerNorm
    proj = c * c + c  # proj_in, proj_out (1x1 convs, as SD's spatial ones), attention out
    attention = norm + 3 * c * c + proj  # q, k, v without bias, as SD's
    feed_forward = norm + (c * 8 * c + 8 * c) + (4 * c * c + c)  # GEGLU to 2 x 4c, then 4c -> c
    return norm + proj + max_frames * c + attention + feed_forward + proj


def sd15_temporal_params() -> int:
    """A temporal conv after each of SD 1.5's 44 ResNet convs, a temporal transformer after each of its 16
    spatial transformers; widths per block (down, mid, up)."""
    k, max_frames = SD15.temporal.conv_kernel_size, SD15.temporal.max_frames
    resnets = [320] * 2 + [640] * 2 + [1280] * 4 + [1280] * 2 + [1280] * 6 + [640] * 3 + [320] * 3
    transformers = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    convs = sum(2 * (k * c * c + c) for c in resnets)  # conv1, conv2: Conv3d (k, 1, 1) + bias
    return convs + sum(temporal_transformer_params(c, max_frames) for c in transformers)


SD15_VIDEO_UNET_PARAMS = SD15_UNET_PARAMS + CONV_IN_EXTRA + 357_016_320


@pytest.fixture(scope="module")
def sd15() -> dict[str, nn.Module]:
    return {c: build_component(c, SD15) for c in COMPONENTS if c != "video_unet"}


def all_meta(module: nn.Module) -> bool:
    return all(p.is_meta for p in module.parameters()) and all(b.is_meta for b in module.buffers())


def test_every_full_size_component_builds_on_meta_without_memory(sd15):
    for name, module in sd15.items():
        assert all_meta(module), name
        assert parameter_count(module) > 50e6, name


def test_sd15_unet_has_sd15s_parameter_count(sd15):
    unet = sd15["unet"]
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert parameter_count(unet) == SD15_UNET_PARAMS
    assert unet.config.cross_attention_dim == SD15.clip_dim == 768
    assert tuple(unet.config.block_out_channels) == COMPONENT_CONFIGS["sd15"]["unet"]["block_out_channels"]


def test_published_counts_of_the_other_components(sd15):
    assert parameter_count(sd15["vae"]) == SD_VAE_PARAMS
    assert sd15["vae"].config.scaling_factor == 0.18215
    assert parameter_count(sd15["clip"]) == VIT_L_14_PARAMS
    assert sd15["clip"].visual.output_dim == SD15.clip_dim
    # Karlo's prior: a 1B-parameter transformer over 77 text tokens + 4 extra, 768-d embeddings.
    prior = sd15["prior"]
    assert 1.0e9 < parameter_count(prior) < 1.05e9
    assert prior.config.embedding_dim == SD15.clip_dim and prior.config.num_embeddings == 77
    # DPT-Large: 343M (hub model card of Intel/dpt-large).
    assert round(parameter_count(sd15["depth"]) / 1e6) == 343
    # BLIP base captioning: 247M on the hub, which counts the LM head tied to the word embeddings twice.
    text_config = COMPONENT_CONFIGS["sd15"]["caption"]["text_config"]
    tied = text_config["vocab_size"] * text_config["hidden_size"]
    assert round((parameter_count(sd15["caption"]) + tied) / 1e6) == 247


def test_video_unet_image_part_is_sd15_plus_the_wider_conv_in():
    video = build_component("video_unet", SD15)
    assert all_meta(video)
    assert video.in_channels == 12 and video.out_channels == 4
    spatial = sum(p.numel() for p in video.spatial_parameters())
    temporal = sum(p.numel() for p in video.temporal_parameters())
    assert spatial == SD15_UNET_PARAMS + CONV_IN_EXTRA
    assert temporal == sd15_temporal_params() == 357_016_320
    assert spatial + temporal == parameter_count(video) == SD15_VIDEO_UNET_PARAMS


def test_sd15_clip_config_is_open_clips_vit_l_14_quickgelu():
    import open_clip

    assert COMPONENT_CONFIGS["sd15"]["clip"] == open_clip.get_model_config("ViT-L-14-quickgelu")


def test_parameter_count_counts_shared_parameters_once():
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.weight = a.weight
    assert parameter_count(nn.ModuleList([a, b])) == 12 + 3 + 3


def test_build_component_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown component 'text_encoder'"):
        build_component("text_encoder", SD15)


def test_tiny_components_are_the_real_classes(sd15):
    # Needs gen1.weights / gen1.tiny (tiny models are built by their loaders).
    for component in COMPONENTS:
        module = build_component(component, TINY, device="cpu")
        if component in sd15:
            assert type(module) is type(sd15[component]), component
        assert 0 < parameter_count(module) < 20e6, component
    unet = build_component("unet", TINY)
    assert all_meta(unet) and unet.config.cross_attention_dim == TINY.clip_dim


# ---- gen1 models ------------------------------------------------------------------------------------------


def expected_status(spec: str) -> str:
    from gen1.weights import WeightsNotFoundError, resolve_spec

    try:
        resolve_spec(spec)
        return "present"
    except WeightsNotFoundError:
        return "missing"


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("component"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_models_command_sd15(capsys):
    assert main(["models", "--models", "sd15"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "models: sd15"
    assert "TINY" not in out
    rows = table_rows(out)
    assert set(rows) == set(COMPONENTS)
    assert rows["unet"][1] == "diffusers.UNet2DConditionModel" and rows["unet"][-1] == "859,520,964"
    assert rows["vae"][-1] == "83,653,863"
    assert rows["clip"][1] == "open_clip.CLIP" and rows["clip"][-1] == "427,616,513"
    assert (
        rows["video_unet"][1] == "gen1.VideoUNet" and rows["video_unet"][-1] == f"{SD15_VIDEO_UNET_PARAMS:,}"
    )
    for component in ("vae", "unet", "clip", "depth", "caption", "prior"):
        spec = getattr(SD15, component)
        assert rows[component][2] == spec
        status = expected_status(spec)
        assert rows[component][-2] == status
        if status == "missing":  # the hint of WeightsNotFoundError follows the table
            assert f"{component}: missing: " in out and spec in out.split("\n\n", 1)[1]


def test_models_command_sdiv(capsys):
    from gen1.config import SDIV

    assert main(["models", "--models", "sdiv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["models: sdiv", "content embedding: squash, no antialias, raw norm (CLIP 768-d)"]
    rows = table_rows(out)
    assert set(rows) == set(COMPONENTS)
    assert rows["unet"][2] == "hf:lambdalabs/sd-image-variations-diffusers@v2.0/unet"
    assert rows["unet"][-1] == "859,520,964"  # SD 1.5's UNet architecture, fine-tuned
    assert rows["video_unet"][-1] == f"{SD15_VIDEO_UNET_PARAMS:,}"
    for component in ("vae", "unet", "clip", "depth", "caption", "prior"):
        spec = getattr(SDIV, component)
        assert rows[component][2] == spec and rows[component][-2] == expected_status(spec)
    if expected_status(SDIV.unet) == "missing":
        assert "hf download lambdalabs/sd-image-variations-diffusers --revision v2.0" in out


def test_models_command_reports_a_missing_local_directory(tmp_path, capsys):
    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"base: sd15\ndepth: {tmp_path / 'no-such-dpt'}\n")
    assert main(["models", "--models", str(cfg)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["depth"][-2] == "missing" and rows["depth"][-1] == "343,030,465"
    assert "depth: missing: " in out and str(tmp_path / "no-such-dpt") in out


def test_models_command_bad_preset(capsys):
    assert main(["models", "--models", "sd99"]) == EXIT_BAD_INPUT
    assert "neither a preset" in capsys.readouterr().err


def test_models_command_tiny(capsys):
    assert main(["models", "--models", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "models: tiny (TINY RANDOM MODELS - not real results)"
    assert "TINY RANDOM MODELS of the real classes" in out
    rows = table_rows(out)
    assert set(rows) == set(COMPONENTS)
    for component, cells in rows.items():
        assert cells[-2] == "tiny", component
        assert int(cells[-1].replace(",", "")) > 0, component
    assert rows["unet"][1] == "diffusers.UNet2DConditionModel"
