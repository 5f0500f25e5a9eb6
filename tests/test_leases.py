"""Concurrent drivers (issue 17, item 5): the lease of a DST (`pipelines.lease`), the removal of stale
``_tmp/`` leftovers, and failed bookkeeping writes that make a run exit 6.

The lease is exercised on the filesystems the jobs write to: a local folder, ``memory://`` and the moto S3
endpoint (whose PutObject honours ``If-None-Match: *``, as AWS S3 does). Races run in real processes started
at one barrier; the end-to-end test starts two `gen1 preprocess` drivers together on one DST."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from gen1.config import TINY, ConfigError
from jobs.exit_codes import EXIT_BOOKKEEPING, EXIT_DST_BUSY, EXIT_OK
from pipelines.commits import Committer
from pipelines.edit import EditJobConfig, EditRun
from pipelines.evaluate import EvalConfig
from pipelines.lease import (
    LEASE_DIR,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LeaseOwner,
    create_exclusive,
    hold_dst,
)
from pipelines.preprocess import PreprocessConfig
from pipelines.runtime import init_ray
from pipelines.schema import ERRORS_DIR, RUNS_DIR, SHARDS_DIR, TMP_DIR, TableStore, read_errors, read_shards
from pipelines.sources import plan_video
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


def test_an_edit_run_that_lost_its_lease_stops_at_its_next_commit(tmp_path):
    import pyarrow as pa

    store = TableStore(str(tmp_path / "dst"))
    stalled = Lease(store, OTHER, ttl_s=0.5, refresh_s=3600.0).acquire()
    taker = Lease(store, _owner("taker"), ttl_s=60.0).acquire(wait_s=20.0)
    run = EditRun(EditJobConfig(dst=store.dst, src="unused", prompts=("a dog",), commit_every=1), TINY, "stalled",
                  stalled)
    failed = {"edit_key": "k0", "clip_id": "c0", "source_uri": "/v/0.mp4", "start": 0, "status": "error",
              "error_stage": "edit", "error_type": "ValueError", "error_message": "boom", "error_traceback": ""}

    class Stream:  # what `_edit_pass` returns: one batch holding one failed edit
        def iter_batches(self, **kw):
            yield pa.Table.from_pylist([failed])

    run._edit_pass = lambda todo: Stream()
    with pytest.raises(LeaseLostError, match="to preprocess run taker"):  # not a `pipeline` error of the run
        run.run_edits([{"edit_key": "k0", "clip_id": "c0", "source_uri": "/v/0.mp4"}])
    assert store.committed(ERRORS_DIR) == []
    taker.release()


# ---------------------------------------------------------------------------------------- _tmp leftovers


def _leftover(store: TableStore, table: str, run_id: str, age_s: float = 0.0) -> str:
    path = store.path(table, TMP_DIR, run_id, "part.parquet")
    store.fs.makedirs(store.fs._parent(path), exist_ok=True)
    store.fs.pipe_file(path, b"never committed")
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_tmp_leftovers_older_than_the_age_are_removed_at_start_and_fresh_ones_kept(tmp_path):
    store = TableStore(str(tmp_path / "dst"))
    old = _leftover(store, SHARDS_DIR, "20250101T000000-dead01", age_s=2 * 86400)
    old_errors = _leftover(store, ERRORS_DIR, "20250101T000000-dead01", age_s=2 * 86400)
    fresh = _leftover(store, SHARDS_DIR, "20260101T000000-fresh1", age_s=600)
    cfg = PreprocessConfig(tmp_max_age_s=3600)
    with hold_dst(store, "preprocess", "20260101T000100-mine01", cfg, (SHARDS_DIR, ERRORS_DIR)):
        assert not os.path.exists(old) and not os.path.exists(old_errors)
        assert os.path.exists(fresh)
    assert store.remove_stale_tmp(SHARDS_DIR, 86400) == []  # nothing is a day old now


@pytest.mark.slow
def test_tmp_leftovers_on_s3_are_aged_by_their_last_modified_time(s3_endpoint):
    store = _s3_store(s3_endpoint)
    leftover = _leftover(store, SHARDS_DIR, "20250101T000000-dead01")
    mine = _leftover(store, SHARDS_DIR, "20260101T000100-mine01")
    assert store.remove_stale_tmp(SHARDS_DIR, 3600, keep="20260101T000100-mine01") == []  # seconds old: kept
    time.sleep(1.1)
    removed = store.remove_stale_tmp(SHARDS_DIR, 1.0, keep="20260101T000100-mine01")
    assert removed == [store.uri(store.path(SHARDS_DIR, TMP_DIR, "20250101T000000-dead01"))]
    assert not store.fs.exists(leftover) and store.fs.exists(mine)


# ------------------------------------------------------------------------------------------ settings


def test_lease_settings_are_validated_and_reach_every_jobs_config(tmp_path):
    from jobs.cli import build_parser
    from jobs.commands import edit, eval, preprocess

    for bad in ({"lease_ttl_s": 0}, {"lease_wait_s": -1}, {"tmp_max_age_s": float("nan")},
                {"lease_ttl_s": "soon"}):
        for make in (PreprocessConfig, lambda **kw: EditJobConfig(dst="d", src="s", **kw),
                     lambda **kw: EvalConfig(edits="e", **kw)):
            with pytest.raises(ConfigError, match=next(iter(bad))):
                make(**bad)
    defaults = PreprocessConfig()
    assert (defaults.lease_ttl_s, defaults.lease_wait_s, defaults.tmp_max_age_s) == (120.0, 0.0, 86400.0)
    parser = build_parser()
    assert preprocess.config_from_args(parser.parse_args(["preprocess", "s", "d", "--lease-wait", "30"])).lease_wait_s == 30
    assert edit.config_from_args(parser.parse_args(["edit", "s", "d", "--auto-prompts", "1", "--lease-wait", "5"])
                                 ).lease_wait_s == 5
    assert eval.config_from_args(parser.parse_args(["eval", "--edits", "e", "--lease-wait", "7"])).lease_wait_s == 7


@pytest.mark.parametrize("job", ["preprocess", "edit", "eval"])
def test_every_job_refuses_a_dst_held_by_another_driver_with_exit_code_5(job, tmp_path, capsys, make_synthetic_clip):
    from jobs.cli import main

    src = tmp_path / "src"
    make_synthetic_clip(src / "v.mp4")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a watercolor painting\n")
    dst = tmp_path / "dst"
    argv = {"preprocess": ["preprocess", str(src), str(dst)],
            "edit": ["edit", str(src), str(dst), "--prompts", str(prompts)],
            "eval": ["eval", "--edits", str(tmp_path / "edits"), "--out", str(tmp_path / "out"), "--run-name", "n"]}[job]
    held = tmp_path / "out" / "n" if job == "eval" else dst
    other = Lease(TableStore(str(held)), OTHER, ttl_s=60.0).acquire()
    try:
        assert main([*argv, "--lease-wait", "0.2"]) == EXIT_DST_BUSY
    finally:
        other.release()
    err = capsys.readouterr().err
    assert f"gen1 {job}: error: LeaseHeldError: " in err and f"preprocess run {OTHER.run_id} (host node-7" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in held.iterdir()) == [LEASE_DIR]  # nothing else was written


# ----------------------------------------------------------------------------------------- bookkeeping


def test_a_failed_run_record_write_of_an_edit_run_is_reported_in_its_summary(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / RUNS_DIR).write_text("a file where the runs folder should be")
    run = EditRun(EditJobConfig(dst=str(dst), src="unused", prompts=("a dog",)), TINY, "run0")
    assert run.write_record() is None
    (error,) = run.summary.bookkeeping_errors
    assert error.startswith(f"could not write the run record file://{dst}/runs/edit-run0.json: ")
    assert "FileExistsError" in error or "NotADirectoryError" in error


CONFIG = "clips_per_video: 2\nsize: [64, 48]\nshard_size: 1\ndecode_batch_size: 1\nprogress: false\n"


@pytest.fixture(scope="module")
def ray_address():
    """A local 2-CPU Ray for this module's runs; yields its address for drivers in other processes."""
    import ray

    started = init_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def footage(tmp_path_factory, make_synthetic_clip) -> tuple[Path, Path, set[str]]:
    """Two videos of two tiny clips each, the preprocess config, and the clip ids it plans."""
    root = tmp_path_factory.mktemp("lease-footage")
    uris = [make_synthetic_clip(root / "src" / f"v{i}.mp4", frames=24, width=64, height=48) for i in range(2)]
    config = root / "pp.yaml"
    config.write_text(CONFIG)
    res = PreprocessConfig.from_yaml(config).resolved()
    ids = {p.clip_id for u in uris for p in plan_video(u, res.frames, res.stride, 2, res.size)}
    assert len(ids) == 4
    return root / "src", config, ids


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_preprocess_drivers_started_together_commit_each_clip_once(ray_address, footage, tmp_path):
    src, config, ids = footage
    dst = tmp_path / "dst"
    argv = [sys.executable, "-m", "jobs.cli", "preprocess", str(src), str(dst), "--config", str(config),
            "--models", "tiny", "--ray-address", ray_address, "--lease-wait", "300"]
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=360) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [EXIT_OK, EXIT_OK], "\n\n".join(t[-3000:] for t in texts)
    lines = [re.search(r"preprocess \S+: (\d+) ok, (\d+) failed, (\d+) skipped", t) for t in texts]
    counts = sorted((int(m[1]), int(m[2]), int(m[3])) for m in lines)
    assert counts == [(0, 0, 4), (4, 0, 0)], counts  # one did the work; the other waited and found it done
    assert sum("waiting up to 300s for the lease" in t for t in texts) == 1  # they did overlap
    shard_ids = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()
    assert sorted(shard_ids) == sorted(ids)  # every clip id committed exactly once
    assert read_errors(str(dst)).num_rows == 0  # and none turned into a `pipeline` error by the other
    records = [json.loads(p.read_text()) for p in (dst / RUNS_DIR).glob("*.json")]
    assert len(records) == 2 and all(not r["summary"]["bookkeeping_errors"] for r in records)
    assert Lease(TableStore(str(dst)), _owner("after"), 60.0).current().released


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_whose_run_record_and_quarantine_writes_fail_exits_6_with_its_rows_committed(
    ray_address, bad_videos, tmp_path, capsys
):
    from jobs.commands.preprocess import main

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / RUNS_DIR).write_text("a file where the runs folder should be")
    (dst / "quarantine").write_text("and one where the quarantine folder should be")
    # four files that fail planning: their error rows are this run's results, committed before the bookkeeping
    argv = [str(bad_videos), str(dst), "--models", "tiny", "--max-failure-fraction", "1", "--no-progress"]
    assert main(argv) == EXIT_BOOKKEEPING
    err = capsys.readouterr().err
    assert f"FAILED: the results are committed in {dst}, but the run could not write the run record file://{dst}/runs/" in err
    assert f"could not write the quarantine list file://{dst}/quarantine/quarantine.parquet: " in err
    assert read_errors(str(dst)).num_rows == 4
    assert Lease(TableStore(str(dst)), _owner("after"), 60.0).current().released  # given back all the same
