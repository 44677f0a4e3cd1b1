"""Progress on stderr off a terminal: whole lines, a line every LOG_SECONDS, an estimate, and a
warning for a job of days."""

from __future__ import annotations

import pytest

from conftest import plain
from zforcing_cli.console import JobProgress, training_progress


def test_the_training_progress_line_is_whole_in_a_log(capsys):
    """Off a terminal rich draws the bar once, at the end: at its default 80 columns it was cut
    short ("300/3…")."""
    with training_progress() as progress:
        task = progress.add_task("train", total=3000, speed="1.23 steps/s", metrics="loss 123.4 KL 12.34 aux 1234")
        progress.update(task, completed=300)
    line = plain(capsys.readouterr().err).strip()
    assert " 300/3000 1.23 steps/s " in line and line.endswith("loss 123.4 KL 12.34 aux 1234") and "…" not in line


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)


def test_off_a_terminal_a_line_says_how_far_and_how_long(capsys, every_update):
    with JobProgress("Sampling 8 sentences", shorten="ask for fewer with --num") as progress:
        progress(2, 8, "2 of 8 sentences")
        progress(8, 8, "8 of 8 sentences")
    lines = plain(capsys.readouterr().err).splitlines()
    assert lines[0].startswith("Sampling 8 sentences: about ") and lines[0].endswith(" to go.")
    assert lines[1].startswith("Sampling 8 sentences: 25%, 2 of 8 sentences, ") and "to go" in lines[1]
    assert lines[2].startswith("Sampling 8 sentences: 100%, 8 of 8 sentences, ") and "to go" not in lines[2]


def test_a_total_not_known_yet_gives_counts_and_time(capsys, every_update):
    with JobProgress("Preparing imdb") as progress:
        progress(0.0, None, "200 documents, 900 sentences kept")
    assert plain(capsys.readouterr().err).splitlines() == ["Preparing imdb: 200 documents, 900 sentences kept, 0.0 s so far"]


def test_a_job_of_days_is_announced_with_what_shortens_it(capsys, monkeypatch, every_update):
    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 3600.0)
    monkeypatch.setattr(JobProgress, "LONG_JOB_SECONDS", 0.0)
    with JobProgress("Evaluating test", shorten="evaluate fewer sequences with --limit N") as progress:
        progress(1, 10**9, "")
        progress(2, 10**9, "")
    (line,) = plain(capsys.readouterr().err).splitlines()
    assert line.startswith("Warning: Evaluating test will take about ") and line.endswith("; evaluate fewer sequences with --limit N.")


@pytest.mark.parametrize("arguments", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["bench", "--help"]])
def test_the_help_shows_no_type_beside_a_flag(arguments):
    """A flag takes no value: no `<bool>` beside --json or --help; options that take one keep
    their type."""
    from conftest import invoke

    output = plain(invoke(*arguments, env={"COLUMNS": "200"}).output)
    assert "<bool>" not in output
    assert "--help " in output and ("<int range>" in output or arguments == ["--help"])
