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
}


@dataclass(frozen=True)
class EditGrid:
    """The settings grid: every combination of t_s, w, w_t and seed is one edit per (clip, prompt)."""

    t_s: tuple[int, ...] = (3,)
    w: tuple[float, ...] = (7.5,)
    w_t: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("t_s", "w", "w_t", "seeds"):
            values = tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"grid {name}: expected at least one value")
            cast = int if name in ("t_s", "seeds") else float
            object.__setattr__(self, name, tuple(dict.fromkeys(cast(v) for v in values)))

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> EditGrid:
        """``["ts=1,5", "w=7.5", "wt=1.0,1.5", "seed=0,1"]`` (one entry per ``--grid``) -> EditGrid; unnamed
        keys keep defaults; a key named twice is an error (its values go in one entry, comma-separated)."""
        values: dict[str, list[str]] = {}
        for item in items or ():
            key, sep, vals = item.partition("=")
            name = GRID_KEYS.get(key.strip().lower())
            if not sep or name is None or not vals.strip():
                raise ConfigError(f"grid entry {item!r}: expected KEY=V1,V2,... with KEY in ts, w, wt, seed")
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

    def __len__(self) -> int:
        return len(self.t_s) * len(self.w) * len(self.w_t) * len(self.seeds)


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


def plan_tasks(
    clips: Iterable[EditClip],
    prompts_for: Mapping[str, Sequence[tuple[PromptSpec, str, str | None, str | None]]],
    grid: EditGrid,
    steps: int,
    sampler: str,
    specs: ModelSpecs,
) -> list[dict[str, Any]]:
    """The cross product clips x prompts x grid: one task row per edit, unique by edit key, grouped by clip.

    ``prompts_for[clip_id]``: (prompt, prompt_source, caption, caption_model) per prompt of the clip.
    """
    from gen1.schedule import SAMPLERS

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler: expected one of {SAMPLERS}, found {sampler!r}")
    models = model_key(specs)
    tasks: dict[str, dict[str, Any]] = {}
    for clip in clips:
        blob = pickle.dumps(clip)
        for index, (prompt, source, caption, caption_model) in enumerate(prompts_for.get(clip.clip_id, ())):
            for t_s, w, w_t, seed in grid.combinations():
                key = edit_key(
                    clip.clip_id,
                    prompt.key,
                    t_s,
                    w,
                    w_t,
                    seed,
                    steps,
                    sampler,
                    models,
                    (clip.width, clip.height),
                    clip.mask_key,
                )
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
                    "t_s": t_s,
                    "w": w,
                    "w_t": w_t,
                    "seed": seed,
                    "steps": steps,
                    "sampler": sampler,
                }
    return list(tasks.values())
