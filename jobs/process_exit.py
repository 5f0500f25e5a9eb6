"""How a gen1 process ends once its work is done: Python's own shutdown steps, then ``os._exit``.

A process that has read Parquet can abort as it exits, after all its work is written and reported: Arrow's
thread pools may still be running the callbacks of a finished dataset scan when the C++ static destructors
run, and a still-joinable ``std::thread`` then calls ``std::terminate`` ("terminate called without an active
exception", SIGABRT, exit -6). It is an open Arrow bug (apache/arrow#39862, #34314) with no API to wait for
those pools; it hit the demo and a commit_scale measurement in our fresh-clone CI. So every entry point of
``jobs/`` ends through `exit_process`: non-daemon threads are joined and the ``atexit`` handlers run (Ray's
shutdown, MLflow's run end, temporary directories' finalizers, logging's flush), as in a normal exit, and
the process then leaves with ``os._exit``, without the C-level teardown where the abort happens.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int | None) -> NoReturn:
    """Exit with ``code`` (None: 0) after what ``sys.exit`` would run, skipping only the C-level teardown."""
    # CPython's private hooks for the two steps Py_FinalizeEx takes first (tests/test_process_exit.py checks them):
    threading._shutdown()  # join non-daemon threads (concurrent.futures' workers too)
    atexit._run_exitfuncs()  # then the atexit handlers, last registered first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to save
            pass
    os._exit(code or 0)
