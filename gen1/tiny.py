"""Tiny random-initialised models of the real classes, for tests and the demo (``tiny:<component>`` specs).

Each builder makes the same class the full-size preset uses (diffusers ``AutoencoderKL``,
``UNet2DConditionModel``, ``PriorTransformer``; transformers ``DPTForDepthEstimation``,
``BlipForConditionalGeneration``; open_clip ``CLIP``) from its config in ``gen1.config.COMPONENT_CONFIGS[scale]``
(``scale`` "tiny", or "mini" for ``mini:<component>`` specs: the CPU-trainable miniature's VAE and UNet)
with a fixed seed, and saves it with that library's own
save function, so a tiny model is loaded back through exactly the loaders of `gen1.weights`. Nothing here
is downloaded: the BLIP tokenizer is built from a small vocabulary written here, CLIP uses open_clip's
bundled BPE tokenizer. The public editors' tiny components (`gen1.tiny_editors`) are registered
here too.

`ensure_tiny` builds each component of a scale at most once per ``tiny_root()``, also across processes: under a file
lock, into a temporary directory that is renamed into place when complete (with a marker file last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from gen1.config import COMPONENT_CONFIGS, COMPONENTS, TINY_DPT_PROCESSOR
from gen1.tiny_editors import EDITOR_BUILDERS

log = logging.getLogger(__name__)

TINY_SEED = 0
# Bump when a builder changes: directories built by an older version are rebuilt.
TINY_VERSION = 1
MARKER = "gen1_tiny.json"
LOCK_TIMEOUT_S = 600.0

# OpenAI CLIP normalisation (BLIP uses it too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BOS_TOKEN = "[DEC]"  # BLIP's decoder start token, as in Salesforce/blip-image-captioning-*
WORDS = """
a an the of in on at to from with and or is are was be it this that there these those its his her their
my your our as by for into over under near behind above below between through up down out off
man woman person people boy girl child children kid baby men women player crowd
dog cat horse bird cow sheep fish bear elephant giraffe zebra duck animal animals
car truck bus train bike bicycle motorcycle boat plane airplane road street street sign traffic light
tree trees grass field flower flowers water river lake sea ocean beach sand snow mountain mountains hill
sky cloud clouds sun rain city building buildings house room kitchen table chair bed couch window door wall
floor park garden forest desert sunset night day light dark
red blue green yellow white black brown orange pink purple gray grey gold silver colorful
big small large little tall long short old young new wet dry bright
sitting standing walking running riding playing holding looking eating flying swimming driving jumping
dancing smiling talking wearing carrying sleeping parked covered filled
shirt hat jacket dress glasses umbrella ball frisbee kite surfboard skateboard skis phone bag
video image picture photo painting drawing close view front side top back group couple pair
one two three four five several many some other together next
""".split()


def tiny_root() -> Path:
    """``$GEN1_TINY_DIR`` or ``~/.cache/gen1/tiny``."""
    return Path(os.environ.get("GEN1_TINY_DIR") or "~/.cache/gen1/tiny").expanduser()


# ---- builders: each saves one component into out_dir ----------------------------------------------------


def _build_vae(out: Path, configs: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**configs["vae"])
    model.save_pretrained(out)
    return model


def _build_unet(out: Path, configs: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**configs["unet"])
    model.save_pretrained(out)
    return model


def _build_prior(out: Path, configs: dict) -> torch.nn.Module:
    from diffusers import PriorTransformer

    from gen1.schedule import PRIOR_SCHEDULER_SUBFOLDER, karlo_scheduler  # diffusers: only the prior needs it

    model = PriorTransformer(**configs["prior"])
    with torch.no_grad():  # identity normalisation: a well-formed prior (a fresh one has clip_std == 0)
        model.clip_mean.zero_()
        model.clip_std.fill_(1.0)
    model.save_pretrained(out)
    karlo_scheduler().save_pretrained(out / PRIOR_SCHEDULER_SUBFOLDER)
    return model


def _build_clip(out: Path, configs: dict) -> torch.nn.Module:
    import safetensors.torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.model import CLIP, set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transform import PreprocessCfg

    config = configs["clip"]
    model = CLIP(**config)
    set_model_preprocess_cfg(model, vars(PreprocessCfg(size=config["vision_cfg"]["image_size"])))
    # open_clip's save_for_hf minus the tokenizer (the bundled SimpleTokenizer has nothing to save).
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / HF_SAFE_WEIGHTS_NAME))
    save_config_for_hf(model, out / HF_CONFIG_NAME, model_config=config)
    return model


def _build_depth(out: Path, configs: dict) -> torch.nn.Module:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation(DPTConfig(**configs["depth"]))
    # transformers' init (normal, std 0.02) shrinks the signal ~1e4-fold through the neck and head, so a
    # random tiny DPT predicts a constant. PyTorch's default conv init keeps it alive; the head ends in a
    # ReLU, so its last conv gets a positive bias (no pixel stuck at 0) and a larger gain (the output varies
    # visibly, also in fp16).
    with torch.no_grad():
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                module.reset_parameters()
        last = model.head.head[-2]
        last.weight.mul_(10.0)
        last.bias.fill_(0.5)
    model.save_pretrained(out)
    DPTImageProcessor(**TINY_DPT_PROCESSOR).save_pretrained(out)
    return model


def blip_vocab() -> list[str]:
    """Special tokens, BLIP's [DEC], whole words, then single characters and their '##' continuations
    (so any lowercase ASCII text tokenizes without [UNK])."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-:;()")
    vocab = SPECIAL_TOKENS + [BOS_TOKEN]
    for token in list(dict.fromkeys(WORDS)) + chars + [f"##{c}" for c in chars]:
        if token not in vocab:
            vocab.append(token)
    return vocab


