"""Weight specs (local dir, file://, memory://, s3://, HF cache, tiny:) and the tiny models' save/load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import safetensors.torch
import torch

from gen1 import tiny, weights
from gen1.config import COMPONENTS, TINY
from gen1.destinations import UnsafeDestinationError
from gen1.weights import WeightsNotFoundError, WeightSpecError, resolve_spec

LOADERS = {
    "vae": weights.load_vae,
    "unet": weights.load_image_unet,
    "clip": lambda spec: weights.load_clip_model(spec)[0],
    "depth": lambda spec: weights.load_depth_model(spec)[0],
    "caption": lambda spec: weights.load_caption_model(spec)[0],
    "prior": weights.load_prior,
}


def fixed_outputs(component: str, model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's outputs on a fixed input (deterministic, CPU)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if component == "vae":
            x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
            z = model.encode(x).latent_dist.mean
            return [z, model.decode(z).sample]
        if component == "unet":
            x = torch.randn(2, 4, 8, 8, generator=g)
            ctx = torch.randn(2, 3, TINY.clip_dim, generator=g)
            return [model(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample]
        if component == "clip":
            import open_clip

            image = torch.randn(2, 3, 32, 32, generator=g)
            text = open_clip.get_tokenizer("ViT-B-32")(["a dog", "a red car at night"])
            return [model.encode_image(image), model.encode_text(text)]
        if component == "depth":
            return [model(pixel_values=torch.randn(2, 3, 64, 64, generator=g)).predicted_depth]
        if component == "caption":
            pixels = torch.randn(2, 3, 32, 32, generator=g)
            ids = model.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
            return [ids, model(pixel_values=pixels, input_ids=ids).logits]
        if component == "prior":
            d = TINY.clip_dim
            out = model(
                torch.randn(2, d, generator=g),
                timestep=torch.tensor([3, 700]),
                proj_embedding=torch.randn(2, d, generator=g),
                encoder_hidden_states=torch.randn(2, 77, d, generator=g),
                attention_mask=torch.arange(77)[None] < torch.tensor([[5], [9]]),
            )
            return [out.predicted_image_embedding]
    raise AssertionError(component)


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert torch.equal(x, y), (x - y).abs().max()


def state_dicts(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: safetensors.torch.load_file(p) for p in sorted(directory.rglob("*.safetensors"))}


def model_output(spec: str) -> torch.Tensor:
    return fixed_outputs("prior", weights.load_prior(spec))[0]


# ---- tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_tiny_model_round_trips_through_save_and_its_loader(component, tmp_path):
    built = tiny.build_tiny_model(component, tmp_path / component)
    loaded = LOADERS[component](str(tmp_path / component))
    assert type(loaded) is type(built)
    assert_same_outputs(fixed_outputs(component, built), fixed_outputs(component, loaded))


def test_tiny_builds_are_deterministic_and_leave_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for component in COMPONENTS:
        a = state_dicts(tiny.build_tiny(component, tmp_path / "a" / component))
        b = state_dicts(tiny.build_tiny(component, tmp_path / "b" / component))
        assert a and a.keys() == b.keys(), component
        for name in a:
            assert a[name].keys() == b[name].keys()
            assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), (component, name)
    assert torch.equal(torch.rand(3), expected_next)


def test_tiny_models_match_the_tiny_preset(tiny_models):
    assert set(tiny_models) == set(COMPONENTS)
    assert all(p.parent == tiny.tiny_root() for p in tiny_models.values())
    unet = weights.load_image_unet(TINY.unet)
    assert unet.config.cross_attention_dim == TINY.clip_dim
    vae = weights.load_vae(TINY.vae)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    z = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert z.shape == (1, 4, 8, 6)  # 8x spatial downsampling like SD's VAE
    prior = weights.load_prior(TINY.prior)
    assert prior.config.embedding_dim == TINY.clip_dim and prior.config.num_embeddings == 77
    assert (tiny_models["prior"] / "scheduler" / "scheduler_config.json").is_file()
    clip, tokenizer = weights.load_clip_model(TINY.clip)
    assert clip.visual.output_dim == TINY.clip_dim
    assert tuple(tokenizer(["a dog"]).shape) == (1, 77)


def test_tiny_caption_model_generates_text_offline(tiny_models):
    model, processor = weights.load_caption_model("tiny:caption")
    assert processor.tokenizer.tokenize("a dog running zq") == ["a", "dog", "running", "z", "##q"]
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    inputs = processor(images=[image], text=["a video of"], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert text.startswith("a video of ") and len(text.split()) > 3


def test_ensure_tiny_builds_once_with_concurrent_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN1_TINY_DIR", str(tmp_path / "tiny"))
    calls = []
    real_build = tiny.build_tiny

    def counting_build(component, out_dir, scale="tiny"):
        calls.append(component)
        return real_build(component, out_dir, scale)

    monkeypatch.setattr(tiny, "build_tiny", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny("prior"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["prior"]
    assert results == [tmp_path / "tiny" / "prior"] * 4
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")) == ["prior"]
    # the mini scale builds beside it, under its own name, from its own config; mini: specs resolve to it
    assert tiny.ensure_tiny("vae", "mini") == tmp_path / "tiny" / "mini-vae" == resolve_spec("mini:vae")
    assert calls == ["prior", "vae"]
    with pytest.raises(ValueError, match="unknown scale"):
        tiny.ensure_tiny("vae", "huge")
    assert tiny.ensure_tiny("prior") == results[0] and calls == ["prior", "vae"]


def test_ensure_tiny_rebuilds_an_outdated_build(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN1_TINY_DIR", str(tmp_path))
    path = tiny.ensure_tiny("prior")
    marker = json.loads((path / tiny.MARKER).read_text())
    (path / tiny.MARKER).write_text(json.dumps({**marker, "version": tiny.TINY_VERSION - 1}))
    (path / "stale.txt").write_text("from an older builder")
    assert tiny.ensure_tiny("prior") == path
    assert not (path / "stale.txt").exists()
    assert json.loads((path / tiny.MARKER).read_text())["version"] == tiny.TINY_VERSION


# ---- local directories and file:// ---------------------------------------------------------------------


def test_local_directory_and_file_uri_resolve_in_place(tiny_models, tmp_path):
    src = tmp_path / "my-prior"
    shutil.copytree(tiny_models["prior"], src)
    assert resolve_spec(str(src)) == src.resolve()
    assert resolve_spec(src.as_uri()) == src.resolve()
    assert_same_outputs([model_output(str(src))], [model_output("tiny:prior")])


def test_missing_local_directory_names_spec_paths_and_remedy(tmp_path):
    spec = str(tmp_path / "nowhere" / "dpt-large")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_spec(spec, component="depth")
    message = str(info.value)
    assert repr(spec) in message and "no such directory" in message
    assert "--models my.yaml with `depth: /path/to/dpt-large`" in message
    assert info.value.spec == spec and info.value.tried and spec in info.value.tried[0]


def test_loader_rejects_a_directory_of_the_wrong_kind(tiny_models):
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        weights.load_clip_model(str(tiny_models["vae"]))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("foo://bucket/model", "unknown URI scheme 'foo'"),
        ("hf://org/name", "write hf:<org>/<name>"),
        ("tiny:text_encoder", "unknown tiny component 'text_encoder'"),
        ("mini:sd-depth", "unknown mini component 'sd-depth'"),  # the editors' components are tiny only
        ("hf:onlyorg", "expected hf:<org>/<name>"),
        ("", "empty weight spec"),
    ],
)
def test_malformed_specs_are_rejected_clearly(spec, expected):
    with pytest.raises(WeightSpecError, match=expected.replace("(", r"\(")) as info:
        resolve_spec(spec)
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeightsNotFoundError)


# ---- fsspec URIs ---------------------------------------------------------------------------------------


def upload(fs, local: Path, remote: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{remote}/{f.relative_to(local).as_posix()}", f.read_bytes())


def test_memory_uri_downloads_once_into_the_cache(tiny_models, tmp_path):
    fs = fsspec.filesystem("memory")
    uri = f"memory://models-{uuid.uuid4().hex}/prior"
    upload(fs, tiny_models["prior"], uri)
    cache = tmp_path / "cache"
    first = resolve_spec(uri, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("prior-")
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == sorted(
        p.relative_to(tiny_models["prior"]) for p in tiny_models["prior"].rglob("*")
    )
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary directory left behind
    fs.rm(uri, recursive=True)  # the second call must not need the source any more
    assert resolve_spec(uri, cache_dir=cache) == first


def test_memory_uri_cache_defaults_to_gen1_cache_dir(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GEN1_CACHE_DIR", str(tmp_path / "gen1-cache"))
    uri = f"memory://models-{uuid.uuid4().hex}/prior/"
    upload(fsspec.filesystem("memory"), tiny_models["prior"], uri.rstrip("/"))
    path = resolve_spec(uri)
    assert path.parent == tmp_path / "gen1-cache"
    assert_same_outputs([model_output(uri)], [model_output("tiny:prior")])


def test_missing_memory_uri_names_the_uri_and_the_cache(tmp_path):
    uri = f"memory://models-{uuid.uuid4().hex}/dpt-large"
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_spec(uri, cache_dir=tmp_path, component="depth")
    message = str(info.value)
    assert repr(uri) in message and str(tmp_path) in message and "no such directory" in message
    assert not any(tmp_path.iterdir())


def test_a_key_leaving_the_download_directory_is_refused_before_anything_is_copied(tmp_path):
    """Issue 17, item 6: an object key with ``../`` under a weight directory is not written outside the cache."""
    fs = fsspec.filesystem("memory")
    uri = f"memory://models-{uuid.uuid4().hex}/depth"
    fs.pipe_file(f"{uri}/config.json", b"{}")
    fs.pipe_file(f"{uri}/../../escaped.txt", b"written outside")
    cache = tmp_path / "a" / "cache"
    with pytest.raises(UnsafeDestinationError, match=r"refusing to download .*\.\./\.\./escaped\.txt"):
        resolve_spec(uri, cache_dir=cache, component="depth")
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("config.json"))
    assert list(cache.iterdir()) == []  # the temporary download directory is gone too
    fs.rm(uri.rsplit("/", 1)[0], recursive=True)


def test_s3_uri_loads_and_second_load_hits_the_cache(tiny_models, s3_endpoint):
    import s3fs

    bucket = s3_endpoint.make_bucket(f"weights-{uuid.uuid4().hex[:8]}")
    uri = f"{bucket}/models/tiny-prior"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint.endpoint_url, skip_instance_cache=True)
    upload(fs, tiny_models["prior"], uri)
    expected = model_output("tiny:prior")
    assert_same_outputs([model_output(uri)], [expected])
    cached = resolve_spec(uri)
    assert cached.parent == Path(os.environ["GEN1_CACHE_DIR"])
    fs.rm(uri, recursive=True)
    assert not fs.exists(uri)
    assert_same_outputs([model_output(uri)], [expected])  # served from the cache
    assert resolve_spec(uri) == cached


# ---- Hugging Face cache --------------------------------------------------------------------------------


def fake_hf_cache(root: Path, repo_id: str, files: dict[str, Path], ref: bool = True) -> Path:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<hash>/...}; returns the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for sub, src in files.items():
        shutil.copytree(src, snapshot / sub if sub else snapshot, dirs_exist_ok=True)
    if ref:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (records it, for the assertion)."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the code, not the environment, must keep it offline
    return attempts


def test_hf_spec_resolves_in_the_local_cache_with_subfolder(tiny_models, tmp_path, monkeypatch, no_network):
    snapshot = fake_hf_cache(tmp_path / "hub", "acme/tiny-sd", {"unet": tiny_models["unet"], "vae": tiny_models["vae"]})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_spec("hf:acme/tiny-sd/unet") == snapshot / "unet"
    unet = weights.load_image_unet("hf:acme/tiny-sd/unet")
    assert_same_outputs(fixed_outputs("unet", unet), fixed_outputs("unet", weights.load_image_unet("tiny:unet")))
    assert no_network == []


def test_hf_spec_honours_hf_home_and_a_cache_without_refs(tiny_models, tmp_path, monkeypatch, no_network):
    snapshot = fake_hf_cache(tmp_path / "home" / "hub", "acme/prior", {"": tiny_models["prior"]}, ref=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_spec("hf:acme/prior") == snapshot
    assert no_network == []


def test_hf_spec_pins_a_revision_and_never_falls_back_to_another_snapshot(tiny_models, tmp_path, monkeypatch,
                                                                         no_network):
    snapshot = fake_hf_cache(tmp_path / "hub", "acme/tiny-sd", {"unet": tiny_models["unet"]})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "models--acme--tiny-sd" / "refs"
    (refs / "v2.0").write_text(snapshot.name)  # a tag, as `hf download acme/tiny-sd --revision v2.0` leaves it
    assert weights.parse_hf_spec("hf:acme/tiny-sd@v2.0/unet") == ("acme/tiny-sd", "v2.0", "unet")
    assert resolve_spec("hf:acme/tiny-sd@v2.0/unet") == snapshot / "unet"
    assert resolve_spec(f"hf:acme/tiny-sd@{snapshot.name}/unet") == snapshot / "unet"  # a commit hash
    (refs / "main").unlink()  # unpinned specs may fall back to any snapshot; pinned ones must not
    assert resolve_spec("hf:acme/tiny-sd/unet") == snapshot / "unet"
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_spec("hf:acme/tiny-sd@v1.0/unet", component="unet")
    assert "revision 'v1.0'" in str(info.value) and "hf download acme/tiny-sd --revision v1.0" in str(info.value)
    with pytest.raises(WeightSpecError, match="revision"):
        resolve_spec("hf:acme/tiny-sd@/unet")
    assert no_network == []


def test_missing_hf_spec_names_spec_paths_and_how_to_get_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_spec("hf:Intel/dpt-large", component="depth")
    message = str(info.value)
    assert "'hf:Intel/dpt-large'" in message
    assert str(tmp_path / "hub" / "models--Intel--dpt-large") in message
    assert "`hf download Intel/dpt-large`" in message and "huggingface-cli download Intel/dpt-large" in message
    assert "`depth: /path/to/dpt-large`" in message
    assert no_network == []


def test_hf_spec_with_a_missing_subfolder_lists_the_snapshot_path(tiny_models, tmp_path, monkeypatch):
    snapshot = fake_hf_cache(tmp_path / "hub", "acme/tiny-sd", {"unet": tiny_models["unet"]})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError, match="missing or empty") as info:
        resolve_spec("hf:acme/tiny-sd/vae")
    assert str(snapshot / "vae") in str(info.value)


def test_openai_clip_repo_gets_quick_gelu_from_open_clips_registry(tiny_models, tmp_path, monkeypatch):
    from open_clip.transformer import QuickGELU

    repo = "timm/vit_large_patch14_clip_224.openai"
    snapshot = fake_hf_cache(tmp_path / "hub", repo, {"": tiny_models["clip"]})
    config = json.loads((snapshot / "open_clip_config.json").read_text())
    del config["model_cfg"]["quick_gelu"]  # as the hub repo's config may not say it
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    model, _ = weights.load_clip_model(f"hf:{repo}")
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain, _ = weights.load_clip_model(str(snapshot))  # a plain directory: the config decides
    assert not isinstance(plain.transformer.resblocks[0].mlp.gelu, QuickGELU)
