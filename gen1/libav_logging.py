"""How much FFmpeg (libav) prints: nothing unless asked.

PyAV and decord each bundle their own FFmpeg, and its decoders write to stderr directly
(``[h264 @ 0x...] A non-intra slice in an IDR NAL unit.``), from every process that decodes: the driver,
Ray workers and their decode children. ``$GEN1_LIBAV_LOG`` sets the level for all of them, since they
inherit the environment (a remote cluster through ``pipelines.runtime.FORWARDED_ENV``): ``quiet`` (the
default: nothing; decode failures still raise, naming the file), or ``error``, ``warning``, ``info``,
``verbose``, ``debug``. ``gen1 -v`` sets ``warning``. PyAV's messages then go through `logging` (loggers
``libav.*``); decord's straight to stderr.

Each FFmpeg takes the level where it is first used in a process: `gen1.video` applies it to PyAV on import,
`gen1.decoding` to decord when it opens a video.
"""

from __future__ import annotations

import os
from types import ModuleType

from gen1.config import ConfigError

LIBAV_LOG_ENV = "GEN1_LIBAV_LOG"
# FFmpeg's AV_LOG_* values (libavutil/log.h); "quiet" is AV_LOG_QUIET.
LEVELS = {"quiet": -8, "error": 16, "warning": 24, "info": 32, "verbose": 40, "debug": 48}


def libav_log_level() -> str:
    """The level ``$GEN1_LIBAV_LOG`` names (default ``quiet``); `ConfigError` for any other value."""
    name = os.environ.get(LIBAV_LOG_ENV, "").strip().lower() or "quiet"
    if name not in LEVELS:
        raise ConfigError(f"${LIBAV_LOG_ENV}={os.environ[LIBAV_LOG_ENV]!r}: expected one of {', '.join(LEVELS)}")
    return name


def apply_to_pyav() -> None:
    """PyAV's FFmpeg logs at `libav_log_level` through `logging`; ``quiet``: PyAV's own default, no logging."""
    import av.logging

    name = libav_log_level()
    av.logging.set_level(None if name == "quiet" else LEVELS[name])


def apply_to_decord(decord: ModuleType) -> None:
    """decord's FFmpeg prints at `libav_log_level` (its default prints every decoder warning)."""
    decord.logging.set_level(LEVELS[libav_log_level()])
