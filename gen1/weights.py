"""Resolve weight specs to local directories and load each model family from them, never over the network.

A spec (see `gen1.config`) is one of

- ``hf:<org>/<name>[@<revision>][/<subfolder>]``: a snapshot in the local Hugging Face cache
  (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), looked up with
  ``local_files_only=True``: ``main`` or the pinned revision (tag, branch or commit hash);
- a local directory (``~`` expanded) or a ``file://`` URI, used in place;
- any other fsspec URI (``s3://bucket/models/dpt-large``, ``memory://...``): the directory is downloaded
  once into ``$GEN1_CACHE_DIR`` (default ``~/.cache/gen1/weights``) under a name derived from the URI,
  atomically (into a temporary directory that is then renamed), and reused by every later call;
- ``tiny:<component>``: a tiny random model of the real class, built once by `gen1.tiny.ensure_tiny`;
  ``mini:<component>`` the same at the "mini" scale (a CPU-trainable VAE and UNet).

A spec that resolves to nothing raises `WeightsNotFoundError` naming the spec, every location tried and
how to provide the weights. The loaders call each library's own ``from_pretrained`` (diffusers,
transformers; open_clip's ``local-dir:`` loader for CLIP) on the resolved directory with
``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen1.config import COMPONENTS
from gen1.destinations import destination
from gen1.tiny import BUILDERS as TINY_BUILDERS
from gen1.tiny import ensure_tiny
from gen1.urls import redact_url

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PriorTransformer, UNet2DConditionModel
    from open_clip import CLIP
    from transformers import (
        BlipForConditionalGeneration,
        BlipProcessor,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TINY_PREFIX = "tiny:"
MINI_PREFIX = "mini:"  # random models of the "mini" scale (gen1.tiny), for the CPU-trained miniature
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Example directory names for the "how to provide it" hint, by component.
EXAMPLE_NAMES = {
    "vae": "sd15-vae",
    "unet": "sd15-unet",
    "clip": "vit-l-14-openai",
    "depth": "dpt-large",
    "caption": "blip-caption-base",
    "prior": "karlo-prior",
    # the public editors' (gen1.editors)
    "sd-depth": "stable-diffusion-2-depth",
    "base": "stable-diffusion-v1-5",
    "motion_adapter": "animatediff-motion-adapter-v1-5-2",
    "controlnet": "control_v11f1p_sd15_depth",
    "wan-vace": "Wan2.1-VACE-1.3B-diffusers",
}


class WeightsNotFoundError(FileNotFoundError):
    """Weights named by a spec are not where the spec points.

    ``str(err)`` names the spec, every location tried and how to provide the weights; ``spec`` and
    ``tried`` hold the same facts for programs.
    """

    def __init__(self, message: str, spec: str | None = None, tried: Sequence[str] = ()):
        super().__init__(message)
        self.spec = spec
        self.tried = list(tried)

    def __str__(self) -> str:
        return str(self.args[0])


class WeightSpecError(WeightsNotFoundError, ValueError):
    """A spec that is malformed (unknown URI scheme, unknown tiny component, empty repo id)."""


# ---- locations ------------------------------------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, read from the environment *now*
    (huggingface_hub reads it once at import, so a later ``HF_HUB_CACHE`` would otherwise be ignored)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def weights_cache_dir() -> Path:
    """Where fsspec URIs are downloaded: ``$GEN1_CACHE_DIR``, default ``~/.cache/gen1/weights``."""
    return Path(os.environ.get("GEN1_CACHE_DIR") or "~/.cache/gen1/weights").expanduser()


def uri_cache_name(uri: str) -> str:
    """A stable directory name for ``uri``: its last path part (readable) plus a sha256 prefix (unique)."""
    uri = uri.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in posixpath.basename(uri))[:48] or "weights"
    return f"{base}-{digest}"


def _how_to_provide(spec: str, component: str | None) -> str:
    key = component or "<component>"
    if "." in key:  # an editor's role (gen1.editors): set in the job's editor_weights
        editor, role = key.split(".", 1)
        name = EXAMPLE_NAMES.get(role if role != "pipeline" else editor, "weights")
        lines = [f"  - point the spec at a directory or fsspec URI holding them, e.g. in the job's --config YAML "
                 f"`editor_weights: {{{editor}: {{{role}: /path/to/{name}}}}}`;"]
    else:
        name = EXAMPLE_NAMES.get(key, "weights")
        lines = [
            f"  - point the spec at a directory or fsspec URI holding them, e.g. pass --models my.yaml with "
            f"`{key}: /path/to/{name}` (or `{key}: s3://bucket/models/{name}`);",
        ]
    if spec.startswith(HF_PREFIX):
        repo_id, revision, _ = parse_hf_spec(spec)
        cache = hf_hub_cache()
        args = f"{repo_id} --revision {revision}" if revision else repo_id
        lines.append(
            f"  - or, on a machine with network, `hf download {args}` (`huggingface-cli download {args}` "
            f"with huggingface_hub < 1.0), then copy its cache folder models--{repo_id.replace('/', '--')} into "
            f"{cache} (or set HF_HUB_CACHE / HF_HOME to a cache that has it);"
        )
    lines.append("  - or use the tiny random models for a smoke test: --models tiny.")
    return "\n".join(lines)


def _not_found(spec: str, tried: Sequence[str], component: str | None) -> WeightsNotFoundError:
    label = f"{component} weights" if component else "weights"
    message = (
        f"{label} for {spec!r} not found; tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\nhow to provide them:\n"
        + _how_to_provide(spec, component)
    )
    return WeightsNotFoundError(message, spec=spec, tried=tried)


# ---- resolving -------------------------------------------------------------------------------------------


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:org/name[@revision][/sub/folder]`` -> (``org/name``, ``revision`` or None, ``sub/folder`` or None)."""
    parts = [p for p in spec[len(HF_PREFIX) :].strip("/").split("/") if p]
    name, _, revision = parts[1].partition("@") if len(parts) >= 2 else ("", "", "")
    if len(parts) < 2 or not name or (revision == "" and "@" in parts[1]):
        raise WeightSpecError(
            f"weight spec {spec!r}: expected hf:<org>/<name>[@<revision>][/<subfolder>], e.g. hf:Intel/dpt-large",
            spec=spec,
        )
    return f"{parts[0]}/{name}", (revision or None), ("/".join(parts[2:]) or None)


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def resolve_hf(spec: str, component: str | None = None) -> Path:
    """A ``hf:`` spec -> the snapshot (sub)directory in the local HF cache; never touches the network.

    Without ``@revision`` the cache's ``main``, else (a copied cache may lack refs/main) its newest snapshot;
    with one, that revision only (a tag or branch through ``refs/``, a commit hash by its snapshot).
    """
    from huggingface_hub import snapshot_download

    repo_id, revision, subfolder = parse_hf_spec(spec)
    cache = hf_hub_cache()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots: list[Path] = []
    reasons: dict[Path, str] = {}
    try:
        snapshots.append(
            Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        )
    except Exception as err:  # huggingface_hub raises several types for "not in the cache"
        reasons[repo_dir] = f"no snapshot for revision {revision or 'main'!r}: {type(err).__name__}"
        if revision is None:
            # A copied cache may lack refs/main: any snapshot of the repo will do, newest first.
            found = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                log.warning("%s: refs/main missing in %s; using snapshot %s", spec, repo_dir, found[0].name)
            snapshots += found
    tried = []
    for snapshot in snapshots:
        path = snapshot / subfolder if subfolder else snapshot
        if _non_empty_dir(path):
            log.info("%s -> %s", spec, path)
            return path
        tried.append(f"HF cache {path} (missing or empty)")
    tried += [f"HF cache {p} ({why})" for p, why in reasons.items()]
    raise _not_found(spec, tried, component)


