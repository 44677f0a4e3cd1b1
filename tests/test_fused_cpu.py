"""The compiled CPU loops (fused_cpu.py, fused_cpu.cpp) against the Python loops and the autograd
reference, and how the recurrence falls back to the Python loops.

The reference tests of test_recurrence.py run here a second time with the compiled loops forced
on and the Python loops made to fail if they run: every term and every gradient of the model at
float64 rounding, and the numerical gradient check. Where no C++ compiler is installed they are
skipped; where one is and the build fails, they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from zforcing_cli import fused_cpu, recurrence, steps
from zforcing_cli.recurrence import BackwardInputs, RolloutInputs, posterior_recurrence

import test_recurrence as reference
from test_recurrence import (  # noqa: F401  (collected here again, with the compiled loops)
    test_backward_passes_numerical_gradient_check,
    test_fused_matches_autograd_reference,
    test_gradient_when_only_the_states_reach_the_loss,
    test_recurrence_stays_float32_under_autocast,
)

PYTHON_LOOPS = (recurrence.rollout, recurrence.backpropagate)
COMPILED_LOOPS = (fused_cpu.rollout, fused_cpu.backpropagate)
CLAMP = 1.1


def python_loop_ran(*args, **kwargs):
    raise AssertionError("the Python loop ran where the compiled one should have")


@pytest.fixture(autouse=True)
def compiled_loops(request, monkeypatch):
    """The compiled loops on, built, and the only ones that can run (tests of the fallback
    itself are marked `fallback` and get none of this)."""
    if "fallback" in request.keywords:
        return
    if fused_cpu.compiler() is None:
        pytest.skip("no C++ compiler: the recurrence runs its Python loops")
    monkeypatch.setenv(fused_cpu.SWITCH, "1")
    assert fused_cpu.load() is None, fused_cpu.load()
    monkeypatch.setattr(recurrence, "rollout", python_loop_ran)
    monkeypatch.setattr(recurrence, "backpropagate", python_loop_ran)


fallback = pytest.mark.fallback


def loop_inputs(dtype=torch.float64, batch=3, steps=7, size=5, mlp=6, latent=3, seed=4):
    """Inputs of both loops and cotangents of the five outputs, drawn wide enough that the
    clamps, the clipped nonlinearity and the saturated gates all act."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=0.8):
        return scale * torch.randn(*shape, generator=generator, dtype=dtype)

    forward = (draw(batch, steps, 4 * size), draw(batch, steps, mlp, scale=2.5), draw(batch, steps, latent, scale=2.0),
               draw(4 * size + mlp, size), draw(4 * size, latent), draw(2 * latent, mlp, scale=1.5), draw(2 * latent))
    cotangents = (draw(batch, steps + 1, size), draw(batch, steps, latent), draw(batch, steps, latent),
                  draw(batch, steps, latent), draw(batch, size))
    return forward, cotangents


def run(loops, forward, cotangents):
    """rollout's buffers, then backpropagate's gradients, for one pair of loops."""
    rollout, backpropagate = loops
    buffers = rollout(RolloutInputs(*forward), CLAMP)
    noise, weights = forward[2], forward[3:6]
    return buffers, backpropagate(BackwardInputs(*buffers, noise, *weights, *cotangents), CLAMP)


def assert_all_close(got, expected, rtol, atol):
    """Close elementwise, atol relative to each tensor's largest value (the sums of the products
    round at that scale)."""
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=f"tensor {index}")


@pytest.mark.parametrize("sizes", [
    dict(),
    dict(batch=1, steps=1, size=1, mlp=1, latent=1),
    dict(batch=5, steps=4, size=19, mlp=33, latent=17),  # rows longer than a vector register, and odd
], ids=["small", "ones", "odd"])
def test_compiled_loops_give_the_python_loops_buffers_and_gradients_in_float64(sizes):
    forward, cotangents = loop_inputs(**sizes)
    python_buffers, python_grads = run(PYTHON_LOOPS, forward, cotangents)
    buffers, grads = run(COMPILED_LOOPS, forward, cotangents)
    assert_all_close(buffers, python_buffers, rtol=1e-12, atol=1e-13)
    assert_all_close(grads, python_grads, rtol=1e-12, atol=1e-12)
    if sizes.get("steps", 7) > 1:  # every regime reached (one number cannot reach them all)
        stats, hidden = buffers[6], buffers[4]
        assert (stats.abs() == CLAMP).any() and (stats.abs() < CLAMP).any(), "the latent clamp acts and lets through"
        assert (hidden.abs() == steps.CLIP).any() and (hidden < 0).any(), "the nonlinearity clips and leaks"


