"""The exit codes of every `gen1` command: one table, used by the commands, their ``--help`` and the README.

A scheduler (cron, Airflow, a Ray Job's status) tells the outcomes apart by code alone:

- 0: the run did what it was asked;
- 1: bad input or usage: an unknown option, a bad config, a missing input or weights (nothing ran, or the
  run stopped at the bad input);
- 3: the eval's regression gate failed (`pipelines.regression`): a gated metric dropped beyond its threshold;
- 4: the run finished but too much of the corpus failed: the failed fraction (this run's failures over the
  clips committed in DST plus those failures; quarantined ones excluded) exceeds ``max_failure_fraction``;
- 5: DST is busy: another driver holds its lease (`pipelines.lease`) and did not let go within
  ``lease_wait_s`` (nothing was written), or took it over while this run was stalled (what was committed
  stays; nothing more was);
- 6: the results are committed, but a write about them failed: the run record (``DST/runs/``) or the
  quarantine list (`pipelines.runtime.bookkeeping`).
- 130: interrupted (Ctrl-C, SIGINT; 128 + the signal's number, as shells report it): Ray shut down and what
  was committed kept, so a rerun resumes (preprocess and edit skip what is committed, ``train --resume``
  continues from the latest checkpoint). Every command can end so: every ``--help`` lists it.

An uncaught exception (a bug, not bad input) ends with Python's traceback and its exit code 1.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_REGRESSED = 3
EXIT_FAILED_FRACTION = 4
EXIT_DST_BUSY = 5
EXIT_BOOKKEEPING = 6
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class ExitCode:
    """One row of the table: the code, its constant's name, and what it means."""

    code: int
    name: str
    meaning: str


EXIT_CODES = (
    ExitCode(EXIT_OK, "EXIT_OK", "success"),
    ExitCode(EXIT_BAD_INPUT, "EXIT_BAD_INPUT", "bad input or usage (an option, a config, a missing input or "
             "missing weights)"),
    ExitCode(EXIT_REGRESSED, "EXIT_REGRESSED", "eval regression: a gated metric dropped beyond its threshold "
             "against the accepted baseline"),
    ExitCode(EXIT_FAILED_FRACTION, "EXIT_FAILED_FRACTION", "failed fraction exceeded: failed / (committed in "
             "DST + failed in this run) > max_failure_fraction"),
    ExitCode(EXIT_DST_BUSY, "EXIT_DST_BUSY", "DST busy: another driver holds its lease (named with its expiry; "
             "nothing was written), or took it over from this stalled run (nothing more was committed)"),
    ExitCode(EXIT_BOOKKEEPING, "EXIT_BOOKKEEPING", "bookkeeping failed: the results are committed, but the run "
             "record or the quarantine list could not be written"),
    ExitCode(EXIT_INTERRUPTED, "EXIT_INTERRUPTED", "interrupted (Ctrl-C): Ray shut down, committed work kept "
             "(a rerun of preprocess or edit skips it; train --resume continues)"),
)


def help_epilog(*codes: int) -> str:
    """The ``exit codes:`` block of a command's ``--help``: the rows of ``codes`` (default: all) and
    `EXIT_INTERRUPTED`'s (any command can be interrupted), in order. Needs
    ``formatter_class=argparse.RawDescriptionHelpFormatter`` to keep its lines."""
    wanted = {*codes, EXIT_INTERRUPTED} if codes else {e.code for e in EXIT_CODES}
    rows = [f"  {e.code:>3}  {e.meaning}" for e in EXIT_CODES if e.code in wanted]
    unknown = wanted - {e.code for e in EXIT_CODES}
    if unknown:
        raise ValueError(f"exit codes {sorted(unknown)} are not in jobs.exit_codes.EXIT_CODES")
    return "exit codes:\n" + "\n".join(rows)

