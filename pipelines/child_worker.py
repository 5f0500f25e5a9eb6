"""A child process that runs generator calls for its parent, so that a call which hangs can be killed and
one which kills its process (segfault, ``abort()``, the OOM killer) is an exception in the parent.

`ChildWorker.run(fn, args, timeout_s=..., what=...)` sends ``fn`` and ``args`` to the child (pickled: ``fn``
must be a module-level function, which pickles by reference) and yields what ``fn(*args)`` yields, item by
item, as the child produces them. When the next item takes longer than ``timeout_s`` (counted from when the
child has the call: starting the child and importing ``fn``'s module are not counted) the child is killed
(SIGKILL: its memory goes back to the system) and `pipelines.timeouts.StageTimeout` is raised; when the
child dies, `ChildCrashed` (``error_type`` ``"crash"``) names how. Either way the next `run` starts a
fresh child. An exception raised by ``fn`` in the child is re-raised in the parent, after the items that
came before it.

Children start from a forkserver that has ``preload`` imported, so a restart is a fork, not a new
interpreter; the forkserver is a fresh process, so no thread state of the parent (Ray's, gRPC's) is
forked. A child also exits when its parent goes away (its end of the pipe closes).

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot kill the process of one late task (only
cancel tasks not yet started), it breaks the whole pool when a worker dies, and it returns a call's
result only when the call ends, where decoding streams clips as they complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipelines.timeouts import StageTimeout

logger = logging.getLogger(__name__)

CRASH_ERROR_TYPE = "crash"
_STARTED, _ITEM, _END, _ERROR = "started", "item", "end", "error"
STARTUP_TIMEOUT_S = 120.0  # for a child to start and import what a call needs (not counted in timeout_s)


class ChildCrashed(RuntimeError):
    """The child process died during ``what`` (a signal or an exit code, as the message says)."""

    error_type = CRASH_ERROR_TYPE

    def __init__(self, what: str, exitcode: int | None):
        self.what, self.exitcode = what, exitcode
        if exitcode is not None and exitcode < 0:
            try:
                how = f"killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"killed by signal {-exitcode}"
        else:
            how = f"exited with code {exitcode}"
        super().__init__(f"{what}: its worker process died ({how})")

    def __reduce__(self):  # keep (what, exitcode) across pickling (Ray)
        return (type(self), (self.what, self.exitcode))


def _serve(conn) -> None:
    """The child's loop: run each (fn, args) received and send back its items, then end or the error."""
    while True:
        try:
            fn, args = conn.recv()  # unpickling imports fn's module
        except (EOFError, OSError):  # the parent went away
            return
        except BaseException as e:  # noqa: BLE001 -- e.g. fn's module does not import here
            conn.send((_ERROR, RuntimeError(f"cannot receive the call: {type(e).__name__}: {e}")))
            continue
        try:
            conn.send((_STARTED, None))
            for item in fn(*args):
                conn.send((_ITEM, item))
            conn.send((_END, None))
        except (BrokenPipeError, EOFError):
            return
        except BaseException as e:  # noqa: BLE001 -- handed to the parent
            try:
                conn.send((_ERROR, e))
            except Exception:  # the exception does not pickle: send its text
                conn.send((_ERROR, RuntimeError(f"{type(e).__name__}: {e}")))


class ChildWorker:
    """One child process at a time, started on first use and replaced after a kill or crash."""

    def __init__(self, preload: Sequence[str] = ()):
        self.context = multiprocessing.get_context("forkserver")
        if preload:
            self.context.set_forkserver_preload(list(preload))
        self.process, self.conn = None, None

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first call and after a kill)."""
        return self.process.pid if self.process is not None else None

    def _start(self) -> None:
        parent, child = self.context.Pipe(duplex=True)
        self.process = self.context.Process(target=_serve, args=(child,), daemon=True, name="gen1-child-worker")
        self.process.start()
        child.close()
        self.conn = parent

    def run(self, fn: Callable[..., Iterator[Any]], args: Sequence[Any], timeout_s: float | None = None,
            what: str = "") -> Iterator[Any]:
        """Yield the items of ``fn(*args)`` run in the child; at most ``timeout_s`` (None or 0: no limit)
        seconds per item. Raises `StageTimeout` (child killed), `ChildCrashed`, or ``fn``'s exception."""
        what = what or getattr(fn, "__qualname__", repr(fn))
        if self.process is None or not self.process.is_alive():
            self._start()
        finished = False
        try:
            self.conn.send((fn, tuple(args)))
            started = False
            while True:
                limit = timeout_s if started else max(STARTUP_TIMEOUT_S, timeout_s or 0)
                if limit and not self.conn.poll(limit):
                    logger.error("%s did not finish within %gs; killing its worker process %d", what, limit,
                                 self.process.pid)
                    self.kill()
                    raise StageTimeout(what if started else f"{what} (starting its worker)", limit, killed=True)
                try:
                    kind, value = self.conn.recv()
                except (EOFError, OSError):
                    self.process.join(5)
                    code = self.process.exitcode
                    self.kill()
                    raise ChildCrashed(what, code) from None
                if kind == _STARTED:
                    started = True
                elif kind == _ITEM:
                    yield value
                elif kind == _END:
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            if not finished and self.process is not None:  # abandoned mid-call (or failed): no half-read pipe
                self.kill()

    def kill(self) -> None:
        """Kill the child now (if any) and wait for it; the next `run` starts a new one."""
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(10)
            self.conn.close()
        self.process, self.conn = None, None

    def close(self) -> None:
        self.kill()
