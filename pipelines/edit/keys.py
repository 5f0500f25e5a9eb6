"""What an edit is: the settings grid (`EditGrid`), the stable keys that name an output (`edit_key`, and
`baseline_key` for the baselines of `pipelines.evaluate`), and the task rows of a run (`plan_tasks`).

A key hashes everything that determines an output's pixels, so a rerun finds the outputs already made.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gen1.config import ConfigError, ModelSpecs
from gen1.prompts import PromptSpec
from pipelines.edit.clips import EditClip

logger = logging.getLogger(__name__)

GRID_KEYS = {
    "ts": "t_s",
    "t_s": "t_s",
    "w": "w",
    "wt": "w_t",
    "w_t": "w_t",
    "seed": "seeds",
    "seeds": "seeds",
    "editor": "editor",
    "strength": "strength",
    "cn": "controlnet_scale",
    "controlnet_scale": "controlnet_scale",
}
# The grid axes that are settings an editor takes or not (`gen1.editors.base.Editor.takes`).
SETTING_AXES = ("t_s", "w", "w_t", "strength", "controlnet_scale")


@dataclass(frozen=True)
class EditGrid:
    """The settings grid: every combination of editor, t_s, w, w_t, strength, ControlNet scale and seed is one
    edit per (clip, prompt); each editor gets the combinations of the settings it takes
    (`gen1.editors`), the others left out of its edits (`editor_settings`)."""

    t_s: tuple[int, ...] = (3,)
    w: tuple[float, ...] = (7.5,)
    w_t: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    editor: tuple[str, ...] = ("gen1",)
    strength: tuple[float, ...] = (0.8,)  # SDEdit strength of the video-to-video editors
    controlnet_scale: tuple[float, ...] = (1.0,)  # depth-conditioning scale (ControlNet, VACE)

    def __post_init__(self) -> None:
        from gen1.editors import editor_class

        for name in ("t_s", "w", "w_t", "seeds", "editor", "strength", "controlnet_scale"):
            values = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"grid {name}: expected at least one value")
            cast = {"t_s": int, "seeds": int, "editor": str}.get(name, float)
            object.__setattr__(self, name, tuple(dict.fromkeys(cast(v) for v in values)))
        for name in self.editor:
            editor_class(name)
        for s in self.strength:
            if not 0.0 < s <= 1.0:
                raise ConfigError(f"grid strength: expected values in (0, 1], found {s}")

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> EditGrid:
        """``["ts=1,5", "w=7.5", "wt=1.0,1.5", "seed=0,1"]`` (one entry per ``--grid``) -> EditGrid; unnamed
        keys keep defaults; a key named twice is an error (its values go in one entry, comma-separated)."""
        values: dict[str, list[str]] = {}
        for item in items or ():
            key, sep, vals = item.partition("=")
            name = GRID_KEYS.get(key.strip().lower())
            if not sep or name is None or not vals.strip():
                raise ConfigError(f"grid entry {item!r}: expected KEY=V1,V2,... with KEY in ts, w, wt, seed, "
                                  "editor, strength, cn")
            if name in values:
                raise ConfigError(f"grid entry {item!r}: {key.strip()} is given twice; list its values in one "
                                  f"entry, e.g. {key.strip()}=1,5")
            values[name] = [v.strip() for v in vals.split(",") if v.strip()]
        try:
            return cls(**values)
        except ValueError as e:
            raise ConfigError(f"grid {list(items or ())}: {e}") from e

    def combinations(self) -> list[tuple[int, float, float, int]]:
        """(t_s, w, w_t, seed) tuples, in a stable order."""
        return list(itertools.product(self.t_s, self.w, self.w_t, self.seeds))

    def editor_settings(self, editor: str) -> list[dict[str, Any]]:
        """The distinct settings of ``editor``'s edits, in a stable order: dicts of every `SETTING_AXES` name
        (None where the editor does not take it) and ``seed``."""
        from gen1.editors import editor_class

        takes = editor_class(editor).takes
        axes = [getattr(self, a) if a in takes else (None,) for a in SETTING_AXES]
        return [dict(zip((*SETTING_AXES, "seed"), c, strict=True)) for c in itertools.product(*axes, self.seeds)]

    def asked(self) -> dict[str, str]:
        """The setting axes given other than their defaults: name -> the values (what `check_editors` checks)."""
        default = EditGrid()
        return {a: ",".join(f"{v:g}" for v in getattr(self, a)) for a in SETTING_AXES
                if getattr(self, a) != getattr(default, a)}

    def __len__(self) -> int:
        return sum(len(self.editor_settings(e)) for e in self.editor)


def model_key(specs: ModelSpecs) -> dict[str, str]:
    """The weight specs that determine an edit's pixels."""
    return {c: getattr(specs, c) for c in ("vae", "unet", "clip", "depth", "prior")}


