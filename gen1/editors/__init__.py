"""Pluggable video editors, one module each: Gen-1 (ours, `gen1.sampling.edit_video`), and diffusers'
public pipelines for comparison: ``sd-depth`` (the paper's SD-Depth baseline, Stable Diffusion 2 depth per
frame), ``animatediff-depth`` (SD 1.5 + AnimateDiff motion module + ControlNet depth, video to video) and
``wan-vace`` (Wan 2.1 VACE, depth-guided video with reference images and masks). Every editor follows the
depth of our DPT stage (`gen1.depth.DepthEstimator`), so the structure signal is the same for all.

`EDITORS` maps each name to its class (`gen1.editors.base.Editor`); `editor_weights` gives its weight specs.
"""

from __future__ import annotations

from collections.abc import Mapping

from gen1.config import ConfigError, ModelSpecs
from gen1.editors.animatediff import AnimateDiffDepthEditor
from gen1.editors.base import SETTINGS, Editor, EditorOutput, EditorSettings, check_settings
from gen1.editors.gen1 import Gen1Editor
from gen1.editors.sd_depth import SDDepthEditor
from gen1.editors.wan_vace import WanVACEEditor

EDITORS: dict[str, type[Editor]] = {
    e.name: e for e in (Gen1Editor, SDDepthEditor, AnimateDiffDepthEditor, WanVACEEditor)
}
DEFAULT_EDITOR = "gen1"


def editor_class(name: str) -> type[Editor]:
    """The editor named ``name``; `ConfigError` naming the choices otherwise."""
    if name not in EDITORS:
        raise ConfigError(f"editor: expected one of {', '.join(EDITORS)}, found {name!r}")
    return EDITORS[name]


def editor_weights(name: str, specs: ModelSpecs, overrides: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """Role -> weight spec of editor ``name``: its tiny components when ``specs`` is a tiny preset, else its
    full-size ones, with ``overrides[name]`` (a job's ``editor_weights``) on top. Gen-1's are the preset's."""
    cls = editor_class(name)
    if cls is Gen1Editor:
        return {c: getattr(specs, c) for c in cls.weights}
    given = dict((overrides or {}).get(name) or {})
    unknown = set(given) - set(cls.weights)
    if unknown:
        raise ConfigError(f"editor_weights {name}: unknown roles {sorted(unknown)}; expected some of {sorted(cls.weights)}")
    return {**(cls.tiny_weights if specs.is_tiny else cls.weights), **given}


__all__ = [
    "DEFAULT_EDITOR",
    "EDITORS",
    "SETTINGS",
    "Editor",
    "EditorOutput",
    "EditorSettings",
    "Gen1Editor",
    "check_settings",
    "editor_class",
    "editor_weights",
]