def test_compiled_loops_in_float32_match_the_python_loops():
    forward, cotangents = loop_inputs(torch.float32, batch=4, steps=9, size=16, mlp=12, latent=4)
    python_buffers, python_grads = run(PYTHON_LOOPS, forward, cotangents)
    buffers, grads = run(COMPILED_LOOPS, forward, cotangents)
    assert_all_close(buffers, python_buffers, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, python_grads, rtol=1e-4, atol=1e-4)


def test_compiled_loops_are_deterministic_and_take_any_strides():
    forward, cotangents = loop_inputs(torch.float32)
    first = run(COMPILED_LOOPS, forward, cotangents)
    # The same values laid out otherwise: transposed copies, read back as (B, T, ·) views.
    strided = tuple(x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() == 3 else x for x in forward)
    strided_cotangents = tuple(x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() == 3 else x for x in cotangents)
    for again in (run(COMPILED_LOOPS, forward, cotangents), run(COMPILED_LOOPS, strided, strided_cotangents)):
        for got, expected in zip((*again[0], *again[1]), (*first[0], *first[1])):
            assert torch.equal(got, expected)  # bit for bit: a resumed run continues exactly


def test_a_nonfinite_input_reaches_the_outputs_as_in_the_python_loop():
    """A NaN must not be clamped into a number: training's finiteness checks rely on seeing it."""
    forward, cotangents = loop_inputs()
    forward[1][0, 2, 0] = float("nan")  # the posterior's input at one step of one sequence
    python_buffers, _ = run(PYTHON_LOOPS, forward, cotangents)
    buffers, grads = run(COMPILED_LOOPS, forward, cotangents)
    for got, expected in zip(buffers, python_buffers):
        assert torch.equal(got.isnan(), expected.isnan())
    assert buffers[0][3:, 0].isnan().all() and not buffers[0][:, 1:].isnan().any()  # that sequence, from then on
    assert grads[5].isnan().any()  # and the weight gradients


def test_the_model_takes_the_compiled_loops_by_default_on_a_cpu():
    model = reference.make_model("binary", dtype=torch.float32, scale=None)
    y, mask, noise = reference.make_batch("binary", 2, 5, model.config.latent_size, dtype=torch.float32)
    out = model(y, mask, noise=noise)  # the Python loops would raise (compiled_loops)
    (out.nll + out.kl).sum().backward()
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters() if parameter.grad is not None)


