"""Concurrent drivers (issue 17, item 5): the lease of a DST (`pipelines.lease`).

The lease is exercised on the filesystems the jobs write to: a local folder, ``memory://`` and the moto S3
endpoint (whose PutObject honours ``If-None-Match: *``, as AWS S3 does). Races run in real processes started
at one barrier."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid

import pytest

from pipelines.commits import Committer
from pipelines.lease import (
    LEASE_DIR,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LeaseOwner,
    create_exclusive,
)
from pipelines.schema import ERRORS_DIR, TableStore
from tests.fixtures import lease_drivers

OTHER = LeaseOwner(run_id="20260101T000000-0ther1", job="preprocess", host="node-7", pid=os.getpid(),
                   machine="another-machine")


def _owner(run_id: str) -> LeaseOwner:
    return LeaseOwner.here(run_id, "preprocess")


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> TableStore:
    """A fresh DST on a local folder or on ``memory://``."""
    if request.param == "local":
        return TableStore(str(tmp_path / "dst"))
    return TableStore(f"memory://lease-test-{uuid.uuid4().hex[:8]}/dst")


def _s3_store(s3_endpoint) -> TableStore:
    bucket = s3_endpoint.make_bucket("lease-test")
    return TableStore(f"{bucket}/dst-{uuid.uuid4().hex[:8]}")


# ------------------------------------------------------------------------------------------ the lease


def _race(dst: str, n: int = 4) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=lease_drivers.take_once, args=(dst, f"run{i}", barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_drivers_started_together_exactly_one_takes_the_lease(where, tmp_path, request):
    if where == "s3":
        dst = _s3_store(request.getfixturevalue("s3_endpoint")).dst
    else:
        dst = str(tmp_path / "dst")
    outcomes = _race(dst)
    took = [o for o in outcomes if o[1] == "took"]
    refused = [o for o in outcomes if o[1] == "refused"]
    assert len(took) == 1 and len(refused) == 3, outcomes
    assert took[0][2] == 1  # the first generation, written once
    for _, _, message in refused:
        assert f"preprocess run {took[0][0]} (host " in message and "holds the lease" in message
    # once the winner released it, a later driver takes it at the next generation
    later = Lease(TableStore(dst), _owner("later"), ttl_s=30.0).acquire()
    assert later.generation == 3  # 1: taken, 2: released, 3: this one
    later.release()


@pytest.mark.parametrize("where", ["local", "memory", pytest.param("s3", marks=pytest.mark.slow)])
def test_create_exclusive_refuses_an_existing_record_and_writes_it_whole(where, tmp_path, request):
    if where == "s3":
        store = _s3_store(request.getfixturevalue("s3_endpoint"))
    elif where == "memory":
        store = TableStore(f"memory://excl-{uuid.uuid4().hex[:8]}")
    else:
        store = TableStore(str(tmp_path))
    path = store.path(LEASE_DIR, "lease-000000000001.json")
    create_exclusive(store.fs, path, b"first")
    with pytest.raises(FileExistsError):
        create_exclusive(store.fs, path, b"second")
    assert store.fs.cat_file(path) == b"first"
    assert [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(LEASE_DIR), detail=False)] == [
        "lease-000000000001.json"]  # no file written aside is left


