"""Commits and resume at corpus scale: ours against the code before issue 22, on the same DST, in one run.

    python jobs/benchmarks/commit_scale.py [--sizes 1000,10000,100000] [--ids-per-part 100]
        [--s3-parts 1000] [--commits 20] [--root DIR] [--json OUT]

For each size N it builds a DST of N committed feature-shard parts of ``--ids-per-part`` clip ids each,
locally under ``--root`` (default: a temp folder, removed at the end), and one of ``--s3-parts`` parts on a
local S3 endpoint (moto's server on 127.0.0.1, started as ``tests/fixtures/s3.py`` does and stopped by its
pid). The parts are synthetic (``clip_id``, ``source_uri`` -- 10 clips a video --, ``start``) and laid out
as `pipelines.commits.Committer` leaves them: each with its key index (`pipelines.commit_index`), no merged
index yet. Then, each in a fresh Python process (so that peak RSS is per size and per code), three
measurements:

- ``baseline``: the code before issue 22, kept below as `BaselineCommitter`, a faithful copy of that
  `Committer`'s ``refresh`` and ``commit_file``: start-up reads the ``clip_id`` and ``source_uri`` columns of
  every part into Python sets; every commit first re-lists the table (and reads the parts it has not seen);
- ``cold``: ours on its first start over that DST: every part's index read, then the merged index written;
- ``ours``: the next start, which reads the merged index (what every later run over the DST does).

Each measures start-up (the committed keys loaded), then ``--commits`` more parts of new ids committed one
by one (their ``_tmp/`` files written beforehand, untimed; the median seconds of a commit and the listings
of the table they made), and the process's peak RSS (``ru_maxrss``) and its RSS after imports. No lease is
held (a lease check is the same small cost for both). A measurement removes the parts it committed, so all
three see the same DST. ``ids_10m_mb`` is peak RSS minus RSS after imports at the size holding 10M ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.process_exit import exit_process
from pipelines.commit_index import INDEX_DIR, MERGED_FILE, index_path, write_part_index
from pipelines.commits import Committer
from pipelines.keyset import key_hashes
from pipelines.schema import COMPRESSION, PART_PREFIX, SHARDS_DIR, TableStore

log = logging.getLogger("commit_scale")

CLIPS_PER_VIDEO = 10
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
IMPLS = ("baseline", "cold", "ours")


# ------------------------------------------------------------------------- today's code, before issue 22


class BaselineCommitter:
    """BASELINE: `pipelines.commits.Committer` as it was before issue 22 (commit c6c22d8), its ``refresh`` and
    ``commit_file`` copied unchanged but for the lease (none here) and logging, with the listing of
    `TableStore.committed` of then (`list_parts`): Python sets of strings, and a re-listing of the table before
    every commit."""

    def __init__(self, store: TableStore, table: str, run_id: str, key: str = "clip_id",
                 track: Sequence[str] = ()):
        self.store, self.table, self.run_id, self.key = store, table, run_id, key
        self.track = tuple(track)
        self.seen: set[str] = set()
        self.committed: set[str] = set()
        self.values: dict[str, set[Any]] = {c: set() for c in self.track}
        self.written: set[str] = set()
        self.rows = self.parts = self.dropped_duplicates = 0

    def list_parts(self) -> list[str]:
        """`TableStore.committed` before issue 22: a glob of the table's parts."""
        try:
            found = self.store.fs.glob(self.store.path(self.table, f"{PART_PREFIX}*.parquet"))
        except FileNotFoundError:
            return []
        return sorted(found)

    def refresh(self) -> set[str]:
        for path in self.list_parts():
            if path not in self.seen:
                part = self.store.read(path, [self.key, *self.track])
                keys = part.column(self.key).to_pylist()
                self.seen.add(path)
                self.committed.update(keys)
                for col in self.track:
                    self.values[col].update(part.column(col).to_pylist())
        return self.committed

    def commit_file(self, tmp_path: str, keys: Sequence[str]) -> int:
        keys = [str(k) for k in keys]
        self.refresh()
        dup = set(keys) & self.committed
        if dup:
            self.dropped_duplicates += len(dup)
            if len(dup) == len(set(keys)):
                self.store.fs.rm(tmp_path)
                return 0
            data = self.store.read(tmp_path)
            keep = [k not in dup for k in data.column(self.key).to_pylist()]
            self.store.fs.rm(tmp_path)
            tmp_path = self.store.write_tmp(self.table, data.filter(pa.array(keep)), self.run_id)
            keys = [k for k in keys if k not in dup]
        self.parts += 1
        final = self.store.commit(self.table, tmp_path, f"{self.run_id}-{self.parts:05d}-{uuid.uuid4().hex[:8]}")
        self.seen.add(final)
        self.committed.update(keys)
        self.written.update(keys)
        self.rows += len(keys)
        return len(keys)


