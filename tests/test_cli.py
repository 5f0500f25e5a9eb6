"""The `gen1` command line's conventions (issue 18): ``--version``; ``-v`` / ``-q`` before or after the
command; a repeatable ``--grid`` that never takes positionals; Ctrl-C ends a run with exit 130, one
``interrupted`` line and Ray shut down, and a rerun resumes; the config is printed only with ``-v``; FFmpeg
is quiet unless ``-v``; an error names the missing stage. Where the behaviour is the process's (exit code,
stderr), the real CLI runs in a subprocess."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen1.config import ConfigError
from gen1.libav_logging import LIBAV_LOG_ENV
from jobs.cli import build_parser, global_options
from jobs.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from pipelines.schema import SHARDS_DIR, read_shards
from tests.fixtures.clips import break_slice, encode_mp4, synthetic_frames
from tests.fixtures.ray_cluster import session_pids

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != LIBAV_LOG_ENV}  # the default: quiet
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def gen1(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _parse(*argv: str):
    parser = build_parser()
    args = parser.parse_args(list(argv))
    global_options(parser, args)
    return args


def test_version_is_the_installed_packages(tmp_path):
    proc = gen1("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gen1 {importlib.metadata.version('gen1')}"


def test_global_options_go_before_or_after_the_command(tmp_path):
    edit_one = ("edit-one", "in.mp4", "--prompt", "x", "--out", "o.mp4")
    for argv in (("-v", *edit_one), (*edit_one, "-v"), ("edit-one", "-v", "in.mp4", "--prompt", "x", "--out", "o.mp4")):
        args = _parse(*argv)
        assert (args.verbose, args.quiet, args.input) == (True, False, "in.mp4"), argv
    assert (_parse("-q", "models").quiet, _parse("models", "--quiet").quiet, _parse("models").verbose) == (True, True, False)
    assert _parse("-v", "preprocess", "s", "d").verbose  # the subcommand's parser does not reset it
    with pytest.raises(SystemExit) as exit_:
        _parse("-v", "models", "-q")
    assert exit_.value.code == EXIT_BAD_INPUT

    # for real: -v after the command adds the traceback of an input error; without it, one line
    missing = str(tmp_path / "missing.mp4")
    quiet = gen1("edit-one", missing, "--prompt", "x", "--out", "o.mp4", cwd=tmp_path)
    loud = gen1("edit-one", missing, "--prompt", "x", "--out", "o.mp4", "-v", cwd=tmp_path)
    assert quiet.returncode == loud.returncode == EXIT_BAD_INPUT
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert f"gen1 edit-one: error: VideoDecodeError: cannot decode video {missing!r}" in quiet.stderr


def test_grid_is_one_axis_per_use_and_never_takes_positionals(tmp_path):
    from jobs.commands import edit, eval

    args = _parse("edit", "--grid", "ts=1,5", "SRC", "DST", "--prompts", "p.txt", "--grid", "wt=1.0,1.5")
    assert (args.src, args.dst, args.grid) == ("SRC", "DST", ["ts=1,5", "wt=1.0,1.5"])
    grid = edit.config_from_args(args).grid
    assert (grid.t_s, grid.w, grid.w_t, grid.seeds) == ((1, 5), (7.5,), (1.0, 1.5), (0,))
    args = _parse("eval", "--grid", "ts=3", "--edits", "E", "--grid", "wt=0,1.5")
    assert eval.config_from_args(args).grid["w_t"] == (0.0, 1.5)
    with pytest.raises(ConfigError, match="ts is given twice"):
        edit.config_from_args(_parse("edit", "S", "D", "--grid", "ts=1", "--grid", "ts=5"))
    # the old form (several axes after one --grid) is a usage error, not SRC and DST taken as grid axes
    proc = gen1("edit", "--grid", "ts=1,5", "wt=1.0", "SRC", "DST", "--prompts", "p.txt", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT and "unrecognized arguments: DST" in proc.stderr


def test_every_help_lists_exit_code_130():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in [("gen1", parser), *sub.choices.items()]:
        assert f"  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)" in command.format_help(), name


def test_the_config_is_printed_only_with_v(tmp_path):
    # preprocess logs its config, then checks weights: missing weights end the run before Ray starts
    models = tmp_path / "models.yaml"
    models.write_text(f"base: tiny\ndepth: {tmp_path / 'no-depth'}\n")
    args = ("preprocess", str(tmp_path), str(tmp_path / "dst"), "--models", str(models))
    plain, loud = gen1(*args, cwd=tmp_path), gen1(*args, "-v", cwd=tmp_path)
    assert plain.returncode == loud.returncode == EXIT_BAD_INPUT, plain.stderr
    assert "no-depth" in plain.stderr  # it got as far as the weights check
    assert '"shard_size"' not in plain.stdout + plain.stderr
    assert 'config: {"models"' in loud.stderr and '"shard_size"' in loud.stderr


def test_ffmpeg_is_quiet_unless_v(tmp_path):
    """A video whose frame 281 is broken: edit-one reads frames 278.. with decord's seeks and 240.. in one
    PyAV pass; FFmpeg's own messages reach stderr only with -v."""
    video = tmp_path / "broken.mp4"
    video.write_bytes(break_slice(encode_mp4(synthetic_frames(300, 64, 48)), 281))
    for start, frames, decoder in (("278", "8", "decord"), ("240", "45", "pyav")):
        argv = ("edit-one", str(video), "--start", start, "--frames", frames, "--prompt", "x", "--out",
                str(tmp_path / "o.mp4"), "--models", "tiny")
        plain, loud = gen1(*argv, cwd=tmp_path), gen1(*argv, "-v", cwd=tmp_path)
        assert plain.returncode == loud.returncode == EXIT_BAD_INPUT, (decoder, plain.stderr[-2000:])
        assert "VideoDecodeError" in plain.stderr
        assert "Invalid inter IDR frame" not in plain.stderr and "[h264 @" not in plain.stderr, decoder
        assert "Invalid inter IDR frame" in loud.stderr, (decoder, loud.stderr[-2000:])


