"""What every editor is: `Editor` (``load(weights, device)``, ``edit(frames, depth, content, settings, mask)``),
the settings one edit gets (`EditorSettings`) and what comes back (`EditorOutput`), and the check that an
editor honours the settings asked of it (`check_settings`), run when a job is planned, before any work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gen1.config import ConfigError

# Every setting a job can ask of an editor (the edit grid's axes and the task's inputs).
SETTINGS = ("t_s", "w", "w_t", "strength", "controlnet_scale", "sampler", "reference_image", "mask")


@dataclass(frozen=True)
class EditorSettings:
    """One edit's settings; those the editor does not take are None (`Editor.takes`)."""

    steps: int = 50
    seed: int = 0
    w: float = 7.5  # content (classifier-free) guidance
    t_s: int | None = None  # Gen-1 structure strength 0..7
    w_t: float | None = None  # Gen-1 temporal guidance (eq. 8)
    sampler: str | None = None  # Gen-1's sampler (gen1.schedule); the diffusers editors keep their scheduler
    strength: float | None = None  # SDEdit noise strength of the video-to-video editors (0, 1]
    controlnet_scale: float | None = None  # depth-conditioning scale (ControlNet / VACE)


@dataclass
class EditorOutput:
    frames: np.ndarray  # uint8 (f, h, w, 3): the edited video
    depth: np.ndarray  # float32 (f, h, w) in [-1, 1]: the input's depth (our DPT) the edit followed
    seconds: float  # sampling
    unet_forwards: int  # denoiser (UNet or transformer) forward calls; a batched call counts once


class Editor:
    """A video editor. Subclasses set the class attributes and implement `load` and `edit`.

    ``takes``: the settings of `SETTINGS` it honours; ``weights``: role -> weight spec of the full-size
    components, ``tiny_weights`` the same for tests (``tiny:<component>``, `gen1.tiny`)."""

    name: ClassVar[str]
    takes: ClassVar[frozenset[str]]
    weights: ClassVar[Mapping[str, str]]
    tiny_weights: ClassVar[Mapping[str, str]]

    @classmethod
    def load(cls, weights: Mapping[str, str], device: str | None = None) -> Editor:
        raise NotImplementedError

    def edit(
        self,
        frames: np.ndarray,
        depth: np.ndarray | None,
        content: Any,
        settings: EditorSettings,
        mask: np.ndarray | None = None,
    ) -> EditorOutput:
        """Edit ``frames`` uint8 (f, h, w, 3) following ``depth`` (f, h, w) (our DPT's, in [-1, 1]) toward
        ``content`` (`gen1.sampling.Content`), in ``mask`` (f, h, w) bool where given."""
        raise NotImplementedError


class DiffusersEditor(Editor):
    """An editor around one diffusers pipeline (``self.pipe``) on ``self.device``; `from_local` and `ready` are
    how every one of them loads: local files only, in the device's dtype, progress bars off."""

    def __init__(self, pipe: Any, device: str):
        self.pipe, self.device = pipe, device

    @staticmethod
    def from_local(model_cls: Any, path: Any, device: str, **components: Any) -> Any:
        """``model_cls.from_pretrained`` (a pipeline or one of its models) from the resolved directory
        ``path``, never downloading, in ``device``'s dtype (`gen1.devices.default_dtype`)."""
        from gen1.devices import default_dtype

        return model_cls.from_pretrained(path, local_files_only=True, dtype=default_dtype(device), **components)

    @classmethod
    def ready(cls, pipe: Any, device: str) -> DiffusersEditor:
        """The editor of ``pipe``, moved to ``device``, its progress bars off."""
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device)


def check_settings(editor: type[Editor], asked: Mapping[str, Any]) -> None:
    """`ConfigError` naming every setting in ``asked`` (name -> what was asked, e.g. ``"t_s": "1,5"``) that
    ``editor`` does not take, and what it takes."""
    refused = {k: v for k, v in asked.items() if k not in editor.takes}
    if refused:
        what = ", ".join(f"{k} ({v})" for k, v in refused.items())
        raise ConfigError(f"editor {editor.name!r} cannot honour {what}; it takes {', '.join(sorted(editor.takes))}")