def _output_key(*settings: Any, models: Mapping[str, str], size: tuple[int, int]) -> str:
    """sha1 hex[:20] of the compact JSON list of ``settings``, the models' weight specs and the output size."""
    payload = [*settings, dict(sorted(models.items())), [int(size[0]), int(size[1])]]
    return hashlib.sha1(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()[:20]


def edit_key(
    clip_id: str,
    content: str,
    t_s: int,
    w: float,
    w_t: float,
    seed: int,
    steps: int,
    sampler: str,
    models: Mapping[str, str],
    size: tuple[int, int],
    mask: str = "",
) -> str:
    """Stable id of one edit: sha1 hex[:20] of (clip id, content (`PromptSpec.key`), mask, t_s, w, w_t,
    seed, steps, sampler, the models' weight specs, output size)."""
    return _output_key(
        clip_id,
        content,
        mask,
        int(t_s),
        float(w),
        float(w_t),
        int(seed),
        int(steps),
        sampler,
        models=models,
        size=size,
    )


def baseline_key(
    method: str,
    clip_id: str,
    content: str,
    w: float,
    seed: int,
    steps: int,
    sampler: str,
    models: Mapping[str, str],
    size: tuple[int, int],
    mask: str,
    *,
    t_s: int | None = None,
    strength: float | None = None,
) -> str:
    """Stable id of one baseline output (`gen1.baselines`, run by `pipelines.evaluate`): like `edit_key`, led
    by the method's name (``per_frame``, ``sdedit``, ``no_structure``) so no two methods, nor our edits,
    collide; ``t_s`` for the per-frame baseline, the SDEdit ``strength`` for the SDEdit-style methods."""
    return _output_key(
        method,
        clip_id,
        content,
        mask,
        None if t_s is None else int(t_s),
        None if strength is None else float(strength),
        float(w),
        int(seed),
        int(steps),
        sampler,
        models=models,
        size=size,
    )


def editor_key(
    editor: str,
    weights: Mapping[str, str],
    clip_id: str,
    content: str,
    settings: Mapping[str, Any],
    steps: int,
    models: Mapping[str, str],
    size: tuple[int, int],
    mask: str = "",
) -> str:
    """Stable id of one edit by an editor other than Gen-1 (`gen1.editors`): like `edit_key`, led by the
    editor's name and its weight specs, with every setting of `SETTING_AXES` (None where it takes none) and
    the seed; ``models`` are the weight specs of the depth and CLIP models it is conditioned and measured with.
    Gen-1's edits keep `edit_key`, so the keys of runs before editors were pluggable still match."""
    return _output_key(
        "editor",
        editor,
        dict(sorted(weights.items())),
        clip_id,
        content,
        mask,
        *[None if settings[a] is None else float(settings[a]) for a in SETTING_AXES],
        int(settings["seed"]),
        int(steps),
        models=models,
        size=size,
    )


def check_editors(grid: EditGrid, sampler: str) -> None:
    """`ConfigError` before any work when the grid asks a setting (other than its default) that no editor
    of the grid takes; with one editor, any setting it does not take (`gen1.editors.check_settings`)."""
    from gen1.editors import editor_class
    from gen1.editors.base import check_settings

    asked = grid.asked()
    if sampler != "ddim":
        asked["sampler"] = sampler
    classes = [editor_class(e) for e in grid.editor]
    if len(classes) == 1:
        check_settings(classes[0], asked)
        return
    for name, values in asked.items():
        if not any(name in c.takes for c in classes):
            raise ConfigError(f"grid {name} ({values}): none of the editors {', '.join(grid.editor)} takes it")
    for c in classes:
        ignored = sorted(set(asked) - c.takes)
        if ignored:
            logger.warning("editor %s does not take %s: its edits leave them out", c.name, ", ".join(ignored))


def check_inputs(editor: str, clip: EditClip, prompt: PromptSpec) -> None:
    """`ConfigError` when ``editor`` cannot honour this edit's reference image or mask."""
    from gen1.editors import editor_class
    from gen1.editors.base import check_settings

    asked = {}
    if prompt.image_uri:
        asked["reference_image"] = prompt.image_uri
    if clip.mask_key:
        asked["mask"] = clip.mask_key
    if asked:
        try:
            check_settings(editor_class(editor), asked)
        except ConfigError as e:
            raise ConfigError(f"clip {clip.clip_id}: {e}") from e


def plan_tasks(
    clips: Iterable[EditClip],
    prompts_for: Mapping[str, Sequence[tuple[PromptSpec, str, str | None, str | None]]],
    grid: EditGrid,
    steps: int,
    sampler: str,
    specs: ModelSpecs,
    editor_weights: Mapping[str, Mapping[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """The cross product clips x prompts x editors x their settings: one task row per edit, unique by key,
    grouped by clip. `ConfigError` before any edit when an editor cannot honour a clip's mask or a prompt's
    reference image (`check_inputs`) or a setting of the grid (`check_editors`).

    ``prompts_for[clip_id]``: (prompt, prompt_source, caption, caption_model) per prompt of the clip;
    ``editor_weights``: a job's overrides of the editors' weight specs (`gen1.editors.editor_weights`).
    """
    from gen1.editors import DEFAULT_EDITOR
    from gen1.editors import editor_weights as weights_of
    from gen1.schedule import SAMPLERS

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler: expected one of {SAMPLERS}, found {sampler!r}")
    check_editors(grid, sampler)
    models = model_key(specs)
    measured_with = {c: models[c] for c in ("clip", "depth")}
    weights = {e: weights_of(e, specs, editor_weights) for e in grid.editor}
    tasks: dict[str, dict[str, Any]] = {}
    for clip in clips:
        blob = pickle.dumps(clip)
        for index, (prompt, source, caption, caption_model) in enumerate(prompts_for.get(clip.clip_id, ())):
            for editor in grid.editor:
                check_inputs(editor, clip, prompt)
                for s in grid.editor_settings(editor):
                    size = (clip.width, clip.height)
                    if editor == DEFAULT_EDITOR:
                        key = edit_key(clip.clip_id, prompt.key, s["t_s"], s["w"], s["w_t"], s["seed"], steps,
                                       sampler, models, size, clip.mask_key)
                    else:
                        key = editor_key(editor, weights[editor], clip.clip_id, prompt.key, s, steps,
                                         measured_with, size, clip.mask_key)
                    if key in tasks:
                        logger.warning("clip %s: prompt %r repeats; editing it once", clip.clip_id, prompt.key)
                        continue
                    tasks[key] = {
                        "edit_key": key,
                        "clip": blob,
                        "clip_id": clip.clip_id,
                        "source_uri": clip.source_uri,
                        "start": clip.start,
                        "caption": caption,
                        "caption_model": caption_model,
                        "prompt": prompt.text,
                        "image_uri": prompt.image_uri,
                        "prompt_index": index,
                        "prompt_source": source,
                        "prompt_tag": prompt.tag,
                        "editor": editor,
                        "editor_models": json.dumps(weights[editor], sort_keys=True),
                        **{a: s[a] for a in SETTING_AXES},
                        "seed": s["seed"],
                        "steps": steps,
                        "sampler": sampler if "sampler" in _takes(editor) else None,
                    }
    return list(tasks.values())


def _takes(editor: str) -> frozenset[str]:
    from gen1.editors import editor_class

    return editor_class(editor).takes