# ------------------------------------------------------------------------------------------ the DST


def synthetic_part(first: int, ids: int, tag: str = "") -> tuple[pa.Table, list[str], list[str]]:
    """Rows ``first .. first + ids - 1`` of the synthetic corpus: (table, clip ids, source URIs)."""
    uris = [f"s3://library/videos/{tag}v{(first + i) // CLIPS_PER_VIDEO:08d}.mp4" for i in range(ids)]
    starts = [((first + i) % CLIPS_PER_VIDEO) * 8 for i in range(ids)]
    clip_ids = [hashlib.sha1(f"{u}|{s}".encode()).hexdigest()[:16] for u, s in zip(uris, starts, strict=True)]
    table = pa.table({"clip_id": clip_ids, "source_uri": uris, "start": pa.array(starts, pa.int32())})
    return table, clip_ids, uris


def build_dst(root: Path, parts: int, ids_per_part: int) -> Path:
    """``parts`` committed parts under ``root`` (a local DST), each with its key index, as a committer writes
    them (one run per 1000 parts)."""
    store = TableStore(str(root))
    store.fs.makedirs(store.path(SHARDS_DIR), exist_ok=True)
    t0 = time.monotonic()
    for i in range(parts):
        table, ids, uris = synthetic_part(i * ids_per_part, ids_per_part)
        name = f"{PART_PREFIX}build{i // 1000:04d}-{i % 1000 + 1:05d}-{uuid.uuid4().hex[:8]}.parquet"
        write_part_index(store, SHARDS_DIR, name, key_hashes(ids), {"source_uri": key_hashes(set(uris))})
        pq.write_table(table, store.path(SHARDS_DIR, name), compression=COMPRESSION)
    log.info("built %d parts (%d ids) under %s in %.0fs", parts, parts * ids_per_part, root, time.monotonic() - t0)
    return root


# ------------------------------------------------------------------------------------ one measurement


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(impl: str, dst: str, commits: int, ids_per_part: int) -> dict[str, Any]:
    """One measurement (see the module docstring), in this process; leaves the DST as it found it (the
    merged index aside: ``cold`` writes it)."""
    store = TableStore(dst)  # imports s3fs for an s3:// DST before the RSS after imports is taken
    rss_base = _rss_mb()
    run_id = f"bench-{impl}-{uuid.uuid4().hex[:6]}"
    merged = store.path(INDEX_DIR, SHARDS_DIR, MERGED_FILE)
    if impl == "cold" and store.fs.exists(merged):
        store.fs.rm(merged)
    t0 = time.perf_counter()
    if impl == "baseline":
        committer: Any = BaselineCommitter(store, SHARDS_DIR, run_id, track=("source_uri",))
        committed = len(committer.refresh())
        read_parts = len(committer.seen)
    else:
        committer = Committer(store, SHARDS_DIR, run_id, track=("source_uri",))
        committed = len(committer.committed)
        read_parts = committer.index.read_parts
    startup = time.perf_counter() - t0
    pending = []
    for i in range(commits):
        table, ids, _ = synthetic_part(i * ids_per_part, ids_per_part, tag=f"{run_id}/")
        pending.append((store.write_tmp(SHARDS_DIR, table, run_id), ids))
    listings: list[str] = []
    lister, name = (committer, "list_parts") if impl == "baseline" else (store, "committed")
    real = getattr(lister, name)
    setattr(lister, name, lambda *a: listings.append(name) or real(*a))  # counts the listings of the table
    seconds = []
    for path, ids in pending:
        t = time.perf_counter()
        assert committer.commit_file(path, ids) == len(ids)
        seconds.append(time.perf_counter() - t)
    setattr(lister, name, real)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ours = [p for p in store.committed(SHARDS_DIR) if p.rsplit("/", 1)[-1].startswith(f"{PART_PREFIX}{run_id}-")]
    store.fs.rm(ours + [index_path(store, SHARDS_DIR, p.rsplit("/", 1)[-1]) for p in ours if impl != "baseline"])
    store.remove_tmp(SHARDS_DIR, run_id)
    return {"startup_s": startup, "commit_s": statistics.median(seconds), "commit_max_s": max(seconds),
            "listings_per_commit": len(listings) / max(1, commits), "committed_ids": committed,
            "parts_read_at_startup": read_parts,
            "rss_mb": peak, "rss_base_mb": rss_base}