def test_a_chained_stage_without_its_previous_stage_names_it(tmp_path):
    runs = tmp_path / "runs"
    argv = ("train", "--config", "stage4", "--data", str(tmp_path / "features"), "--output", str(runs / "stage4"),
            "--models", "tiny")
    proc = gen1(*argv, cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert f"stage4-ts starts from {runs}/stage3/final" in proc.stderr
    assert f"train stage3 first (gen1 train --config stage3 --data {tmp_path}/features --output {runs}/stage3)" in proc.stderr
    assert "--init-from" in proc.stderr and "--models tiny" not in proc.stderr
    (runs / "stage3" / "final").mkdir(parents=True)
    (runs / "stage3" / "final" / "config.json").write_text("{}")
    proc = gen1(*argv, cwd=tmp_path)  # stage3's output is there: the run goes on, to the missing features
    assert proc.returncode == EXIT_BAD_INPUT and "stage3" not in proc.stderr and "no committed feature shards" in proc.stderr


# ------------------------------------------------------------------------------------------------ Ctrl-C

CLIPS = 12  # 2 videos x 6 clips of the tiny preset (4 frames 2 apart)


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"gen1 preprocess exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:.0f}s")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_exits_130_with_ray_shut_down_and_a_rerun_commits_every_clip_once(tmp_path):
    src, dst = tmp_path / "corpus", tmp_path / "dst"
    src.mkdir()
    for i in range(CLIPS // 6):
        (src / f"v{i}.mp4").write_bytes(encode_mp4(synthetic_frames(42, 64, 48)))
    config = tmp_path / "pp.yaml"  # one clip per batch and per shard: shards commit while the rest is in flight
    config.write_text("shard_size: 1\ndecode_batch_size: 1\ndepth_batch_frames: 4\nclip_batch_frames: 4\n"
                      "size: [64, 48]\nprogress: false\n")
    argv = [sys.executable, "-m", "jobs.cli", "preprocess", str(src), str(dst), "--config", str(config),
            "--models", "tiny", "--num-cpus", "2"]
    log = tmp_path / "run1.err"
    with open(log, "w") as err:  # a session of its own, as a terminal's foreground job
        proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        _wait(lambda: list((dst / SHARDS_DIR).glob("part-*.parquet")), 240, "committing a shard", proc)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the foreground process group
        proc.wait(timeout=120)
        _wait(lambda: not session_pids(proc.pid), 60, "leaving no process of its session (Ray shut down)")
    finally:
        for pid in [proc.pid, *session_pids(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stderr = log.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-4000:]
    assert [line for line in stderr.splitlines() if "interrupted" in line] == ["gen1 preprocess: interrupted"]
    assert "Traceback" not in stderr, stderr[-4000:]
    committed = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()

    rerun = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == EXIT_OK, rerun.stderr[-4000:]
    assert f" ok, 0 failed, {len(set(committed))} skipped" in rerun.stdout
    ids = read_shards(str(dst), ["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == CLIPS and set(committed) <= set(ids)
