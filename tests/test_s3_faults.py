"""Object-store faults (issue 9, item 7): a proxy in front of moto fails 20% of S3 requests (15% answered 500
InternalError / 503 SlowDown, 5% forwarded to the store and then dropped without an answer); the retry policy
of `pipelines.storage` absorbs them with exponential backoff, and a preprocess run with SRC and DST behind the
proxy writes every clip exactly once.

The faults are drawn from a seeded generator in arrival order (`tests.fixtures.fault_proxy`), so the n-th
request of a run meets the same fate every run; the seeds below were chosen so that the first 40 requests
hold at least 4 errors and 2 drops (a run makes more than 40)."""

from __future__ import annotations

import os
import random

import pytest

from pipelines.storage import S3RetryConfig, configure_s3_retries
from tests.fixtures.fault_proxy import DROP, E500, E503, OK

FAIL, DROPPED = 0.15, 0.05  # fractions of requests answered 500/503, and forwarded then dropped: 20% fail


def _faults(proxy) -> int:
    counts = proxy.counts()
    return counts[E500] + counts[E503] + counts[DROP]


def _retried(proxy) -> tuple[set, set]:
    """(keys of faulted requests, those of them answered later): a retry repeats method, path and range."""
    faulted, answered = set(), set()
    for r in proxy.log:
        if r.outcome != OK:
            faulted.add(r.key)
        elif r.key in faulted:
            answered.add(r.key)
    return faulted, answered


def test_retry_policy_reaches_every_s3_filesystem(monkeypatch):
    import fsspec
    import s3fs

    cfg = configure_s3_retries()
    assert cfg == S3RetryConfig(max_attempts=8, mode="standard", s3fs_retries=5)
    fs = fsspec.filesystem("s3", endpoint_url="http://127.0.0.1:9", skip_instance_cache=True)
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 8, "mode": "standard"}
    assert fs.retries == s3fs.S3FileSystem.retries == 5
    explicit = fsspec.filesystem("s3", endpoint_url="http://127.0.0.1:9", skip_instance_cache=True,
                                 config_kwargs={"retries": {"total_max_attempts": 2}})
    assert explicit.config_kwargs["retries"] == {"total_max_attempts": 2}  # explicit storage options win
    env = {"GEN1_S3_MAX_ATTEMPTS": "4", "GEN1_S3_RETRY_MODE": "adaptive", "GEN1_S3FS_RETRIES": "2"}
    assert S3RetryConfig.from_env(env) == S3RetryConfig(4, "adaptive", 2)
    with pytest.raises(ValueError, match="retry mode: expected one of"):
        S3RetryConfig.from_env({"GEN1_S3_RETRY_MODE": "forever"})
    with pytest.raises(ValueError, match="max_attempts: expected an integer >= 1, found 0"):
        S3RetryConfig(max_attempts=0)


@pytest.mark.timeout(120)
def test_proxy_faults_break_a_client_without_retries_and_not_ours(faulty_s3, s3_endpoint):
    import fsspec
    import s3fs

    bucket = s3_endpoint.make_bucket("fault-proxy-test")[len("s3://"):]
    ours = fsspec.filesystem("s3", skip_instance_cache=True)  # the endpoint is the proxy (AWS_ENDPOINT_URL)
    for i in range(20):
        ours.pipe_file(f"{bucket}/k{i}", b"x%d" % i)
    assert set(faulty_s3.counts()) == {OK} and faulty_s3.counts()[OK] >= 20  # no faults until configured

    faulty_s3.configure(FAIL, DROPPED, seed=1)
    bare = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"total_max_attempts": 1}})
    bare.retries = 1  # s3fs's own layer: one try
    failed = 0
    for i in range(20):
        try:
            assert bare.cat_file(f"{bucket}/k{i}") == b"x%d" % i
        except OSError:
            failed += 1
    # the faults are real: requests fail (a dropped HEAD/GET on a reused connection may be re-sent by aiohttp)
    assert 2 <= failed <= _faults(faulty_s3), (failed, faulty_s3.counts())

    faulty_s3.configure(FAIL, DROPPED, seed=2)
    for i in range(20):
        ours.pipe_file(f"{bucket}/r{i}", b"y%d" % i)
        assert ours.cat_file(f"{bucket}/r{i}") == b"y%d" % i
    faulted, answered = _retried(faulty_s3)
    counts = faulty_s3.counts()
    assert counts[E500] + counts[E503] >= 4 and counts[DROP] >= 2, counts
    assert answered == faulted, (faulted - answered)  # every faulted request was retried until answered
    assert ours.find(bucket) == sorted([f"{bucket}/k{i}" for i in range(20)] + [f"{bucket}/r{i}" for i in range(20)])