def resolve_local(spec: str, component: str | None = None) -> Path:
    path = Path(spec).expanduser()
    if _non_empty_dir(path):
        return path.resolve()
    why = "a file, expected a directory" if path.is_file() else "empty" if path.is_dir() else "no such directory"
    tried = [f"local directory {path.resolve()} ({why})"]
    if not path.is_absolute() and spec.count("/") in (1, 2) and not spec.startswith("."):
        tried.append(f"(not an HF repo: spec has no 'hf:' prefix; did you mean 'hf:{spec}'?)")
    raise _not_found(spec, tried, component)


def _filesystem(uri: str):
    """(fsspec filesystem, path) for ``uri``; a clear error for unknown or unusable schemes."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    if protocol == "hf":
        raise WeightSpecError(
            f"weight spec {uri!r}: hf:// would download from the Hugging Face hub; write hf:<org>/<name> to "
            "use the local HF cache (weights are never downloaded from the hub)",
            spec=uri,
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as err:
        raise WeightSpecError(
            f"weight spec {uri!r}: unknown URI scheme {protocol!r}; expected hf:<org>/<name>, tiny:<component>, "
            "a local directory or an fsspec URI (s3://, gs://, memory://, file://, ...)",
            spec=uri,
        ) from err
    except ImportError as err:
        raise WeightSpecError(
            f"weight spec {uri!r}: scheme {protocol!r} needs a package that is not installed: {err}", spec=uri
        ) from err
    return fsspec.core.url_to_fs(uri)


def _download_dir(fs, root: str, dest: Path) -> list[str]:
    """Copy every file under ``root`` on ``fs`` into ``dest`` (keeping relative paths); return them.
    `gen1.destinations.UnsafeDestinationError` before anything is copied when a key (``../``) leaves ``dest``."""
    files = sorted(fs.find(root, withdirs=False))
    rel = [posixpath.relpath(f, root) for f in files]
    targets = [destination(dest, r, source=f) for f, r in zip(files, rel, strict=True)]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    if files:
        fs.get(files, [str(t) for t in targets])
    return rel


def resolve_uri(uri: str, cache_dir: Path | None = None, component: str | None = None) -> Path:
    """An fsspec URI -> a local directory: ``file://`` in place, others downloaded once into the cache."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = _filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return resolve_local(root, component)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_dir()
    target = cache_dir / uri_cache_name(uri)
    if _non_empty_dir(target):
        log.info("%s -> cached copy %s", redact_url(uri), target)
        return target
    root = root.rstrip("/")
    if not fs.isdir(root):
        why = "a file, expected a directory" if fs.isfile(root) else "no such directory"
        raise _not_found(uri, [f"local cache {target} (absent)", f"{uri} ({why})"], component)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        files = _download_dir(fs, root, tmp)
        if not files:
            raise _not_found(uri, [f"local cache {target} (absent)", f"{uri} (empty directory)"], component)
        try:
            tmp.rename(target)
            log.info("downloaded %s (%d files) -> %s", redact_url(uri), len(files), target)
        except OSError:
            if not _non_empty_dir(target):
                raise
            log.info("%s was downloaded concurrently to %s; using that copy", redact_url(uri), target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_spec(spec: str, cache_dir: Path | None = None, component: str | None = None) -> Path:
    """A weight spec -> a local directory holding the weights.

    ``cache_dir`` overrides ``$GEN1_CACHE_DIR`` for fsspec downloads; ``component`` (e.g. ``"depth"``) only
    makes the error message's example concrete. Raises `WeightsNotFoundError` (with every location tried)
    or `WeightSpecError` (malformed spec).
    """
    spec = str(spec).strip()
    if not spec:
        raise WeightSpecError("empty weight spec; expected hf:<org>/<name>, tiny:<component>, a path or a URI")
    if spec.startswith((TINY_PREFIX, MINI_PREFIX)):
        scale, name = spec.split(":", 1)
        known = TINY_BUILDERS if scale == "tiny" else COMPONENTS  # the editors' components are tiny only
        if name not in known:
            raise WeightSpecError(
                f"weight spec {spec!r}: unknown {scale} component {name!r}; expected one of {', '.join(known)}",
                spec=spec,
            )
        return ensure_tiny(name, scale)
    if spec.startswith(HF_PREFIX) and not spec.startswith("hf://"):
        return resolve_hf(spec, component)
    if "://" in spec:
        return resolve_uri(spec, cache_dir, component)
    return resolve_local(spec, component)


# ---- loaders -----------------------------------------------------------------------------------------


def _expect_files(spec: str, path: Path, names: Sequence[str], component: str, layout: str) -> None:
    """Raise WeightsNotFoundError unless ``path`` holds at least one of ``names``."""
    if not any((path / n).is_file() for n in names):
        raise _not_found(
            spec, [f"{path} (resolved; holds none of {', '.join(names)}: not a {layout} directory)"], component
        )


def _diffusers_load(cls, spec: str, component: str, device, dtype):
    path = resolve_spec(spec, component=component)
    _expect_files(spec, path, ["config.json"], component, f"diffusers {cls.__name__}")
    model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def load_vae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return _diffusers_load(AutoencoderKL, spec, "vae", device, dtype)


def load_image_unet(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return _diffusers_load(UNet2DConditionModel, spec, "unet", device, dtype)


def load_prior(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PriorTransformer:
    from diffusers import PriorTransformer

    return _diffusers_load(PriorTransformer, spec, "prior", device, dtype)


def _transformers_load(model_cls, processor_cls, spec: str, component: str, layout: str, device, dtype):
    """(model, processor) of a transformers directory: ``model_cls`` and ``processor_cls`` from one path."""
    path = resolve_spec(spec, component=component)
    _expect_files(spec, path, ["config.json"], component, f"transformers {layout}")
    model = model_cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    processor = processor_cls.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def load_depth_model(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[DPTForDepthEstimation, DPTImageProcessor]:
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    return _transformers_load(DPTForDepthEstimation, DPTImageProcessor, spec, "depth", "DPT", device, dtype)


def load_caption_model(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return _transformers_load(BlipForConditionalGeneration, BlipProcessor, spec, "caption", "BLIP", device, dtype)


_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _registry_quick_gelu(spec: str) -> bool:
    """True when open_clip's pretrained registry says the ``hf:`` repo of ``spec`` was trained with QuickGELU.

    OpenAI's CLIP weights need QuickGELU, which the hub repos' ``open_clip_config.json`` may not record
    (open_clip keeps it in its pretrained tags); without it the model loads but computes the wrong thing.
    """
    if not spec.startswith(HF_PREFIX):
        return False
    import open_clip

    repo_id, _, _ = parse_hf_spec(spec)
    for model_name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if cfg.get("hf_hub", "").strip("/") == repo_id:
            return bool(cfg.get("quick_gelu", False))
    return False


def load_clip_model(
    spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CLIP, Any]:
    """An open_clip model and its tokenizer from a directory in the HF hub layout of open_clip:
    ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) + ``open_clip_model.safetensors`` (or
    ``open_clip_pytorch_model.bin``), as in ``timm/vit_large_patch14_clip_224.openai``."""
    import open_clip

    if dtype not in _OPEN_CLIP_PRECISION:
        raise ValueError(f"CLIP dtype must be one of {list(_OPEN_CLIP_PRECISION)}, got {dtype}")
    path = resolve_spec(spec, component="clip")
    _expect_files(spec, path, [OPEN_CLIP_CONFIG], "clip", "open_clip")
    _expect_files(spec, path, OPEN_CLIP_WEIGHTS, "clip", "open_clip")
    model_cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text()).get("model_cfg", {})
    quick_gelu = "quick_gelu" not in model_cfg and _registry_quick_gelu(spec)
    if quick_gelu:
        log.info("%s: open_clip's registry says QuickGELU; forcing it (the config does not say)", spec)
    elif "quick_gelu" not in model_cfg and "openai" in str(path).lower():
        log.warning("%s: OpenAI CLIP weights need quick_gelu: true in %s/%s", spec, path, OPEN_CLIP_CONFIG)
    model = open_clip.create_model(
        f"local-dir:{path}",
        precision=_OPEN_CLIP_PRECISION[dtype],
        device=device,
        force_quick_gelu=quick_gelu,
        require_pretrained=True,
    )
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), tokenizer