def measure_in_subprocess(impl: str, dst: str, commits: int, ids_per_part: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.benchmarks.commit_scale", "--measure", impl, "--dst", dst,
           "--commits", str(commits), "--ids-per-part", str(ids_per_part)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log.info("%s %s: %s", impl, dst, {k: round(v, 4) for k, v in result.items()})
    return result


# ------------------------------------------------------------------------------------- S3 (moto)


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url, timeout=1).read()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def start_moto(log_file) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1 (as tests/fixtures/s3.py starts it); the AWS variables of
    this process (and so of the measurements) point at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _answers(url + "/moto-api/"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto server on {url} did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    no_proxy = {k: ",".join(x for x in (os.environ.get(k), "127.0.0.1", "localhost") if x)
                for k in ("NO_PROXY", "no_proxy")}
    os.environ.update({**MOTO_ENV, "AWS_ENDPOINT_URL": url, **no_proxy})
    return proc, url


def upload(local: Path, dst: str) -> None:
    """Copy a DST built locally to ``dst`` on S3 (s3fs puts many files concurrently)."""
    store = TableStore(dst)
    store.fs.mkdir(dst.removeprefix("s3://").split("/")[0])
    files = [p for p in local.rglob("*") if p.is_file()]
    store.fs.put([str(p) for p in files], [store.path(*p.relative_to(local).parts) for p in files])


# ------------------------------------------------------------------------------------------- the run


def run_sizes(make_dst, sizes: Sequence[int], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """{impl: {size: measurement}} for each size, the DST of each made by ``make_dst(size)``."""
    out: dict[str, dict[str, dict]] = {impl: {} for impl in IMPLS}
    for n in sizes:
        dst = make_dst(n)
        for impl in IMPLS:
            out[impl][str(n)] = measure_in_subprocess(impl, dst, args.commits, args.ids_per_part)
            if out[impl][str(n)]["committed_ids"] != n * args.ids_per_part:
                raise RuntimeError(f"{impl} found {out[impl][str(n)]['committed_ids']} ids; expected "
                                   f"{n * args.ids_per_part}")
    return out


def report(local: dict, s3: dict | None, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON report: ours (with the merged index) under ``parts``, the cold start beside it, the baseline
    with the same keys, ratios and the acceptance checks."""
    ids_10m = str(10_000_000 // args.ids_per_part)

    def table(impl: str, results: dict) -> dict:
        rows = {n: {"commit_s": r["commit_s"], "startup_s": r["startup_s"], "rss_mb": r["rss_mb"],
                    "rss_base_mb": r["rss_base_mb"], "commit_max_s": r["commit_max_s"],
                    "listings_per_commit": r["listings_per_commit"],
                    "parts_read_at_startup": r["parts_read_at_startup"]} for n, r in results[impl].items()}
        if impl == "ours":
            for n, r in results["cold"].items():
                rows[n].update(startup_cold_s=r["startup_s"], rss_cold_mb=r["rss_mb"])
        return rows

    def ids_mb(results: dict) -> float | None:
        r = results.get(ids_10m)
        return None if r is None else r["rss_mb"] - r["rss_base_mb"]

    out: dict[str, Any] = {"parts": table("ours", local), "ids_10m_mb": ids_mb(local["ours"]),
                           "baseline": {"parts": table("baseline", local), "ids_10m_mb": ids_mb(local["baseline"])}}
    sizes = sorted(out["parts"], key=int)
    commit = [out["parts"][n]["commit_s"] for n in sizes]
    startup_per_part = [out["parts"][n]["startup_cold_s"] / int(n) for n in sizes]
    out["ratios"] = {n: {k: out["baseline"]["parts"][n][k] / out["parts"][n][k] for k in ("commit_s", "startup_s",
                                                                                          "rss_mb")} for n in sizes}
    out["acceptance"] = {"commit_largest_over_smallest": commit[-1] / commit[0],
                         "cold_startup_s_per_part": dict(zip(sizes, startup_per_part, strict=True)),
                         "ids_10m_under_200mb": None if out["ids_10m_mb"] is None else out["ids_10m_mb"] < 200}
    if s3 is not None:
        out["s3"] = {"parts": table("ours", s3), "baseline": {"parts": table("baseline", s3)}}
    out.update(ids_per_part=args.ids_per_part, commits=args.commits, cpus=os.cpu_count(),
               load_average=os.getloadavg())
    return out


def print_table(rep: dict[str, Any]) -> None:
    rows = [("local", rep)] + ([("s3", rep["s3"])] if "s3" in rep else [])
    print(f"{'where':<6} {'parts':>7} | {'start-up s: base / cold / ours':>32} | {'commit ms: base / ours':>24} | "
          f"{'peak RSS MB: base / ours':>25}")
    for where, r in rows:
        for n in sorted(r["parts"], key=int):
            o, b = r["parts"][n], r["baseline"]["parts"][n]
            print(f"{where:<6} {int(n):>7} | {b['startup_s']:>10.2f} / {o['startup_cold_s']:>8.2f} / "
                  f"{o['startup_s']:>8.3f} | {1e3 * b['commit_s']:>11.1f} / {1e3 * o['commit_s']:>9.2f} | "
                  f"{b['rss_mb']:>12.0f} / {o['rss_mb']:>9.0f}")
    print(f"10M ids in the driver (peak RSS - RSS after imports): ours {rep['ids_10m_mb']} MB, "
          f"baseline {rep['baseline']['ids_10m_mb']} MB")
    print("baseline / ours:", json.dumps({n: {k: round(v, 2) for k, v in r.items()} for n, r in rep["ratios"].items()}))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="committed parts of each local DST")
    p.add_argument("--ids-per-part", type=int, default=100)
    p.add_argument("--s3-parts", type=int, default=1000, help="parts of the DST on local S3 (moto); 0: none")
    p.add_argument("--commits", type=int, default=20, help="commits measured after start-up")
    p.add_argument("--root", type=Path, default=None, help="where the local DSTs are built (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--measure", choices=IMPLS, help=argparse.SUPPRESS)  # one measurement, in this process
    p.add_argument("--dst", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    root = args.root or Path(tempfile.mkdtemp(prefix="commit-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        local = run_sizes(lambda n: str(build_dst(root / f"local-{n}", n, args.ids_per_part)), sizes, args)
        s3 = None
        if args.s3_parts:
            with tempfile.TemporaryFile() as moto_log:
                proc, _ = start_moto(moto_log)
                try:
                    def on_s3(n: int) -> str:
                        upload(build_dst(root / f"s3-{n}", n, args.ids_per_part), f"s3://commit-scale/dst-{n}")
                        return f"s3://commit-scale/dst-{n}"

                    s3 = run_sizes(on_s3, [args.s3_parts], args)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    rep = report(local, s3, args)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    print_table(rep)
    return rep


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli = parse_args()
    if cli.measure:
        logging.getLogger().setLevel(logging.WARNING)
        print(json.dumps(measure(cli.measure, cli.dst, cli.commits, cli.ids_per_part)))
    else:
        run(cli)
    exit_process(0)
