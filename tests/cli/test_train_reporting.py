"""What `zforcing train` says as it runs: the progress lines of a log file, and what a stop
signal is told."""

from __future__ import annotations

import signal
from io import StringIO

from rich.console import Console
from rich.progress import Progress

from zforcing_cli.cli import train as train_cli_module
from zforcing_cli.train import StopRequest, TrainEvent


def test_a_logged_progress_line_has_an_eta_and_units(monkeypatch):
    """Off a terminal, where no bar is drawn, every LOG_SECONDS a line says where the run is,
    how long it has taken and will take, and the metrics with their unit."""
    clock = [0.0]
    log = StringIO()
    monkeypatch.setattr(train_cli_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(train_cli_module, "stderr", Console(file=log, width=400))  # not a terminal
    reporter = train_cli_module.TrainReporter(Progress(console=Console(file=StringIO())), 1, "nats per sequence")
    reporter(TrainEvent("start", 0, 100, 0, metrics={"parameters": 10, "finished": False, "loops": "compiled loops"}))
    metrics = {"loss": 123.45, "kl": 1.5, "aux": -48502.2}
    for seconds in (10, 40):  # one update a second; a line once 30 s have passed
        clock[0] = float(seconds)
        reporter(TrainEvent("step", seconds, 100, 0, metrics=metrics))
    lines = log.getvalue().splitlines()
    assert lines == ["step 40 of 100 (40%), 1.00 steps/s, 40.0 s so far, about 1.0 min to go; "
                     "loss 123.5 KL 1.50 aux -48,502 nats/sequence"]


def test_sigterm_is_told_what_a_second_signal_does(monkeypatch):
    """Whoever sent SIGTERM (kill, a scheduler) has no Ctrl-C to press."""
    out = StringIO()
    stop = StopRequest()
    with train_cli_module.stop_on_signals(stop, Console(file=out, width=200)):
        signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is train_cli_module.exit_on_signal  # a second one ends the process
    assert out.getvalue().strip() == "SIGTERM: stopping after this update to write a checkpoint (a second signal abandons it)."
    assert stop.reason == "SIGTERM"