def _build_caption(out: Path, configs: dict) -> torch.nn.Module:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = blip_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token=BOS_TOKEN, model_max_length=64)
    ids = {t: i for i, t in enumerate(vocab)}
    arch = configs["caption"]
    text_cfg = dict(
        arch["text_config"],
        vocab_size=len(vocab),
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
    )
    model = BlipForConditionalGeneration(BlipConfig(**{**arch, "text_config": text_cfg}))
    model.save_pretrained(out)
    size = arch["vision_config"]["image_size"]
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return model


BUILDERS: dict[str, Callable[[Path, dict], torch.nn.Module]] = {
    "vae": _build_vae,
    "unet": _build_unet,
    "clip": _build_clip,
    "depth": _build_depth,
    "caption": _build_caption,
    "prior": _build_prior,
}
assert set(BUILDERS) == set(COMPONENTS)
# The public editors' components (`gen1.editors`), built the same way: ``tiny:sd-depth`` etc.
BUILDERS.update(EDITOR_BUILDERS)


SCALES = ("tiny", "mini")  # COMPONENT_CONFIGS keys with random-initialised builds (spec prefixes tiny:, mini:)


def _check_component(component: str, scale: str = "tiny") -> None:
    if component not in BUILDERS:
        raise ValueError(f"unknown tiny component {component!r}; expected one of {', '.join(BUILDERS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    if scale != "tiny" and component not in COMPONENTS:
        raise ValueError(f"{component!r} has no {scale} scale: the editors' components are tiny only")


def build_tiny_model(component: str, out_dir: Path, scale: str = "tiny") -> torch.nn.Module:
    """Build ``component`` of ``scale`` with seed ``TINY_SEED``, save it into ``out_dir`` and return the
    in-memory model (the one that was saved; tests compare it with what the loaders read back).

    Deterministic: the same seed gives identical weights. The global RNG state is left untouched.
    """
    _check_component(component, scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = BUILDERS[component](out_dir, COMPONENT_CONFIGS[scale])
    marker = {"component": component, "scale": scale, "version": TINY_VERSION, "seed": TINY_SEED, "pid": os.getpid()}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2))  # last: a complete build
    return model.eval()


def build_tiny(component: str, out_dir: Path, scale: str = "tiny") -> Path:
    """Build ``component`` of ``scale`` (see `build_tiny_model`) into ``out_dir``; return ``out_dir``."""
    build_tiny_model(component, out_dir, scale)
    return Path(out_dir)


def _is_current(path: Path, component: str, scale: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("component") == component and marker.get("version") == TINY_VERSION
            and marker.get("scale", "tiny") == scale)


def ensure_tiny(component: str, scale: str = "tiny") -> Path:
    """``tiny_root()/component`` (scale "mini": ``tiny_root()/mini-component``), built once (fixed seed) if
    absent or from an older builder version.

    Safe with concurrent processes: a file lock serialises builders, and each build happens in a temporary
    directory renamed into place, so a reader never sees a half-written model.
    """
    from filelock import FileLock

    _check_component(component, scale)
    root = tiny_root()
    name = component if scale == "tiny" else f"{scale}-{component}"
    target = root / name
    if _is_current(target, component, scale):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock"), timeout=LOCK_TIMEOUT_S):
        if _is_current(target, component, scale):  # built by another process while we waited
            return target
        log.info("building %s %s model in %s", scale, component, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build_tiny(component, tmp, scale)
            if target.exists():  # an older version: replace it
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                target.rename(old / name)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
