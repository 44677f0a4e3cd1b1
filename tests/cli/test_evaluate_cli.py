"""`zforcing evaluate` as a new user meets it: an absurd --iwae, the valid split against
training's own validation figure, and the ELBO with and without --iwae."""

from __future__ import annotations

import json

import pytest

from zforcing_cli.console import JobProgress

from conftest import invoke, plain


def evaluate_json(*options) -> tuple[dict, str]:
    result = invoke("evaluate", *options, "--json", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    return json.loads(result.stdout), plain(result.stderr)


def best_validation(work) -> float:
    records = [json.loads(line) for line in (work / "runs" / "latest" / "metrics.jsonl").read_text().splitlines()]
    return max(record["elbo"] for record in records if record.get("type") == "valid")


def test_an_astronomical_iwae_warns_of_days_at_once(in_trained, monkeypatch):
    """K = 10^12 on one sequence: the samples stream through (no memory grows with K) and, as
    soon as its speed is measured, a warning of a job of days that says how to shorten it."""
    announce = JobProgress.announce

    def announce_then_stop(self, remaining):
        announce(self, remaining)
        raise KeyboardInterrupt

    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "announce", announce_then_stop)
    result = invoke("evaluate", "--iwae", 10**12, "--limit", 1, "--device", "cpu")
    assert result.exit_code == 130, plain(result.output)
    warning = next(line for line in plain(result.stderr).splitlines() if line.startswith("Warning:"))
    assert "days" in warning and "--iwae" in warning, warning


def test_the_valid_split_gives_trainings_best_figure_whatever_the_batch_size(in_trained):
    best = best_validation(in_trained)
    for batch_size in ("500", "3"):
        report, stderr = evaluate_json("--split", "valid", "--batch-size", batch_size)
        assert report["elbo"] == pytest.approx(best, rel=1e-6)
        assert report["seed"] == 0 and "Note:" not in stderr


def test_evaluate_says_why_the_valid_split_is_not_trainings_figure(in_trained):
    _, stderr = evaluate_json("--split", "valid", "--limit", 3)
    assert "training validated on the first 8 valid sequences; this is the first 3 (--limit 8 takes the same)" in stderr
    _, stderr = evaluate_json("--split", "valid", "--seed", 5)
    assert "training drew its samples with --seed 0, this with --seed 5" in stderr
    _, stderr = evaluate_json("--limit", 3)
    assert "Note:" not in stderr  # the test split has no training figure to match


def test_the_elbo_row_is_the_same_with_or_without_iwae(in_trained):
    alone, _ = evaluate_json("--limit", 4, "--seed", 2)
    with_iwae, _ = evaluate_json("--limit", 4, "--seed", 2, "--iwae", 5)
    assert (with_iwae["elbo"], with_iwae["kl"]) == pytest.approx((alone["elbo"], alone["kl"]), rel=1e-6)
    assert with_iwae["iwae"] is not None


def test_evaluate_records_its_threads_and_says_when_training_ran_on_another_count(in_trained):
    report, stderr = evaluate_json("--split", "valid")
    assert report["threads"] == 1 and "Note:" not in stderr  # training's count (the tests fix one thread)
    configs = {path: path.read_text() for path in (in_trained / "runs" / "latest").rglob("config.json")}  # the run's and its checkpoints'
    try:
        for path, text in configs.items():
            path.write_text(json.dumps({**json.loads(text), "threads": 2}))
        report, stderr = evaluate_json("--split", "valid")
    finally:
        for path, text in configs.items():
            path.write_text(text)
    assert report["threads"] == 1
    assert "training ran on 2 threads, this on 1, which may change the last digits (--threads 2 takes the same)" in " ".join(stderr.split())