@pytest.mark.timeout(60)
def test_retries_back_off_exponentially(faulty_s3, s3_endpoint):
    """Three 503 SlowDown answers in a row to one PUT: botocore waits rand() x 2^i s before retry i (full
    jitter, capped at 20 s). Its rand() is the global generator's, so after ``random.seed`` the waits are
    known in advance: each measured gap between attempts must be at least that wait (plus request time)."""
    import fsspec

    bucket = s3_endpoint.make_bucket("fault-backoff-test")[len("s3://"):]
    ours = fsspec.filesystem("s3", skip_instance_cache=True)
    ours.pipe_file(f"{bucket}/warm", b"")  # connect outside the measurement
    faulty_s3.configure(0.0)
    random.seed(3)
    expected = [random.random() * 2**i for i in range(3)]  # 0.24, 1.09, 1.48 s: growing waits
    random.seed(3)
    faulty_s3.fail_next(3, E503)
    ours.pipe_file(f"{bucket}/k", b"payload")
    attempts = list(faulty_s3.log)
    assert [r.outcome for r in attempts] == [E503] * 3 + [OK] and len({r.key for r in attempts}) == 1, attempts
    waits = [b.t - a.t for a, b in zip(attempts[:-1], attempts[1:], strict=True)]
    assert all(e - 0.01 <= w <= e + 1.0 for w, e in zip(waits, expected, strict=True)), (waits, expected)
    assert ours.cat_file(f"{bucket}/k") == b"payload"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_preprocess_on_a_faulty_s3_writes_every_clip_exactly_once(faulty_s3, s3_endpoint, make_synthetic_clip,
                                                                   tiny_models):
    import ray

    from pipelines.preprocess import PreprocessConfig, run_preprocess
    from pipelines.runtime import init_ray
    from pipelines.schema import read_errors, read_shards

    bucket = s3_endpoint.make_bucket("fault-preprocess-test")
    for name, (w, h) in {"a": (96, 64), "b": (64, 96), "c": (96, 64)}.items():
        make_synthetic_clip(f"{bucket}/corpus/{name}.mp4", frames=16, width=w, height=h)
    assert not ray.is_initialized(), "this test starts its own Ray, whose workers reach S3 through the proxy"
    assert os.environ["AWS_ENDPOINT_URL"] == faulty_s3.url
    init_ray(num_cpus=2)  # workers inherit AWS_ENDPOINT_URL: every S3 request of the run goes through the proxy
    try:
        faulty_s3.configure(FAIL, DROPPED, seed=4)
        cfg = PreprocessConfig(models="tiny", size=(64, 48), clips_per_video=2, shard_size=2, frames_format="raw",
                               progress=False)
        summary = run_preprocess(f"{bucket}/corpus", f"{bucket}/features", cfg)
    finally:
        ray.shutdown()
    counts, (faulted, answered) = faulty_s3.counts(), _retried(faulty_s3)
    faulty_s3.configure(0.0)  # read the result back without faults
    assert summary.error is None, summary
    assert (summary.videos, summary.planned) == (3, 6), summary
    ids = read_shards(f"{bucket}/features", ["clip_id"]).column("clip_id").to_pylist()
    errors = set(read_errors(f"{bucket}/features").column("clip_id").to_pylist())
    assert len(ids) == len(set(ids)), f"duplicate clips: {sorted(ids)}"
    assert not set(ids) & errors and len(set(ids) | errors) == 6  # each clip written once or an error
    assert (summary.ok, summary.failed) == (6, 0), summary  # 8 attempts a request: the faults are absorbed
    assert counts[E500] + counts[E503] >= 5 and counts[DROP] >= 2, counts  # 20% of ~50 requests
    assert answered == faulted, (faulted - answered, counts)  # every faulted request was retried until answered
    import fsspec

    assert not fsspec.filesystem("s3").find(f"{bucket[len('s3://'):]}/features/shards/_tmp")
