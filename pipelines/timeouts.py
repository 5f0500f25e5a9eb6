"""Time limits for calls that can hang: model forwards, edits, probes (decodes run in a child process that
is killed instead: `pipelines.child_worker`).

`call_with_timeout` runs a function in a daemon worker thread and waits at most ``timeout_s`` for it.
When the function does not finish in time the caller gets a `StageTimeout` (a `TimeoutError`) and moves
on; the errors table records it with ``error_type`` ``"timeout"`` (`StageTimeout.error_type`, read by
`pipelines.failures.mark_failed`).

A hung call is *abandoned, not killed*: Python cannot stop a thread, least of all one blocked inside
native code (FFmpeg, decord, a CUDA kernel). The thread keeps whatever it holds until it returns or the
process exits; being a daemon thread it never keeps a worker process alive at exit. A call that hangs
while holding the GIL would hang the caller too; FFmpeg (PyAV), decord, OpenCV and torch release it
around their native work. Two things keep an abandoned call from doing harm:

- `Cancellation`: a call that writes takes one (``cancel=``), checks it before each write (`check`) and
  passes its commit point through `publish` before it moves anything into place. A timeout cancels the
  call unless it has passed that point (then the caller waits for it to finish: what is left is a rename
  and building its row), so nothing an abandoned call started is written after its task was recorded.
- `Retirement`: an actor stage takes one (``retirement=``) and calls `Retirement.check` first in every
  call. After a call was abandoned, the stage's next call ends the actor's process before doing any work,
  so the thread and all it holds (GPU memory, the models, the stage's caches) go with it; Ray restarts
  the actor and runs that call in the fresh process (one of the call's ``max_task_retries``,
  `pipelines.runtime.RetryConfig`). Outside a Ray actor the call raises `StageRetired` instead.
"""

from __future__ import annotations

import logging
import os
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


class CallCancelled(RuntimeError):
    """Raised inside an abandoned call at its next `Cancellation.check` or `Cancellation.publish`."""


class Cancellation:
    """Whether the caller of a call gave up on it (`call_with_timeout` with ``cancel=``). The call checks it
    before each step that writes and passes its commit point with `publish`; the flag and the commit point
    are set under one lock, so a timeout either cancels the call before it publishes or lets it finish."""

    def __init__(self, what: str = "the call"):
        self.what = what
        self._lock = threading.Lock()
        self._cancelled = self._published = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        """`CallCancelled` when the caller gave up on the call."""
        if self._cancelled:
            raise CallCancelled(f"{self.what} was given up (past its time limit): it writes nothing more")

    def publish(self) -> None:
        """Pass the commit point (before moving results into place); `CallCancelled` when too late."""
        with self._lock:
            self.check()
            self._published = True

    def cancel(self) -> bool:
        """Give up on the call unless it has published; True when it is now cancelled."""
        with self._lock:
            if not self._published:
                self._cancelled = True
            return self._cancelled


class StageRetired(RuntimeError):
    """A retired stage (`Retirement`) was called again outside a Ray actor."""


RETIRED_EXIT_CODE = 75  # the exit status of an actor process ended by its Retirement


class Retirement:
    """A stage's retirement after it abandoned a call (see the module docstring): `retire` records the
    abandoned call, `check` (first in every call of the stage) ends the process once there is one."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def retire(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            logger.warning("%s; this stage is retired: its next call ends its process first (pid %d)", reason,
                           os.getpid())

    def check(self) -> None:
        """Nothing while no call was abandoned; else end the process (in a Ray actor: Ray restarts the actor
        and re-runs this call there) or, outside one, raise `StageRetired`."""
        if self.reason is None:
            return
        if not _in_ray_actor():
            raise StageRetired(f"this stage was retired ({self.reason}); make a new one")
        logger.warning("retired actor (pid %d, %s) ends its process before its next call; Ray restarts it",
                       os.getpid(), self.reason)
        logging.shutdown()  # flush the log handlers: os._exit runs no exit handlers
        os._exit(RETIRED_EXIT_CODE)


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def call_with_timeout(fn: Callable[..., T], timeout_s: float | None, *args: Any, what: str = "",
                      cancel: Cancellation | None = None, retirement: Retirement | None = None,
                      **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, or `StageTimeout` when it takes longer than ``timeout_s`` seconds.

    ``timeout_s`` None or <= 0 calls ``fn`` directly (no limit, no thread). Exceptions of ``fn``
    propagate unchanged. ``what`` names the call in the error message (default: ``fn``'s name). On a
    timeout ``cancel`` (the `Cancellation` that ``fn`` checks) is cancelled, and when that comes too late
    (``fn`` has published) its result is waited for; an abandoned call retires ``retirement``.
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
        if cancel is None or cancel.cancel():
            logger.error("%s did not finish within %gs; abandoning its thread %s", what, timeout_s, thread.name)
            if retirement is not None:
                retirement.retire(f"{what} was abandoned after {timeout_s:g}s")
            raise StageTimeout(what, timeout_s)
        logger.warning("%s passed its commit point before its %gs limit; waiting for it to finish", what, timeout_s)
        thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