def test_compiled_loops_keep_the_thread_policy(monkeypatch):
    seen = []
    step_threads = fused_cpu.step_threads

    @contextmanager
    def recording(weight, rows):
        with step_threads(weight, rows):
            seen.append(torch.get_num_threads())
            yield

    monkeypatch.setattr(fused_cpu, "step_threads", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(COMPILED_LOOPS, *loop_inputs(torch.float32))
        assert seen == [1, 1] and torch.get_num_threads() == 2  # small steps: one thread, as the Python loops
    finally:
        torch.set_num_threads(before)


# -- which calls take them, and the fallback ---------------------------------------------------------


def test_only_cpu_float32_and_float64_small_products_are_compiled(monkeypatch):
    small, large = torch.zeros(320, 64), torch.zeros(4608, 1024)
    assert fused_cpu.loops(small, small) == COMPILED_LOOPS
    assert fused_cpu.loops(small.double(), small.double()) == COMPILED_LOOPS
    assert fused_cpu.loops(small.bfloat16(), small.bfloat16()) is None
    assert (fused_cpu.loops(large, large) is None) == steps.onednn_ready(large)  # oneDNN's products: Python loop
    assert fused_cpu.loops(torch.zeros(2, 3, device="meta"), small) is None
    monkeypatch.setenv(fused_cpu.SWITCH, "0")
    assert fused_cpu.loops(small, small) is None
    assert recurrence.loops_for(small, small) == (recurrence.rollout, recurrence.backpropagate)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process that has not tried to build yet, with an empty cache, and no command line that
    took the warnings (an earlier CLI test's announce_loop_builds may have set the hook)."""
    monkeypatch.setattr(fused_cpu, "_status", {})
    monkeypatch.setattr(fused_cpu, "warning_notice", None)
    monkeypatch.setenv("ZFORCING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(fused_cpu.SWITCH, "1")


@fallback
def test_without_a_compiler_the_recurrence_runs_its_python_loops(fresh_build, monkeypatch):
    monkeypatch.setattr(fused_cpu, "compiler", lambda: None)
    assert "no C++ compiler" in fused_cpu.load()
    forward, _ = loop_inputs()
    inputs = [x.clone().requires_grad_() for x in forward]
    states = posterior_recurrence(*inputs, clamp=CLAMP)[0]
    states.sum().backward()
    assert torch.equal(states.detach().transpose(0, 1), PYTHON_LOOPS[0](RolloutInputs(*forward), CLAMP)[0])
    assert all(x.grad is not None for x in inputs)


def stand_in_compiler(folder, script: str) -> str:
    """A shell script in the compiler's place, named by CXX: it answers --version at once and
    runs script for a build."""
    path = folder / "stand-in-c++"
    path.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo stand-in; exit 0; fi\n' + script)
    path.chmod(0o755)
    return str(path)


@fallback
def test_a_failed_build_warns_once_and_is_not_retried(fresh_build, monkeypatch, tmp_path):
    failing = stand_in_compiler(tmp_path, "echo 'no such header' >&2\nexit 1\n")
    monkeypatch.setenv("CXX", failing)
    with pytest.warns(RuntimeWarning, match="Could not build fused_cpu.cpp.*build_loops --rebuild.*ZFORCING_COMPILED_LOOPS=0"):
        reason = fused_cpu.load()
    assert "exit status 1" in reason and fused_cpu.load() == reason  # once per process
    log = fused_cpu.library_path(failing).with_name("build.log")
    assert "no such header" in log.read_text()
    assert fused_cpu.failure_file(fused_cpu.library_path(failing)).read_text() == reason
    monkeypatch.setattr(fused_cpu, "_status", {})  # the next process: reads the failure, builds nothing
    monkeypatch.setattr(fused_cpu, "build", lambda *args: pytest.fail("built again"))
    with pytest.warns(RuntimeWarning, match="failed to build earlier"):
        assert fused_cpu.load() == reason


@fallback
def test_a_remembered_failure_is_said_once_per_process_with_the_retry_command(fresh_build, monkeypatch, tmp_path):
    cxx = stand_in_compiler(tmp_path, "exit 1\n")
    monkeypatch.setenv("CXX", cxx)
    failed = fused_cpu.failure_file(fused_cpu.library_path(cxx))
    failed.parent.mkdir(parents=True)
    failed.write_text("could not build fused_cpu.cpp: stand-in-c++ failed (exit status 1)")
    heard = []
    monkeypatch.setattr(fused_cpu, "warning_notice", heard.append)
    small = torch.zeros(4, 4)
    assert fused_cpu.loops(small, small) is None and fused_cpu.loops(small, small) is None and fused_cpu.load() is not None
    assert len(heard) == 1
    assert "failed to build earlier (could not build" in heard[0] and "`python -m zforcing_cli.build_loops --rebuild`" in heard[0]


@fallback
@pytest.mark.parametrize("script", ["kill -INT $$\n", "exec sleep 30\n"], ids=["killed by SIGINT", "signalled while sleeping"])
def test_a_build_stopped_by_a_signal_is_not_remembered(fresh_build, monkeypatch, tmp_path, script, request):
    """Ctrl-C reaches the whole process group, the compiler too: such a build is tried again
    by the next process instead of failing for good."""
    cxx = stand_in_compiler(tmp_path, script)
    monkeypatch.setenv("CXX", cxx)
    # a shell started in the background (`cmd &`, nohup) ignores SIGINT, and so would the stand-in
    # it starts: give this process, hence the stand-in, the disposition a terminal gives
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    if script.startswith("exec sleep"):  # the stand-in is signalled from outside, as a Ctrl-C would
        started = subprocess.Popen
        def run_and_interrupt(*args, **kwargs):
            process = started(*args, **kwargs)
            if args[0][0] == cxx and args[0][1] != "--version":
                threading.Timer(0.5, process.send_signal, (signal.SIGINT,)).start()
            return process
        monkeypatch.setattr(subprocess, "Popen", run_and_interrupt)
    heard = []
    monkeypatch.setattr(fused_cpu, "warning_notice", heard.append)
    reason = fused_cpu.load()
    assert "interrupted" in reason and "SIGINT" in reason
    library = fused_cpu.library_path(cxx)
    assert not fused_cpu.failure_file(library).exists() and not library.exists()
    assert [path.name for path in library.parent.iterdir()] == ["build.log"]  # no partial library left
    assert len(heard) == 1 and "the next one builds again" in heard[0]


@fallback
def test_a_build_past_its_time_limit_is_not_remembered(fresh_build, monkeypatch, tmp_path):
    cxx = stand_in_compiler(tmp_path, "exec sleep 30\n")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setattr(fused_cpu, "BUILD_SECONDS", 0.5)
    monkeypatch.setattr(fused_cpu, "warning_notice", lambda text: None)
    assert "took more than 0.5 s" in fused_cpu.load()
    assert not fused_cpu.failure_file(fused_cpu.library_path(cxx)).exists()


@fallback
def test_rebuild_forgets_a_remembered_failure_and_builds_again(fresh_build, monkeypatch, tmp_path, capsys):
    cxx = stand_in_compiler(tmp_path, "exit 1\n")
    monkeypatch.setenv("CXX", cxx)
    library = fused_cpu.library_path(cxx)
    library.parent.mkdir(parents=True)
    fused_cpu.failure_file(library).write_text("could not build fused_cpu.cpp: an old failure")
    assert fused_cpu.main([]) == 1
    assert "an old failure" in capsys.readouterr().out  # without --rebuild: remembered, not built
    built = []
    monkeypatch.setattr(fused_cpu, "build", lambda cxx, output: built.append(output) or output.write_bytes(b""))
    monkeypatch.setattr(fused_cpu.torch.ops, "load_library", lambda path: None)
    monkeypatch.setattr(fused_cpu, "_status", {})
    assert fused_cpu.main(["--rebuild"]) == 0
    assert built == [library] and not fused_cpu.failure_file(library).exists()
    assert capsys.readouterr().out == f"ready: {library}\n"


@fallback
def test_a_build_is_announced_once_before_it_starts(fresh_build, monkeypatch, tmp_path):
    heard = []
    monkeypatch.setattr(fused_cpu, "build_notice", heard.append)
    monkeypatch.setattr(fused_cpu, "build", lambda cxx, output: heard.append("built") or output.parent.mkdir(parents=True) or output.write_bytes(b""))
    monkeypatch.setattr(fused_cpu.torch.ops, "load_library", lambda path: None)
    assert fused_cpu.load() is None and fused_cpu.load() is None
    assert len(heard) == 2 and heard[0].startswith("Compiling the recurrence's loops") and heard[1] == "built"
    monkeypatch.setattr(fused_cpu, "_status", {})  # the next process finds the library: nothing to say
    assert fused_cpu.load() is None and len(heard) == 2


@fallback
def test_the_cache_folder_and_the_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("ZFORCING_CACHE_DIR", str(tmp_path))
    assert fused_cpu.cache_dir() == tmp_path / "fused_cpu"
    monkeypatch.delenv("ZFORCING_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fused_cpu.cache_dir() == tmp_path / "xdg" / "zforcing" / "fused_cpu"
    for value, on in (("0", False), ("off", False), ("No", False), ("1", True), ("", True)):
        monkeypatch.setenv(fused_cpu.SWITCH, value)
        assert fused_cpu.enabled() is on


@fallback
def test_main_says_where_the_library_is_or_why_not(fresh_build, monkeypatch, capsys):
    monkeypatch.setattr(fused_cpu, "compiler", lambda: None)
    assert fused_cpu.main([]) == 1 and "no C++ compiler" in capsys.readouterr().out
    monkeypatch.setenv(fused_cpu.SWITCH, "off")
    assert fused_cpu.main([]) == 0 and "off" in capsys.readouterr().out


@fallback
def test_train_says_a_remembered_failure_once_and_which_loops_run(tmp_path, tiny_data):
    """The whole chain, as a user meets it: a new process finds the failure, warns once on
    stderr with the retry command, and its start line says the Python loops run, and why."""
    cxx = stand_in_compiler(tmp_path, "exit 1\n")
    env = {**os.environ, "CXX": cxx, "ZFORCING_CACHE_DIR": str(tmp_path / "cache"), fused_cpu.SWITCH: "1",
           "PYTHONPATH": str(Path(fused_cpu.__file__).parents[1])}
    failed = fused_cpu.failure_file(fused_cpu.library_path(cxx)).relative_to(fused_cpu.cache_dir())
    (tmp_path / "cache" / "fused_cpu" / failed).parent.mkdir(parents=True)
    (tmp_path / "cache" / "fused_cpu" / failed).write_text("could not build fused_cpu.cpp: stand-in-c++ failed (exit status 1)")
    result = subprocess.run([sys.executable, "-m", "zforcing_cli", "train", "--data", str(tiny_data), "--max-steps", "2",
                             "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "failed to build earlier" in warnings[0], result.stderr
    assert "`python -m zforcing_cli.build_loops --rebuild`" in warnings[0]
    assert "; Python loops (could not build fused_cpu.cpp)" in result.stderr