def test_a_second_driver_is_refused_with_the_owner_and_expiry_or_waits_for_the_release(store):
    first = Lease(store, OTHER, ttl_s=60.0).acquire()
    second = Lease(store, _owner("second"), ttl_s=60.0)
    t0 = time.monotonic()
    with pytest.raises(LeaseHeldError) as refused:
        second.acquire(wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3  # it waited lease_wait_s before refusing
    message = str(refused.value)
    expiry = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(first.expires))
    assert f"is being written by preprocess run {OTHER.run_id} (host node-7, pid {os.getpid()})" in message
    assert f"until {expiry}" in message and "--lease-wait" in message and store.uri(store.root) in message
    assert second.current().owner == OTHER and not second.held

    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    second.acquire(wait_s=30.0)  # waits for the release, then takes the next generation
    assert 0.4 <= time.monotonic() - t0 < 10 and second.held
    assert second.current().owner == second.owner and second.generation == first.generation + 1
    second.release()
    assert second.current().released


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_an_expired_lease_is_taken_over_and_its_stalled_owner_commits_nothing_more(where, tmp_path, request, caplog):
    import pyarrow as pa

    store = _s3_store(request.getfixturevalue("s3_endpoint")) if where == "s3" else TableStore(str(tmp_path / "dst"))
    stalled = Lease(store, OTHER, ttl_s=1.0, refresh_s=3600.0).acquire()  # never renews: a stalled driver
    committer = Committer(store, ERRORS_DIR, "stalled", key=None, lease=stalled)
    with caplog.at_level(logging.WARNING, logger="pipelines.lease"):
        taker = Lease(store, _owner("taker"), ttl_s=60.0).acquire(wait_s=20.0)
    assert taker.generation == stalled.generation + 1
    assert f"took over the lease of {taker.uri} from preprocess run {OTHER.run_id}" in caplog.text
    assert "expired at" in caplog.text

    with pytest.raises(LeaseLostError, match="lost the lease of .* to preprocess run taker"):
        committer.commit_table(pa.table({"x": [1]}), ["k"])
    assert store.committed(ERRORS_DIR) == []  # its part was never moved into place
    with pytest.raises(LeaseLostError):
        stalled.check()
    stalled.release()  # a lost lease is not released over the new owner's
    assert taker.current().owner == taker.owner and not taker.current().released
    taker.check()
    taker.release()


def test_the_lease_of_a_driver_killed_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    dst = str(tmp_path / "dst")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=lease_drivers.hold_forever, args=(dst, ready))
    proc.start()
    try:
        assert ready.wait(120), "the child never took the lease"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    store = TableStore(dst)
    held = Lease(store, _owner("next"), ttl_s=60.0)
    assert held.current().owner.pid == proc.pid and held.current().expires > time.time() + 500
    with caplog.at_level(logging.WARNING, logger="pipelines.lease"):
        held.acquire(wait_s=0.0)  # its lease runs 10 more minutes, but its process is gone
    assert "its process is gone" in caplog.text
    held.release()
    # a record of the same pid from another machine is not this machine's to judge: it stands until it expires
    far = Lease(store, LeaseOwner("far", "edit", "node-9", proc.pid, "another-machine"), ttl_s=60.0).acquire()
    try:
        with pytest.raises(LeaseHeldError, match="edit run far"):
            Lease(store, _owner("next2"), ttl_s=60.0).acquire(wait_s=0.0)
    finally:
        far.release()


def test_the_lease_is_renewed_while_the_run_goes_on_and_old_records_are_deleted(store):
    lease = Lease(store, _owner("long"), ttl_s=0.6).acquire()  # renewed every 0.2 s
    first_expiry = lease.expires
    time.sleep(1.5)
    assert lease.generation >= 4 and lease.expires > first_expiry + 0.6
    on_disk = lease._generations()
    assert on_disk[-1] == lease.generation and len(on_disk) <= 3
    lease.check()
    lease.release()
    gen = lease.generation
    time.sleep(0.5)
    assert lease._generations()[-1] == gen and lease.current().released  # no renewal after the release
    with pytest.raises(Exception, match="does not hold the lease"):
        lease.check()


def test_a_lease_near_its_expiry_is_renewed_by_check_before_a_commit(store):
    lease = Lease(store, _owner("slow"), ttl_s=0.9, refresh_s=3600.0).acquire()
    generation = lease.generation
    time.sleep(0.7)  # less than a third of the TTL left
    lease.check()
    assert lease.generation == generation + 1 and lease.expires > time.time() + 0.8
    lease.release()


