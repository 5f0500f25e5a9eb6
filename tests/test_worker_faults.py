"""Issue 17 items 3 and 4: work that kills its Ray worker, and calls past their time limit.

3. Every Ray Data call has bounded retries (`pipelines.runtime.RetryConfig`). A stage stand-in that kills
   its own process on one clip: the job finishes, the clip is a ``crash`` error row that counts toward
   quarantine, the clips that shared its blocks are committed, and it was tried exactly as often as the
   retries allow (counted in files by the stand-in). A model stand-in that kills its process as it loads,
   every time: its pass is stopped at the stall limit (`RetryConfig.stall_timeout`), and a rerun commits.
4. An edit past its time limit writes nothing afterwards (`pipelines.timeouts.Cancellation`) and retires
   its actor: the next edit runs in a fresh process (`pipelines.timeouts.Retirement`).

This module's local Ray runs `install_faults` in every worker (a ``worker_process_setup_hook``): the
depth model exits its process on a white clip (and as it loads while ``INIT_CRASH`` exists), planning exits its process on ``crashplan*`` files, and an
edit of the prompt ``hang`` sleeps past its limit before it goes on to write. Each logs every attempt in
``$GEN1_TEST_FAULT_LOG``. The driver is not hooked.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest

from gen1.config import TINY, ConfigError
from gen1.prompts import PromptSpec
from pipelines.keyset import KeySet
from pipelines.preprocess import PreprocessConfig, run_preprocess
from pipelines.quarantine import find_quarantined
from pipelines.runtime import STALL_MARGIN_S, RetryConfig
from pipelines.schema import ERRORS_DIR, ERRORS_SCHEMA, OUTPUTS_DIR, TableStore, read_errors, read_shards
from pipelines.sources import plan_video
from pipelines.timeouts import CallCancelled, Cancellation, StageRetired, call_with_timeout

FAULT_LOG_ENV = "GEN1_TEST_FAULT_LOG"
INIT_CRASH = "crash-depth-init"  # while this file is in the fault log, the hooked depth model dies as it loads
WHITE_MEAN = 240.0  # the hooked depth model exits its process on a clip this bright (mean grey level)
SIZE = (64, 48)
EDIT_LIMIT_S = 10.0  # several times a tiny 2-step edit on 2 busy cores (1 to 2 s)
HANG_S = EDIT_LIMIT_S + 6.0  # the hung edit's sleep: then it goes on to write its mp4, unless stopped

if TYPE_CHECKING:
    from pipelines.edit import EditClip

# Ray workers import this module for `install_faults`: the edit and eval pipelines (torch) are imported in
# the tests that use them, not here, so that a worker that never edits does not pay for them.


def _log(name: str, line: str) -> None:
    with open(os.path.join(os.environ[FAULT_LOG_ENV], name), "a") as f:
        f.write(f"{line}\n")


def install_faults() -> None:
    """Ray worker setup hook: the faults of the module docstring (the edit's once `gen1.sampling` is imported,
    so that workers that never edit do not import torch for it)."""
    from pipelines import preprocess, sources

    real_predict, real_plan = preprocess.DepthStage.predict, sources.plan_video
    real_init = preprocess.DepthStage.__init__

    def init(self, *args, **kwargs):
        if os.path.exists(os.path.join(os.environ[FAULT_LOG_ENV], INIT_CRASH)):
            _log("depth-init-crash", str(os.getpid()))
            os._exit(1)
        real_init(self, *args, **kwargs)

    def predict(self, clips):
        if any(c.mean() > WHITE_MEAN for c in clips):
            _log("depth-crash", f"{os.getpid()} {len(clips)}")
            os._exit(1)
        return real_predict(self, clips)

    def plan(uri, *args, **kwargs):
        if os.path.basename(str(uri)).startswith("crashplan"):
            _log("plan-crash", str(os.getpid()))
            os._exit(1)
        return real_plan(uri, *args, **kwargs)

    preprocess.DepthStage.predict = predict
    preprocess.DepthStage.__init__ = init
    sources.plan_video = plan
    sys.meta_path.insert(0, _PatchOnImport("gen1.sampling", _hang_edits))


def _hang_edits(sampling) -> None:
    real_edit = sampling.edit_video

    def edit_video(models, frames, content, settings, **kw):
        _log("edits", f"{os.getpid()} {content.text} {time.time()}")
        if content.text == "hang":
            time.sleep(HANG_S)
        return real_edit(models, frames, content, settings, **kw)

    sampling.edit_video = edit_video


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after module ``name`` is first imported."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-log")


@pytest.fixture(scope="module")
def faulty_ray(fault_log, tiny_models):
    """A local 2-CPU Ray whose workers run `install_faults`."""
    from tests.fixtures.ray_cluster import hooked_local_ray

    with hooked_local_ray(f"{__name__}.install_faults", {FAULT_LOG_ENV: str(fault_log)}):
        yield


def _lines(log: Path, name: str) -> list[list[str]]:
    path = log / name
    return [line.split() for line in path.read_text().splitlines() if line] if path.exists() else []


# ------------------------------------------------------------------------------------ retry settings


def test_retry_settings_are_bounded_validated_and_carried_by_every_job_config(tmp_path):
    from pipelines.edit import EditJobConfig
    from pipelines.evaluate import EvalConfig

    assert RetryConfig() == RetryConfig(task_retries=2, actor_task_retries=2, actor_restarts=-1, stall_timeout_s=None,
                                        max_lost_blocks=-1)
    for bad, field in (({"task_retries": -1}, "task_retries"), ({"actor_task_retries": 0}, "actor_task_retries"),
                       ({"actor_restarts": 0}, "actor_restarts"), ({"max_lost_blocks": -2}, "max_lost_blocks"),
                       ({"task_retries": 1.5}, "task_retries"), ({"retry": 1}, "unknown keys"),
                       ({"stall_timeout_s": 0}, "stall_timeout_s"), ({"stall_timeout_s": "1h"}, "stall_timeout_s")):
        with pytest.raises(ConfigError, match=field):
            RetryConfig.from_value(bad)
    yaml = tmp_path / "pp.yaml"
    yaml.write_text("retries: {task_retries: 0, actor_task_retries: 1}\n")
    cfg = PreprocessConfig.from_yaml(yaml)
    assert cfg.retries == RetryConfig(task_retries=0, actor_task_retries=1)
    assert cfg.as_dict()["retries"] == {"task_retries": 0, "actor_task_retries": 1, "actor_restarts": -1,
                                        "stall_timeout_s": None, "max_lost_blocks": -1}
    edit = EditJobConfig(dst=str(tmp_path), src="src", retries={"actor_restarts": 5})
    assert edit.retries.actor_restarts == 5 and edit.as_dict()["retries"]["actor_restarts"] == 5
    assert EvalConfig(edits=str(tmp_path), retries={"task_retries": 1}).retries.task_retries == 1


def test_a_pass_stall_limit_follows_the_jobs_longest_call_limit(tmp_path):
    from ray.data.context import DEFAULT_EXECUTION_NO_PROGRESS_TIMEOUT_S

    from pipelines.edit import EditJobConfig

    # a call within its limit is progress to come: the pass waits that long, plus a margin, and no longer
    assert RetryConfig().stall_timeout(PreprocessConfig().call_limits_s) == 600.0 + STALL_MARGIN_S
    edit = EditJobConfig(dst=str(tmp_path), src="src")
    assert RetryConfig().stall_timeout(edit.call_limits_s) == 3600.0 + STALL_MARGIN_S  # > Ray Data's 30 minutes
    assert RetryConfig().stall_timeout((120.0, None)) == DEFAULT_EXECUTION_NO_PROGRESS_TIMEOUT_S  # a call without one
    assert RetryConfig(stall_timeout_s=15).stall_timeout((120.0, 600.0)) == 15.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_actor_dying_in_its_constructor_every_time_ends_its_pass_at_the_stall_limit(faulty_ray, fault_log,
                                                                                           tmp_path):
    """Actors restart without a count of their own (`RetryConfig.actor_restarts`): a constructor that kills its
    process every time is restarted until the pass has made no progress for ``stall_timeout_s``; the clips
    become ``pipeline`` errors (not the clips' fault: no quarantine), and a rerun commits them."""
    from tests.fixtures.clips import encode_mp4, synthetic_frames

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.mp4").write_bytes(encode_mp4(synthetic_frames(24, *SIZE)))
    cfg = PreprocessConfig(models="tiny", size=SIZE, clips_per_video=None, frames_format="raw", progress=False,
                           max_concurrent_decodes=1, retries=RetryConfig(stall_timeout_s=20))
    dst = str(tmp_path / "dst")
    marker = fault_log / INIT_CRASH
    marker.touch()
    try:
        t0 = time.monotonic()
        summary = run_preprocess(str(src), dst, cfg)
        elapsed = time.monotonic() - t0
    finally:
        marker.unlink()
    assert summary.error is not None and "ExecutionTimeoutError" in summary.error, summary.error
    assert (summary.ok, summary.failed, summary.planned) == (0, 3, 3), summary
    assert elapsed < 20 + 90, elapsed  # stopped at the stall limit, not Ray Data's 30 minutes
    assert len({pid for (pid,) in _lines(fault_log, "depth-init-crash")}) >= 2  # restarted, each in a new process
    errors = read_errors(dst).to_pylist()
    assert len(errors) == 3 and {e["stage"] for e in errors} == {"pipeline"}
    table = TableStore(dst).read_all(ERRORS_DIR, ERRORS_SCHEMA)  # as if two runs had failed the same way
    run_id = table.schema.get_field_index("run_id")
    again = table.set_column(run_id, table.schema.field(run_id), pa.array(["another-run"] * table.num_rows))
    quarantine = find_quarantined(pa.concat_tables([table, again]), KeySet.of([]), KeySet.of([]))
    assert not quarantine.clips and not quarantine.videos
    again = run_preprocess(str(src), dst, cfg)  # the model loads now: the rerun commits every clip
    assert (again.ok, again.failed, again.error) == (3, 0, None), again


# ------------------------------------------------------------------------------------- 3. crashes


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_stage_killing_its_process_on_one_clip_becomes_a_crash_row_and_the_job_finishes(faulty_ray, fault_log,
                                                                                          tmp_path):
    from tests.fixtures.clips import encode_mp4, synthetic_frames

    src = tmp_path / "src"
    src.mkdir()
    retries = RetryConfig(task_retries=1, actor_task_retries=1)
    cfg = PreprocessConfig(models="tiny", size=SIZE, clips_per_video=None, frames_format="raw", progress=False,
                           decode_batch_size=3, depth_batch_frames=12, shard_size=3,  # 3 clips per block and call
                           plan_in_driver_max=0, max_concurrent_decodes=1, retries=retries)  # planning in tasks
    res = cfg.resolved()
    frames = synthetic_frames(24, *SIZE)
    (src / "plain.mp4").write_bytes(encode_mp4(frames))
    plans = plan_video(str(src / "plain.mp4"), res.frames, res.stride, None, res.size)
    assert len(plans) == 3
    victim_plan = plans[1]
    frames[min(victim_plan.frame_indices): max(victim_plan.frame_indices) + 1] = 255  # the hooked depth model dies
    (src / "white.mp4").write_bytes(encode_mp4(frames))
    (src / "crashplan.mp4").write_bytes(encode_mp4(synthetic_frames(24, *SIZE)))  # its probe kills its task
    white = {p.start: p.clip_id for p in plan_video(str(src / "white.mp4"), res.frames, res.stride, None, res.size)}
    victim = white[victim_plan.start]
    dst = str(tmp_path / "dst")

    summary = run_preprocess(str(src), dst, cfg)

    assert summary.error is None  # the job finished
    assert (summary.ok, summary.failed, summary.planned) == (5, 2, 7), summary
    ids = read_shards(dst, ["clip_id"]).column("clip_id").to_pylist()
    expected = {p.clip_id for p in plans} | set(white.values()) - {victim}  # the victim's block-mates too
    assert len(ids) == len(set(ids)) == 5 and set(ids) == expected
    errors = {e["uri"].rsplit("/", 1)[-1]: e for e in read_errors(dst).to_pylist()}
    assert sorted(errors) == ["crashplan.mp4", "white.mp4"]
    assert (errors["white.mp4"]["clip_id"], errors["white.mp4"]["stage"], errors["white.mp4"]["error_type"]) == (
        victim, "worker", "crash")
    assert "also when run again alone" in errors["white.mp4"]["message"]
    assert (errors["crashplan.mp4"]["stage"], errors["crashplan.mp4"]["error_type"]) == ("plan", "crash")
    # tried exactly as often as the retries allow: (1 + 1) in its block of 3, then (1 + 1) alone
    depth_attempts = _lines(fault_log, "depth-crash")
    assert [int(n) for _, n in depth_attempts] == [3, 3, 1, 1], depth_attempts
    assert len({pid for pid, _ in depth_attempts}) == 4  # each attempt in a fresh actor process
    assert len(_lines(fault_log, "plan-crash")) == 1 + retries.task_retries
    # the crash rows count toward quarantine: a second run failing the same way quarantines both inputs
    table = TableStore(dst).read_all(ERRORS_DIR, ERRORS_SCHEMA)
    run_id = table.schema.get_field_index("run_id")
    again = table.set_column(run_id, table.schema.field(run_id), pa.array(["another-run"] * table.num_rows))
    twice = pa.concat_tables([table, again])
    quarantine = find_quarantined(twice, KeySet.of(ids), KeySet.of([str(src / "plain.mp4"), str(src / "white.mp4")]))
    assert set(quarantine.clips) == {victim}
    assert [Path(u).name for u in quarantine.videos] == ["crashplan.mp4"]


# ------------------------------------------------------------------------------------ 4. time limits


def test_a_call_past_its_commit_point_is_let_finish_and_one_before_it_is_cancelled():
    done = Cancellation()
    done.publish()
    assert done.cancel() is False and not done.cancelled  # too late: its files are moving into place
    given_up = Cancellation()
    assert given_up.cancel() is True
    with pytest.raises(CallCancelled):
        given_up.publish()

    def publishes_then_finishes(cancel: Cancellation) -> str:
        time.sleep(0.1)
        cancel.publish()
        time.sleep(0.6)  # past the limit, but past the commit point too
        return "moved"

    token = Cancellation()
    assert call_with_timeout(publishes_then_finishes, 0.3, token, cancel=token) == "moved"


@pytest.fixture(scope="module")
def models(tiny_models):
    from gen1.models import Gen1Models

    return Gen1Models.load(TINY, device="cpu")


def _tasks(clip: EditClip, prompts: tuple[str, ...]) -> list[dict]:
    from pipelines.edit import EditGrid, plan_tasks

    return plan_tasks([clip], {clip.clip_id: [(PromptSpec(text=p), "user", None, None) for p in prompts]},
                      EditGrid(), 2, "ddim", TINY)


def _clip(uri: str) -> EditClip:
    from pipelines.edit import EditClip

    (plan,) = plan_video(uri, TINY.frames, 1, 1, (TINY.width, TINY.height))
    return EditClip.from_plan(plan.as_dict())


def test_a_timed_out_edit_writes_nothing_afterwards_and_retires_its_stage(models, synthetic_clip, monkeypatch,
                                                                         tmp_path):
    import gen1.sampling
    from pipelines.edit import EditStage

    real_edit, went_on = gen1.sampling.edit_video, threading.Event()

    def edit_video(models, frames, content, settings, **kw):  # late, then done: it would go on to write
        time.sleep(3.0)
        try:
            return real_edit(models, frames, content, settings, **kw)
        finally:
            went_on.set()

    monkeypatch.setattr(gen1.sampling, "edit_video", edit_video)
    dst = tmp_path / "dst"
    stage = EditStage(TINY, str(dst), "run0", models=models, previews=True, metrics=False, edit_timeout_s=1.0)
    (task,) = _tasks(_clip(synthetic_clip), ("a watercolor street",))
    (row,) = stage(pa.Table.from_pylist([task])).to_pylist()
    assert (row["status"], row["error_stage"], row["error_type"]) == ("error", "edit", "timeout")
    assert went_on.wait(60), "the abandoned edit never finished sampling"
    time.sleep(2.0)  # what it would write (two mp4s, then two moves) takes well under this
    assert [p for p in dst.rglob("*") if p.is_file()] == []  # neither its outputs nor their temp files
    with pytest.raises(StageRetired, match="abandoned after 1s"):  # outside Ray; in an actor: a fresh process
        stage(pa.Table.from_pylist([task]))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_an_edit_past_its_limit_retires_its_actor_and_the_next_edit_runs_in_a_fresh_one(faulty_ray, fault_log,
                                                                                        synthetic_clip, tmp_path):
    import psutil

    from pipelines.edit import EditJobConfig, read_manifest, run_edit

    clip = _clip(synthetic_clip)
    prompts = ("hang", "a watercolor street", "a snowy forest")
    dst = tmp_path / "dst"
    cfg = EditJobConfig(dst=str(dst), clips=[clip], prompts=tuple(PromptSpec(text=p) for p in prompts), steps=2,
                        edit_concurrency=1, edit_timeout_s=EDIT_LIMIT_S, metrics=False, previews=False,
                        commit_every=1, progress=False, retries=RetryConfig(actor_task_retries=1))
    keys = {t["prompt"]: t["edit_key"] for t in _tasks(clip, prompts)}
    summary = run_edit(cfg)

    assert (summary.ok, summary.failed, summary.error) == (2, 1, None), summary
    (error,) = read_errors(str(dst)).to_pylist()
    assert (error["stage"], error["error_type"]) == ("edit", "timeout") and keys["hang"] in error["message"]
    assert sorted(read_manifest(str(dst)).column("edit_key").to_pylist()) == sorted(
        keys[p] for p in prompts[1:])
    calls = {" ".join(line[1:-1]): (int(line[0]), float(line[-1])) for line in _lines(fault_log, "edits")}
    assert set(calls) == set(prompts)
    hung_pid, hung_at = calls["hang"]
    assert {calls[p][0] for p in prompts[1:]} == {calls[prompts[1]][0]} != {hung_pid}  # the next ones: a new process
    assert not psutil.pid_exists(hung_pid)  # the retired actor's process is gone, and its thread with it
    time.sleep(max(0.0, hung_at + HANG_S + 5.0 - time.time()))  # past when the hung edit would have written
    assert not [p for p in (dst / OUTPUTS_DIR).rglob(f"{keys['hang']}*")]
    assert sorted(p.name for p in (dst / OUTPUTS_DIR).glob("*/*.mp4")) == sorted(
        f"{keys[p]}.mp4" for p in prompts[1:])
