"""Time limits for calls that can hang: model forwards, probes (decodes run in a child process that is
killed instead: `pipelines.child_worker`).

`call_with_timeout` runs a function in a daemon worker thread and waits at most ``timeout_s`` for it.
When the function does not finish in time the caller gets a `StageTimeout` (a `TimeoutError`) and moves
on; the errors table records it with ``error_type`` ``"timeout"`` (`StageTimeout.error_type`, read by
`pipelines.failures.mark_failed`).

A hung call is *abandoned, not killed*: Python cannot stop a thread, least of all one blocked inside
native code (FFmpeg, decord, a CUDA kernel). The thread keeps whatever it holds until it returns or the
process exits; being a daemon thread it never keeps a worker process alive at exit. This is enough for
the failure it targets (a decoder stuck on one file: the rest of the batch and the job go on), and costs
no process start per clip. A call that hangs while holding the GIL would hang the caller too; FFmpeg
(PyAV), decord, OpenCV and torch release it around their native work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ERROR_TYPE = "timeout"


def check_time_limits(config: Any, names: tuple[str, ...]) -> None:
    """`gen1.config.ConfigError` unless each field ``names`` of ``config`` is None or seconds >= 0."""
    from gen1.config import ConfigError

    for name in names:
        value = getattr(config, name)
        if value is not None and float(value) < 0:
            raise ConfigError(f"{name}: expected seconds >= 0 (0 or None: no limit); found {value!r}")


class StageTimeout(TimeoutError):
    """``what`` did not finish within ``timeout_s`` seconds: its process was killed (``killed``), or its
    thread abandoned, still running."""

    error_type = TIMEOUT_ERROR_TYPE

    def __init__(self, what: str, timeout_s: float, killed: bool = False):
        self.what, self.timeout_s, self.killed = what, timeout_s, killed
        fate = "killed" if killed else "still running, abandoned"
        super().__init__(f"{what}: expected to finish within {timeout_s:g}s; {fate}")

    def __reduce__(self):  # keep the fields across pickling (Ray)
        return (type(self), (self.what, self.timeout_s, self.killed))


def call_with_timeout(fn: Callable[..., T], timeout_s: float | None, *args: Any, what: str = "",
                      **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, or `StageTimeout` when it takes longer than ``timeout_s`` seconds.

    ``timeout_s`` None or <= 0 calls ``fn`` directly (no limit, no thread). Exceptions of ``fn``
    propagate unchanged. ``what`` names the call in the error message (default: ``fn``'s name).
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args, **kwargs)
    what = what or getattr(fn, "__qualname__", repr(fn))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name=f"timeout:{what}"[:60], daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        logger.error("%s did not finish within %gs; abandoning its thread %s", what, timeout_s, thread.name)
        raise StageTimeout(what, timeout_s)
    if "error" in box:
        raise box["error"]
    return box["value"]
