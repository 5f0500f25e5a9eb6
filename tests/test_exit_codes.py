"""Exit codes (issue 17, items 2 and 5): the failed fraction is over the corpus, and every command's outcome has
its own code (`jobs.exit_codes`): 1 bad input or usage, 3 eval regression, 4 failed fraction exceeded, 5 DST
busy (another driver holds its lease), 6 bookkeeping failed after the results were committed. The
commands run for real through their entry points; only the Ray part (`run_preprocess`, `run_edit`,
`run_eval`) is replaced by a fixed summary, so no cluster is started."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser
from jobs.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_BOOKKEEPING,
    EXIT_CODES,
    EXIT_DST_BUSY,
    EXIT_FAILED_FRACTION,
    EXIT_OK,
    EXIT_REGRESSED,
)
from pipelines.edit.run import EditSummary
from pipelines.preprocess.run import PreprocessSummary


def test_a_rerun_that_fails_only_the_broken_clips_of_a_committed_corpus_is_under_the_limit():
    # run 1 of the issue: 134 ok, 4 failed; run 2 retries only the 4 broken files, skipping the 134
    first = PreprocessSummary(run_id="r1", dst="d", ok=134, failed=4)
    rerun = PreprocessSummary(run_id="r2", dst="d", skipped=134, failed=4, quarantined=0)
    assert first.failure_fraction == rerun.failure_fraction == pytest.approx(4 / 138)
    assert rerun.committed == 134 and rerun.failure_fraction < 0.1
    # quarantined inputs are neither committed nor failed: skipping them changes nothing
    held = PreprocessSummary(run_id="r3", dst="d", skipped=134, failed=0, quarantined=4)
    assert held.failure_fraction == 0.0
    assert PreprocessSummary(run_id="r4", dst="d").failure_fraction == 0.0  # nothing to do
    assert rerun.as_dict()["failure_fraction"] == rerun.failure_fraction and rerun.as_dict()["committed"] == 134

    edits = EditSummary(run_id="e2", dst="d", skipped=96, failed=2, clips_failed=1)
    assert edits.committed == 96 and edits.failure_fraction == pytest.approx(3 / 99)
    assert EditSummary(run_id="e3", dst="d", ok=1, failed=9).failure_fraction == pytest.approx(0.9)


def test_the_exit_codes_are_distinct_and_in_every_commands_help():
    codes = [e.code for e in EXIT_CODES]
    assert len(set(codes)) == len(codes) and (EXIT_BAD_INPUT, EXIT_REGRESSED, EXIT_FAILED_FRACTION) == (1, 3, 4)
    parser = build_parser()
    assert "exit codes:" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        text = command.format_help()
        assert "exit codes:" in text and "  1  bad input or usage" in text, name
    assert "  4  failed fraction exceeded" in sub.choices["preprocess"].format_help()
    assert "  3  eval regression" in sub.choices["eval"].format_help()
    assert (EXIT_DST_BUSY, EXIT_BOOKKEEPING) == (5, 6)
    for name in ("preprocess", "edit", "eval", "demo"):  # the commands that write into a DST
        text = sub.choices[name].format_help()
        assert "  5  DST busy" in text and "  6  bookkeeping failed" in text, name


def _fake(monkeypatch, module, name, summary):
    """Replace ``module.name`` (the Ray part of a command) by one returning ``summary``."""
    import importlib

    seen = []

    def fake(*args):
        seen.append(args)
        return summary

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen


def test_preprocess_past_the_failed_fraction_exits_4_and_a_mostly_committed_rerun_exits_0(
    monkeypatch, tmp_path, capsys
):
    from jobs.commands.preprocess import main

    dst = str(tmp_path / "dst")
    _fake(monkeypatch, "pipelines.preprocess", "run_preprocess",
          PreprocessSummary(run_id="r", dst=dst, ok=2, failed=4))
    assert main([str(tmp_path), dst]) == EXIT_FAILED_FRACTION
    assert "FAILED: 4 clips failed in this run, 2 are committed" in capsys.readouterr().err
    _fake(monkeypatch, "pipelines.preprocess", "run_preprocess",
          PreprocessSummary(run_id="r", dst=dst, skipped=134, failed=4))
    assert main([str(tmp_path), dst]) == EXIT_OK


def test_edit_past_the_failed_fraction_exits_4(monkeypatch, tmp_path, capsys):
    from jobs.commands.edit import main

    _fake(monkeypatch, "pipelines.edit", "run_edit", EditSummary(run_id="e", dst="d", ok=1, failed=3))
    assert main([str(tmp_path), str(tmp_path / "dst"), "--auto-prompts", "1"]) == EXIT_FAILED_FRACTION
    assert "3 edits and 0 clips failed in this run, 1 edits are committed" in capsys.readouterr().err


def _eval_summary(**kw):
    from pipelines.evaluate.report import EvalSummary

    return EvalSummary(run_name="n", out="o", tracking_uri="t", **kw)


def test_eval_regression_exits_3_and_failed_videos_exit_4(monkeypatch, tmp_path, capsys):
    from jobs.commands.eval import main
    from pipelines.regression import REGRESSED

    args = ["--edits", str(tmp_path / "edits"), "--out", str(tmp_path / "out")]
    _fake(monkeypatch, "pipelines.evaluate", "run_eval", _eval_summary(videos=3, gate={"status": REGRESSED}))
    assert main(args) == EXIT_REGRESSED
    assert "REGRESSED" in capsys.readouterr().err
    _fake(monkeypatch, "pipelines.evaluate", "run_eval", _eval_summary(videos=3, failed=2))
    assert main(args) == EXIT_FAILED_FRACTION
    _fake(monkeypatch, "pipelines.evaluate", "run_eval", _eval_summary(videos=3))
    assert main(args) == EXIT_OK


def test_a_bad_config_or_usage_exits_1(monkeypatch, tmp_path, capsys):
    from jobs.cli import main
    from jobs.commands.preprocess import main as preprocess_main

    seen = _fake(monkeypatch, "pipelines.preprocess", "run_preprocess", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("framez: 3\n")
    assert preprocess_main([str(tmp_path), str(tmp_path / "dst"), "--config", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "ConfigError" in err and "framez" in err and "Traceback" not in err
    assert main(["preprocess", str(tmp_path), str(tmp_path / "dst"), "--config", str(bad)]) == EXIT_BAD_INPUT
    assert not seen  # nothing ran
    for argv in (["preprocess", "src"], ["edit", "s", "d", "--no-such-option"], ["eval", "--steps", "many"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == EXIT_BAD_INPUT, argv
        assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        preprocess_main(["--frames", "x"])  # the standalone entry point (`ray job submit`) too
    assert exit_.value.code == EXIT_BAD_INPUT


def test_a_run_whose_bookkeeping_failed_exits_6_unless_its_failed_fraction_gives_4(monkeypatch, tmp_path, capsys):
    from jobs.commands.edit import main as edit_main
    from jobs.commands.preprocess import main as preprocess_main

    dst = str(tmp_path / "dst")
    lost = ["could not write the run record file:///d/runs/r.json: FileExistsError: /d/runs"]
    _fake(monkeypatch, "pipelines.preprocess", "run_preprocess",
          PreprocessSummary(run_id="r", dst=dst, ok=5, bookkeeping_errors=lost))
    assert preprocess_main([str(tmp_path), dst]) == EXIT_BOOKKEEPING
    assert f"FAILED: the results are committed in {dst}, but the run {lost[0]}" in capsys.readouterr().err
    _fake(monkeypatch, "pipelines.preprocess", "run_preprocess",
          PreprocessSummary(run_id="r", dst=dst, ok=1, failed=4, bookkeeping_errors=lost))
    assert preprocess_main([str(tmp_path), dst]) == EXIT_FAILED_FRACTION
    err = capsys.readouterr().err
    assert "4 clips failed in this run" in err and lost[0] in err  # both reported; the worse code wins
    _fake(monkeypatch, "pipelines.edit", "run_edit", EditSummary(run_id="e", dst=dst, ok=3, bookkeeping_errors=lost))
    assert edit_main([str(tmp_path), dst, "--auto-prompts", "1"]) == EXIT_BOOKKEEPING
    assert lost[0] in capsys.readouterr().err
