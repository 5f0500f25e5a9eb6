"""The lease of a destination: one driver at a time writes into a ``DST``.

Two drivers on one DST would both list what is committed and both commit the same clip id. So every job
(preprocess, edit, eval) first takes DST's lease, holds it while it runs and gives it back at the end (also
on error); a second driver waits up to ``lease_wait_s`` for it and then refuses (`LeaseHeldError`, exit code
5), naming the run that holds it and when its lease expires. A driver that dies stops refreshing: its lease
is taken over once it expires, or at once when its owner ran on this machine and its process is gone.

The lease is a sequence of small JSON records (`LeaseRecord`)::

    DST/_lease/lease-<generation, 12 digits>.json    owner (run id, job, host, pid), expiry, released

The record of the highest generation says who holds DST. Every change -- acquire, refresh, take over,
release -- creates record n+1 with an exclusive create, so of two drivers that both read record n exactly
one writes n+1 and the other finds it there: a compare-and-swap built from create-if-absent alone, the one
atomic operation local filesystems and S3 share. Locally a record is written aside and hard-linked into
place (``link`` fails when the name exists, and a reader never sees half a record); on S3 it is one
PutObject with ``If-None-Match: *`` (AWS S3 since 2024; s3fs's ``mode="create"``); ``memory://`` checks it
in process. Other filesystems get fsspec's ``mode="create"``, which may not be atomic there (a warning
says so). Records older than the previous one are deleted by the writer of the next.

While the run goes on a daemon thread refreshes the lease every ``lease_ttl_s / 3`` seconds (a new record
with a later expiry). `Lease.check`, called by `pipelines.commits.Committer` before each commit, refreshes at
once when less than a third of the TTL is left and raises `LeaseLostError` when another driver took the
lease over (this driver was stalled past its expiry): a driver that lost its lease commits nothing more.
Expiry is wall-clock time; drivers on different hosts need clocks within a small part of the TTL.

`hold_dst` is how a job takes DST: the lease, then the removal of ``_tmp/`` leftovers older than
``tmp_max_age_s`` (what crashed runs wrote and never committed; no live run writes there while this one
holds the lease), then the release at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from fsspec.implementations.local import LocalFileSystem

from pipelines.schema import TableStore

logger = logging.getLogger(__name__)

LEASE_DIR = "_lease"
_RECORD = re.compile(r"^lease-(\d{12})\.json$")
ATOMIC_CREATE_PROTOCOLS = frozenset({"file", "local", "memory", "s3", "s3a"})


class LeaseError(RuntimeError):
    """DST is another run's: held when this one started (`LeaseHeldError`) or taken over (`LeaseLostError`)."""


class LeaseHeldError(LeaseError):
    """Another run holds DST's lease, and it did not come free within ``lease_wait_s``."""


class LeaseLostError(LeaseError):
    """Another run took over DST's lease while this one ran (this driver stalled past its expiry)."""


class LeaseSettings(Protocol):
    """The fields of a job config (`PreprocessConfig`, `EditJobConfig`, `EvalConfig`) that `hold_dst` reads."""

    lease_ttl_s: float
    lease_wait_s: float
    tmp_max_age_s: float


def check_lease_settings(config: Any) -> None:
    """`gen1.config.ConfigError` unless ``config.lease_ttl_s`` is seconds > 0 and ``lease_wait_s`` and
    ``tmp_max_age_s`` are seconds >= 0 (all finite)."""
    from gen1.config import ConfigError

    for name, positive in (("lease_ttl_s", True), ("lease_wait_s", False), ("tmp_max_age_s", False)):
        value = getattr(config, name)
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            raise ConfigError(f"{name}: expected seconds {'> 0' if positive else '>= 0'}; found {value!r}")


# ------------------------------------------------------------------------------------------------ records


