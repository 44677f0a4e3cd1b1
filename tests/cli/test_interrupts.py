"""Stopping `zforcing train` and continuing it, with real processes and real signals.

Ctrl-C (SIGINT) and SIGTERM finish the update in progress, write a training checkpoint and
print the command that continues; SIGKILL leaves the newest complete checkpoint (or none) and a
stale lock; `--resume` must then end exactly where an uninterrupted run ends (bit-identical
tensors on CPU). A second training on the same run folder is refused while the first runs.

Every training here is a subprocess of the tiny prepared dataset with the small preset's model
(about 0.5-1 s per update of 4 images on 2 CPU cores, plus ~4 s to import torch), so runs are a
few updates long; the uninterrupted reference run is shared and starts in the background.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from zforcing_cli.cli import app

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")

STEPS = 3  # updates of every comparable run
TIMEOUT = 120.0  # seconds for anything to happen; only reached when something is broken
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STOPPED = re.compile(r"Stopped by (SIGINT|SIGTERM) at step (\d+); the training checkpoint (\S+) holds it\.")
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}


# -- helpers --------------------------------------------------------------------------------------


def plain(text: str) -> str:
    return ANSI.sub("", text)


def base_options(tiny_data: Path, steps: int = STEPS) -> list[str]:
    return ["--data", str(tiny_data), "--batch-size", "4", "--max-steps", str(steps), "--device", "cpu"]


class Training:
    """A `zforcing train` subprocess; stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, cwd: Path, env: dict, args: list[str], name: str = "train"):
        self.cwd = Path(cwd)
        self.args = [str(arg) for arg in args]
        index = len(list(self.cwd.glob(f"{name}-*.stderr")))
        self.stderr_path = self.cwd / f"{name}-{index}.stderr"
        self.stdout_path = self.cwd / f"{name}-{index}.stdout"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zforcing_cli", *self.args], cwd=self.cwd, env=env, stdout=out, stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return plain(self.stderr_path.read_text())

    def stdout(self) -> str:
        return plain(self.stdout_path.read_text())

    def signal(self, number: int) -> None:
        assert self.process.poll() is None, f"the training already exited ({self.process.returncode}):\n{self.stderr()}"
        self.process.send_signal(number)

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """Wait for the exit; (exit code, stderr)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"zforcing {shlex.join(self.args)} did not exit within {timeout:.0f} s:\n{self.stderr()}")
        return code, self.stderr()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(condition, what: str, training: Training | None = None, timeout: float = TIMEOUT) -> None:
    """Poll condition() until it holds; fail at once if the training exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if training is not None and training.process.poll() is not None:
            pytest.fail(f"the training exited ({training.process.returncode}) before {what}:\n{training.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def lock_record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / "train.lock").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def wait_until_training(training: Training, run_dir: Path) -> None:
    """Until the training holds the run's lock (its signal handlers are installed by then) and
    has written the run's config.json."""
    wait_for(
        lambda: (lock_record(run_dir) or {}).get("pid") == training.pid and (run_dir / "config.json").is_file(),
        f"{run_dir}/train.lock naming process {training.pid}", training,
    )


def step_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def read_json(path: Path):
    return json.loads(path.read_text())


def trainer_state(checkpoint: Path) -> dict:
    return read_json(checkpoint / "trainer_state.json")


def assert_complete_checkpoint(checkpoint: Path) -> None:
    assert checkpoint.is_dir(), checkpoint
    assert CHECKPOINT_FILES <= {path.name for path in checkpoint.iterdir()}, sorted(checkpoint.iterdir())


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall time of each update."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def assert_same_tensors(file: Path, reference_file: Path) -> None:
    tensors, expected = load_file(file), load_file(reference_file)
    assert tensors.keys() == expected.keys(), file
    different = [name for name in expected if not torch.equal(tensors[name], expected[name])]
    assert not different, f"{file}: tensors differ from the uninterrupted run: {different}"


def assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """The run ended exactly where the uninterrupted one did: the same final training
    checkpoint (model, optimizer, trainer state but its wall time), the same metrics (but the
    wall time) and the same best checkpoint."""
    final, expected = step_checkpoints(run_dir)[-1], step_checkpoints(reference_dir)[-1]
    assert final.name == expected.name == f"step-{STEPS:08d}"
    assert_complete_checkpoint(final)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(final / name, expected / name)
    state, expected_state = trainer_state(final), trainer_state(expected)
    state.pop("elapsed"), expected_state.pop("elapsed")  # wall time, the one legitimate difference
    assert state == expected_state
    assert metrics(run_dir) == metrics(reference_dir)
    (best,) = (run_dir / "checkpoints").glob("best-*")
    (expected_best,) = (reference_dir / "checkpoints").glob("best-*")
    assert best.name == expected_best.name
    assert_same_tensors(best / "model.safetensors", expected_best / "model.safetensors")


def continue_command(stderr: str) -> list[str]:
    """The words of the `To continue:` line, with `zforcing` as this interpreter's module."""
    lines = [line for line in stderr.splitlines() if line.startswith("To continue: ")]
    assert len(lines) == 1, stderr
    words = shlex.split(lines[0].removeprefix("To continue: "))
    assert words[:3] == ["zforcing", "train", "--resume"], words
    return words[1:]


class Reference:
    """The uninterrupted run, started in the background; finished() waits for it."""

    def __init__(self, training: Training, run_dir: Path):
        self.training, self.run_dir, self._done = training, run_dir, False

    def finished(self) -> Path:
        if not self._done:
            code, stderr = self.training.finish()
            assert code == 0, stderr
            self._done = True
        return self.run_dir


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict:
    """The environment of every training: one thread, a private thread registry, no debug, and
    the Python loops: with the compiled ones a tiny run's 3 updates can end before a signal sent
    once it has started arrives (test_resume.py and test_fused_cpu.py hold the compiled loops'
    resume and determinism)."""
    env = dict(os.environ, ZFORCING_THREADS="1", OMP_NUM_THREADS="1", ZFORCING_COMPILED_LOOPS="0")
    env["ZFORCING_ACTIVE_DIR"] = str(tmp_path_factory.mktemp("active"))
    env.pop("ZFORCING_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory, child_env):
    """An uninterrupted STEPS-update run that checkpoints only at its end."""
    work = tmp_path_factory.mktemp("reference")
    training = Training(work, child_env, ["train", *base_options(tiny_data), "--checkpoint-minutes", "0", "--out", "run"])
    yield Reference(training, work / "run")
    training.kill()


@pytest.fixture
def launch(tmp_path, child_env):
    """launch(*args, name=, cwd=): start `zforcing <args>` in cwd (default tmp_path); anything
    left running is killed at the end of the test."""
    started: list[Training] = []

    def start(*args, name: str = "train", cwd: Path | None = None) -> Training:
        training = Training(cwd or tmp_path, child_env, list(args), name)
        started.append(training)
        return training

    yield start
    for training in started:
        training.kill()


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------


SIGNAL_EXITS = {"SIGINT": 130, "SIGTERM": 143}


def test_ctrl_c_and_sigterm_write_a_checkpoint_that_the_printed_command_continues(reference, launch, tiny_data, tmp_path):
    """One training per signal, side by side (one core each), then each printed command."""
    trainings = {}
    for name in SIGNAL_EXITS:
        (tmp_path / name).mkdir()
        trainings[name] = launch("train", *base_options(tiny_data), "--checkpoint-minutes", "0", "--out", "run", cwd=tmp_path / name)
    for name, training in trainings.items():
        wait_until_training(training, tmp_path / name / "run")
        training.signal(getattr(signal, name))

    resumes = {}
    for name, training in trainings.items():
        run_dir = tmp_path / name / "run"
        code, stderr = training.finish()
        assert code == SIGNAL_EXITS[name], stderr
        assert "Traceback" not in stderr
        assert f"{name}: stopping after this update" in stderr
        stopped = STOPPED.search(stderr)
        assert stopped and stopped.group(1) == name, stderr
        step = int(stopped.group(2))
        assert 1 <= step <= STEPS
        # Neither step nor time checkpoints were asked for: the one checkpoint is the stop's.
        checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
        assert step_checkpoints(run_dir) == [checkpoint], stderr
        assert Path(stopped.group(3)) == Path("run") / "checkpoints" / checkpoint.name
        assert_complete_checkpoint(checkpoint)
        assert trainer_state(checkpoint)["step"] == step
        assert not (run_dir / "train.lock").exists()  # released on the way out

        args = continue_command(stderr)  # --max-steps is not repeated: the run remembers it
        assert args == ["train", "--resume", "--out", "run", "--device", "cpu", "--threads", "1"]
        resumes[name] = (launch(*args, name="resume", cwd=tmp_path / name), checkpoint, step)

    expected = reference.finished()
    for name, (resumed, checkpoint, step) in resumes.items():
        run_dir = tmp_path / name / "run"
        code, stderr = resumed.finish()
        assert code == 0, stderr
        assert f"Resuming from {Path('run') / 'checkpoints' / checkpoint.name} (step {step} of {STEPS})." in stderr
        assert "Best validation bound" in resumed.stdout()
        assert_same_training(run_dir, expected)
        final = step_checkpoints(run_dir)[-1]
        assert read_json(final / "config.json") == read_json(step_checkpoints(expected)[-1] / "config.json")


def test_ctrl_c_twice_abandons_at_once_without_a_traceback(launch, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    training = launch("train", *base_options(tiny_data, steps=50), "--checkpoint-minutes", "0", "--out", "run")
    wait_until_training(training, run_dir)
    training.signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: stopping after this update" in training.stderr(), "the first Ctrl-C's message", training)
    training.signal(signal.SIGINT)  # well within the update in progress (0.5 s or more)
    code, stderr = training.finish()

    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("Error:")] == ["Error: Interrupted."], stderr
    assert "To continue:" not in stderr
    assert not (run_dir / "train.lock").exists()


# -- SIGKILL: the newest complete checkpoint, or none ------------------------------------------------


def test_kill_after_a_checkpoint_resumes_bit_identically(reference, launch, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    first = tmp_path / "run" / "checkpoints" / "step-00000001"
    training = launch("train", *base_options(tiny_data), "--checkpoint-every", "1", "--checkpoint-minutes", "0", "--out", "run")
    wait_for(first.is_dir, str(first), training)
    training.signal(signal.SIGKILL)
    code, _ = training.finish()
    assert code == -signal.SIGKILL
    newest = step_checkpoints(run_dir)[-1]
    step = trainer_state(newest)["step"]
    assert 1 <= step < STEPS

    resumed = launch("train", "--resume", "--out", "run", "--device", "cpu", name="resume")
    code, stderr = resumed.finish()
    assert code == 0, stderr
    # The killed training left its lock file behind: a stale lock, taken over.
    host = socket.gethostname()
    assert f"Took over the run's lock from process {training.pid} on {host}, which is no longer running." in stderr
    assert f"Resuming from {Path('run') / 'checkpoints' / newest.name} (step {step} of {STEPS})." in stderr
    assert not (run_dir / "train.lock").exists()
    assert_same_training(run_dir, reference.finished())


def test_kill_before_the_first_checkpoint_starts_again_from_step_0(reference, launch, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    training = launch("train", *base_options(tiny_data), "--checkpoint-every", "1000", "--checkpoint-minutes", "0", "--out", "run")
    wait_until_training(training, run_dir)
    training.signal(signal.SIGKILL)
    code, _ = training.finish()
    assert code == -signal.SIGKILL
    assert step_checkpoints(run_dir) == []
    assert (lock_record(run_dir) or {}).get("pid") == training.pid  # left behind

    resumed = launch("train", "--resume", "--out", "run", "--device", "cpu", name="resume")
    code, stderr = resumed.finish()
    assert code == 0, stderr
    assert f"Took over the run's lock from process {training.pid} on {socket.gethostname()}, which is no longer running." in stderr
    assert "The run has no training checkpoint yet: starting it again from step 0" in stderr
    assert "Resuming from" not in stderr
    assert_same_training(run_dir, reference.finished())


# -- when checkpoints are written -------------------------------------------------------------------


def test_checkpoint_minutes_writes_a_checkpoint_after_each_slow_update(tiny_data, tmp_path, child_env, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/latest lands here
    run_dir = tmp_path / "run"
    args = ["train", *base_options(tiny_data), "--checkpoint-minutes", "0.000001", "--out", str(run_dir)]
    result = CliRunner().invoke(app, args, env={"ZFORCING_ACTIVE_DIR": child_env["ZFORCING_ACTIVE_DIR"]})
    assert result.exit_code == 0, plain(result.output)
    # 60 µs is shorter than any update (with the compiled loops a tiny one takes a few tens of
    # milliseconds), so every update wrote one; the newest two are kept.
    kept = step_checkpoints(run_dir)
    assert [path.name for path in kept] == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    for checkpoint in kept:
        assert_complete_checkpoint(checkpoint)
    before_last = trainer_state(kept[0])
    assert (before_last["step"], before_last["batch_in_epoch"], before_last["validated_step"]) == (STEPS - 1, STEPS - 1, -1)
    assert trainer_state(kept[1])["step"] == STEPS


def test_checkpoint_minutes_0_writes_only_the_final_checkpoint(reference):
    run_dir = reference.finished()
    assert [path.name for path in step_checkpoints(run_dir)] == [f"step-{STEPS:08d}"]
    assert trainer_state(step_checkpoints(run_dir)[0])["step"] == STEPS
    assert read_json(run_dir / "config.json")["train"]["checkpoint_minutes"] == 0


# -- one training per run folder --------------------------------------------------------------------


def test_a_second_training_of_a_running_run_is_refused(launch, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    first = launch("train", *base_options(tiny_data, steps=50), "--checkpoint-minutes", "0", "--out", "run")
    wait_until_training(first, run_dir)

    # A stopped process still holds its lock; pausing it leaves both cores to the two
    # newcomers, which take ~5 s each to import torch and build their trainer.
    first.signal(signal.SIGSTOP)
    resume = launch("train", "--resume", "--out", "run", "--device", "cpu", name="resume")
    force = launch("train", *base_options(tiny_data), "--out", "run", "--force", name="force")
    for second in (resume, force):
        code, stderr = second.finish()
        assert code == 1, stderr
        assert "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, stderr
        assert errors[0].startswith(f"Error: run is being trained by process {first.pid} on host {socket.gethostname()}"), errors[0]

    # --force replaced nothing: the first training goes on, and stops cleanly on SIGTERM.
    assert first.process.poll() is None, first.stderr()
    assert (run_dir / "config.json").is_file()
    assert (lock_record(run_dir) or {}).get("pid") == first.pid
    first.process.send_signal(signal.SIGCONT)
    first.signal(signal.SIGTERM)
    code, stderr = first.finish()
    assert code == 143, stderr
    stopped = STOPPED.search(stderr)
    assert stopped and stopped.group(1) == "SIGTERM", stderr
    assert_complete_checkpoint(run_dir / "checkpoints" / f"step-{int(stopped.group(2)):08d}")
    assert not (run_dir / "train.lock").exists()