def machine_id() -> str:
    """This machine and process namespace (the kernel's boot id and the pid namespace), or the host name
    where /proc has neither: a pid means the same process only where this matches."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists here and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LeaseOwner:
    """The driver that holds (or held) a lease."""

    run_id: str
    job: str  # preprocess | edit | eval
    host: str
    pid: int
    machine: str  # `machine_id` of the driver's machine

    @classmethod
    def here(cls, run_id: str, job: str) -> LeaseOwner:
        return cls(run_id=run_id, job=job, host=socket.gethostname(), pid=os.getpid(), machine=machine_id())

    def gone(self) -> bool:
        """True when this owner ran on this machine and its process no longer exists."""
        return self.machine == machine_id() and self.pid != os.getpid() and not pid_alive(self.pid)

    def describe(self) -> str:
        return f"{self.job} run {self.run_id} (host {self.host}, pid {self.pid})"


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a lease: who holds it and until when (``expires``: UNIX seconds)."""

    generation: int
    owner: LeaseOwner
    expires: float
    released: bool = False

    def free(self, now: float) -> bool:
        """Whether another driver may take the lease now: released, expired, or its owner's process gone."""
        return self.released or self.expires <= now or self.owner.gone()

    def to_json(self) -> bytes:
        d = asdict(self)
        d["expires_at"] = _iso(self.expires)
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        d = json.loads(data)
        return cls(generation=int(d["generation"]), owner=LeaseOwner(**d["owner"]), expires=float(d["expires"]),
                   released=bool(d["released"]))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_exclusive(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` whole, or `FileExistsError` when something is there (see the module
    docstring for how each filesystem makes it atomic)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(aside, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(aside, path)  # atomic; fails with FileExistsError when the name is taken
        finally:
            os.unlink(aside)
        return
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & ATOMIC_CREATE_PROTOCOLS:
        logger.warning("%s: fsspec's create-if-absent may not be atomic on %s; two drivers started at the same "
                       "moment could both take the lease", fs.unstrip_protocol(path), "/".join(sorted(protocols)))
    fs.pipe_file(path, data, mode="create")


# ------------------------------------------------------------------------------------------------- lease


class Lease:
    """The lease of ``store``'s DST for ``owner``, ``ttl_s`` seconds from each refresh.

    `acquire` takes it (waiting up to ``wait_s``), starts the refresh thread and returns self; `check`
    before each commit; `release` at the end. Also a context manager (acquire without waiting).
    """

    def __init__(self, store: TableStore, owner: LeaseOwner, ttl_s: float, refresh_s: float | None = None):
        self.store, self.owner, self.ttl_s = store, owner, float(ttl_s)
        self.refresh_s = float(refresh_s) if refresh_s is not None else self.ttl_s / 3
        self.generation = 0  # of the last record this driver wrote
        self.expires = 0.0  # of that record
        self.held = False
        self.lost: str | None = None  # why the lease was lost, once it was
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(self.store.path(LEASE_DIR))

    # ---------------------------------------------------------------------------------------- records

    def _path(self, generation: int) -> str:
        return self.store.path(LEASE_DIR, f"lease-{generation:012d}.json")

    def _generations(self) -> list[int]:
        try:
            names = self.store.fs.ls(self.store.path(LEASE_DIR), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _RECORD.match(n.rstrip("/").rsplit("/", 1)[-1])))

    def _read(self, generation: int) -> LeaseRecord:
        return LeaseRecord.from_json(self.store.fs.cat_file(self._path(generation)))

    def current(self) -> LeaseRecord | None:
        """The record of the highest generation, or None when DST was never leased."""
        for _ in range(10):
            generations = self._generations()
            if not generations:
                return None
            try:
                return self._read(generations[-1])
            except FileNotFoundError:  # deleted by the writer of a newer one since the listing: list again
                continue
        raise LeaseError(f"{self.uri}: the lease records keep changing under this reader")

    def _put(self, generation: int, expires: float, released: bool = False) -> LeaseRecord | None:
        """Create record ``generation`` for this driver; returns it, or None when another driver's is there.
        Deletes record ``generation - 2`` (the previous one stays for readers that listed it a moment ago)."""
        record = LeaseRecord(generation, self.owner, expires, released)
        try:
            create_exclusive(self.store.fs, self._path(generation), record.to_json())
        except FileExistsError:
            there = self._read(generation)
            if there.owner != self.owner:
                return None
            record = there  # a retried request of ours found its own first attempt there
        if generation > 2:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm(self._path(generation - 2))
        return record

    # ---------------------------------------------------------------------------------------- driver

    def acquire(self, wait_s: float = 0.0) -> Lease:
        """Take the lease: at once when it is free, else once it comes free within ``wait_s`` seconds,
        else `LeaseHeldError` naming its owner and expiry. Starts the refresh thread."""
        t0 = time.monotonic()
        poll_s = min(2.0, max(0.05, self.ttl_s / 4))
        last_owner: LeaseOwner | None = None  # the holder last logged
        while True:
            current = self.current()
            now = time.time()
            if current is None or current.free(now):
                record = self._put((current.generation if current else 0) + 1, now + self.ttl_s)
                if record is None:  # another driver took it first: look again
                    continue
                self.generation, self.expires, self.held = record.generation, record.expires, True
                if current is not None and not current.released:
                    why = "its process is gone" if current.expires > now else f"it expired at {_iso(current.expires)}"
                    logger.warning("took over the lease of %s from %s: %s", self.uri, current.owner.describe(), why)
                logger.info("%s holds the lease of %s until %s (renewed every %.0fs)", self.owner.describe(),
                            self.uri, _iso(self.expires), self.refresh_s)
                self._thread = threading.Thread(target=self._refresh_loop, name=f"lease:{self.owner.run_id}",
                                                daemon=True)
                self._thread.start()
                return self
            waited = time.monotonic() - t0
            if waited >= wait_s:
                raise LeaseHeldError(self._held_message(current, now, waited))
            if current.owner != last_owner:
                logger.info("waiting up to %.0fs for the lease of %s, held by %s until %s", wait_s - waited,
                            self.uri, current.owner.describe(), _iso(current.expires))
            last_owner = current.owner
            time.sleep(min(poll_s, wait_s - waited))

    def _held_message(self, current: LeaseRecord, now: float, waited: float) -> str:
        return (
            f"{self.store.uri(self.store.root)} is being written by {current.owner.describe()}: it holds the lease "
            f"{self.uri} until {_iso(current.expires)} ({current.expires - now:.0f}s from now; its driver renews it "
            f"while it runs). Two drivers must not write one DST; waited {waited:.1f}s (lease_wait_s). Let that "
            f"run finish, or wait for it with --lease-wait SECONDS; a driver that died frees the lease when it "
            f"expires"
        )

    def refresh(self) -> None:
        """Write the next record with a later expiry; `LeaseLostError` when another driver wrote it first."""
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
            if not self.held:
                raise LeaseError(f"{self.owner.describe()} does not hold the lease of {self.uri}")
            record = self._put(self.generation + 1, time.time() + self.ttl_s)
            if record is None:
                other = self.current()
                who = other.owner.describe() if other else "another driver"
                self.lost = (f"{self.owner.describe()} lost the lease of {self.uri} to {who}: this driver's lease "
                             f"expired at {_iso(self.expires)} before it could renew it; it commits nothing more")
                self.held = False
                logger.error("%s", self.lost)
                raise LeaseLostError(self.lost)
            self.generation, self.expires = record.generation, record.expires

    def check(self) -> None:
        """Before a commit: `LeaseLostError` unless this driver still holds the lease, renewing it first when
        less than a third of its TTL is left."""
        if self.lost:
            raise LeaseLostError(self.lost)
        if not self.held:
            raise LeaseError(f"{self.owner.describe()} does not hold the lease of {self.uri}")
        if time.time() > self.expires - self.ttl_s / 3:
            self.refresh()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except LeaseError:
                return
            except Exception as e:  # a flaky store: try again next time; `check` renews or refuses later
                logger.warning("could not renew the lease of %s (it expires at %s): %s: %s", self.uri,
                               _iso(self.expires), type(e).__name__, e)

    def release(self) -> None:
        """Stop renewing and give the lease back (a released record), unless it was lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if not self.held:
                return
            self.held = False
            try:
                record = self._put(self.generation + 1, time.time(), released=True)
            except Exception as e:
                logger.error("could not release the lease of %s (%s: %s); it frees itself at %s", self.uri,
                             type(e).__name__, e, _iso(self.expires))
                return
            if record is None:
                logger.error("the lease of %s was taken over before %s released it", self.uri, self.owner.describe())
                return
            self.generation = record.generation
            logger.info("%s released the lease of %s", self.owner.describe(), self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold_dst(store: TableStore, job: str, run_id: str, settings: LeaseSettings,
             tables: Sequence[str]) -> Iterator[Lease]:
    """Hold the lease of ``store``'s DST while the block runs (see the module docstring): acquire it
    (waiting up to ``settings.lease_wait_s``), remove ``_tmp/`` leftovers of ``tables`` older than
    ``settings.tmp_max_age_s``, yield the lease, release it at the end, also on error."""
    lease = Lease(store, LeaseOwner.here(run_id, job), settings.lease_ttl_s).acquire(settings.lease_wait_s)
    try:
        for table in tables:
            _remove_leftovers(store, table, settings.tmp_max_age_s, run_id)
        yield lease
    finally:
        lease.release()


def _remove_leftovers(store: TableStore, table: str, max_age_s: float, run_id: str) -> None:
    """`TableStore.remove_stale_tmp`, logged; a failure is a warning (leftovers cost space, not results)."""
    try:
        removed = store.remove_stale_tmp(table, max_age_s, keep=run_id)
    except Exception as e:
        logger.warning("could not remove the _tmp leftovers of %s (%s: %s); they stay until the next run",
                       store.uri(store.path(table)), type(e).__name__, e)
        return
    if removed:
        logger.info("removed %d _tmp leftovers older than %.0fs of %s: %s", len(removed), max_age_s, table,
                    ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
