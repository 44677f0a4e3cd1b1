"""The recurrence's two loops compiled for the CPU: fused_cpu.cpp, built on first use.

recurrence.py's `rollout` and `backpropagate` run a dozen torch operations per step; each costs
the interpreter and the dispatcher a few microseconds, which at small widths is most of the
step (64 units, batch 32: a step's arithmetic is about as long as that overhead). fused_cpu.cpp
is the same two loops in C++, each one function: the same inputs, the same buffers, the same
formulas, three matrix products and three vectorised transcendentals per step through ATen and
the rest fused into plain loops. The tests hold it to the autograd reference as they hold the
Python loops (tests/test_fused_cpu.py).

Built with the machine's C++ compiler against the installed torch's headers and libraries on
first use (a few tens of seconds, once), into a cache folder keyed by the source, the torch
build and the compiler; later processes load the built library. Only on a CPU, in float32 and
float64, and only where the per-step products are small enough for the plain product (where
recurrence.StepProduct would hand them to oneDNN, the products dominate a step and the Python
loop's overhead is a few percent). Anything else, and wherever the library cannot be built or
loaded, runs the Python loops: the same results to rounding.

A build that fails is remembered (failed.txt beside where the library would be), so that not
every process waits for the compiler to fail again; each process that finds it says so once,
with the command that retries it. A build stopped from outside (a signal such as Ctrl-C, or
the time limit) is not the source's fault and is not remembered: the next process builds again.

ZFORCING_COMPILED_LOOPS=0 turns it off; ZFORCING_CACHE_DIR moves the cache (default
$XDG_CACHE_HOME/zforcing or ~/.cache/zforcing); CXX names the compiler. `python -m
zforcing_cli.build_loops` builds it and says where it is, or why not; with --rebuild it forgets
a remembered failure (and the library) and builds again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch
from torch import Tensor

from .steps import CLIP, LEAK, onednn_ready, step_threads

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
NAMESPACE = "zforcing_fused_cpu"  # the operators' namespace, torch.ops.zforcing_fused_cpu
SWITCH = "ZFORCING_COMPILED_LOOPS"
OFF = ("0", "off", "false", "no")
# -ffp-contract=off: a * b + c rounded as written (no fused multiply-adds), on every machine.
FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-w")
# The fused loops vectorised for this processor (a quarter faster than for the baseline x86-64
# at 64 units); the cache key holds the processor's features, so another machine builds its own.
NATIVE = ("-march=native",) if platform.machine().lower() in ("x86_64", "amd64") else ()
BUILD_SECONDS = 600  # a build that takes longer than this has gone wrong
RETRY_COMMAND = "python -m zforcing_cli.build_loops --rebuild"
SLOWER = "the recurrence runs its Python loops (slower on a CPU at small widths)"

_status: dict[str, str] = {}  # "ready" -> the library's path, or "failed" -> why


def enabled() -> bool:
    """False when ZFORCING_COMPILED_LOOPS says off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in OFF


def compiler() -> str | None:
    """The C++ compiler: $CXX, else c++, g++ or clang++ on the PATH."""
    named = os.environ.get("CXX")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def cache_dir() -> Path:
    if os.environ.get("ZFORCING_CACHE_DIR"):
        return Path(os.environ["ZFORCING_CACHE_DIR"]) / "fused_cpu"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zforcing" / "fused_cpu"


def build_command(cxx: str, source: Path, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    link = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    return [cxx, *FLAGS, *NATIVE, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(torch_dir / "include"), str(source),
            "-o", str(output), f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
            "-ltorch", *link]


def compiler_identity(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx


def processor() -> str:
    """The processor's name and features (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def library_path(cxx: str) -> Path:
    """Where the library built by cxx for this torch and this source lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), str(getattr(torch.version, "git_version", "")).encode(),
                 str(Path(torch.__file__).parent).encode(), " ".join(FLAGS + NATIVE).encode(),
                 compiler_identity(cxx).encode(), processor().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / key.hexdigest()[:20] / "fused_cpu.so"


class BuildInterrupted(Exception):
    """A build stopped from outside (a signal, the time limit): not remembered as a failure."""


def build(cxx: str, output: Path) -> None:
    """Compile into a temporary file beside output, then rename it: a process that loads the
    library never sees half of it, and two processes building at once both succeed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.with_name("build.log")
    handle, partial = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(handle)
    try:
        command = build_command(cxx, SOURCE, Path(partial))
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
        except subprocess.TimeoutExpired:
            raise BuildInterrupted(f"{Path(cxx).name} took more than {BUILD_SECONDS} s") from None
        log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
        if result.returncode < 0:  # killed by a signal: a Ctrl-C to the process group, say
            raise BuildInterrupted(f"{Path(cxx).name} was stopped by {signal_name(-result.returncode)}")
        if result.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed (exit status {result.returncode}); its output is in {log}")
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Told, when set, just before the library is compiled (a CLI says so on the terminal: the build
# takes tens of seconds, once).
build_notice: Callable[[str], None] | None = None
# Told, when set, why this process runs the Python loops where the compiled ones were wanted
# (a CLI prints it as a warning); unset, the reason is a RuntimeWarning.
warning_notice: Callable[[str], None] | None = None


def warn(text: str) -> None:
    if warning_notice is not None:
        warning_notice(text)
    else:
        warnings.warn(text, RuntimeWarning, stacklevel=4)


def load() -> str | None:
    """Build (once per cache) and load the library (once per process). Returns None when the
    operators are ready, else why they are not. A failed build is not retried by every process:
    its reason is kept beside where the library would be, and said once per process with the
    command that retries it (RETRY_COMMAND)."""
    if "ready" in _status:
        return None
    if "failed" in _status:
        return _status["failed"]
    reason = _load()
    if reason is None:
        _status["ready"] = "yes"
    else:
        _status["failed"] = reason
    return reason


def _load() -> str | None:
    if sys.platform not in ("linux", "darwin"):
        return f"not built on {sys.platform}"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        output = library_path(cxx)
        failed = failure_file(output)
        if failed.exists():
            reason = failed.read_text()
            warn(f"The compiled loops failed to build earlier ({reason}), so {SLOWER}. Once the cause is fixed, "
                 f"`{RETRY_COMMAND}` tries again; {SWITCH}=0 stops trying.")
            return reason
        if not output.exists():
            if build_notice is not None:
                build_notice(f"Compiling the recurrence's loops for this machine with {Path(cxx).name}, once: about 20 s.")
            try:
                build(cxx, output)
            except BuildInterrupted as error:
                reason = f"the build of {SOURCE.name} was interrupted: {error}"
                warn(f"The build of {SOURCE.name} was interrupted ({error}), so {SLOWER} in this process; the next one builds again.")
                return reason
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                reason = f"could not build {SOURCE.name}: {error}"
                with suppress(OSError):  # a cache that cannot be written: every process tries again
                    failed.write_text(reason)
                warn(f"Could not build {SOURCE.name} ({error}), so {SLOWER}. Once the cause is fixed, `{RETRY_COMMAND}` tries again; "
                     f"{SWITCH}=0 skips the build.")
                return reason
        torch.ops.load_library(str(output))
    except (OSError, RuntimeError) as error:
        return f"could not load the compiled loops: {error}"
    return None


def failure_file(library: Path) -> Path:
    """Where a failed build of library keeps its reason."""
    return library.with_name("failed.txt")


def unsuited(reference: Tensor, *weights: Tensor) -> str | None:
    """Why the compiled loops do not take this call, or None when they do (once built): they
    take a CPU, float32 or float64, products small enough for the plain product, not switched off."""
    if reference.device.type != "cpu":
        return f"the compiled loops are for a CPU; this runs on {reference.device.type}"
    if reference.dtype not in (torch.float32, torch.float64):
        return f"the compiled loops take float32 and float64, not {str(reference.dtype).removeprefix('torch.')}"
    if not enabled():
        return f"{SWITCH}={os.environ[SWITCH]}"
    if any(onednn_ready(weight) for weight in weights):
        return "at these widths oneDNN's products take most of a step, and the Python loops hand them to it"
    return None


def suits(reference: Tensor, *weights: Tensor) -> bool:
    """Whether the compiled loops take this call (see unsuited)."""
    return unsuited(reference, *weights) is None


def why_not(reference: Tensor, *weights: Tensor) -> str | None:
    """Why the compiled loops do not run this call (building them first where they suit it),
    or None when they do."""
    return unsuited(reference, *weights) or load()


def rollout(inputs: tuple[Tensor, ...], clamp: float) -> tuple[Tensor, ...]:
    """recurrence.rollout, compiled: the same RolloutInputs and the same buffers."""
    input_gates, from_h_weight = inputs[0], inputs[3]
    with step_threads(from_h_weight, input_gates.shape[0]):
        return tuple(getattr(torch.ops, NAMESPACE).rollout(*inputs, clamp, LEAK, CLIP))


def backpropagate(inputs: tuple[Tensor, ...], clamp: float) -> tuple[Tensor, ...]:
    """recurrence.backpropagate, compiled: the same BackwardInputs and the same gradients. Its
    loop runs on the threads steps.step_threads gives a loop (one at small widths), the weight
    gradients' products after it on all of torch's, as in the Python version."""
    states, from_h_weight = inputs[0], inputs[9]
    with step_threads(from_h_weight, states.shape[1]):  # the batch
        loop_threads = torch.get_num_threads()
    return tuple(getattr(torch.ops, NAMESPACE).backpropagate(*inputs, clamp, LEAK, CLIP, loop_threads))


def loops(reference: Tensor, *weights: Tensor) -> tuple | None:
    """(rollout, backpropagate) compiled, when they suit this call and can be built; else None."""
    return None if why_not(reference, *weights) is not None else (rollout, backpropagate)


def forget_build() -> None:
    """Remove this machine's library, or its remembered failure, so that the next load builds."""
    cxx = compiler()
    if cxx is not None:
        library = library_path(cxx)
        for path in (library, failure_file(library), library.with_name("build.log")):
            path.unlink(missing_ok=True)
    _status.clear()


def main(argv: list[str] | None = None) -> int:
    """`python -m zforcing_cli.build_loops [--rebuild]`: build the compiled loops now and say
    where they are, or why not."""
    parser = argparse.ArgumentParser(prog="python -m zforcing_cli.build_loops",
                                     description="Build the recurrence's compiled CPU loops now; say where they are, or why not.")
    parser.add_argument("--rebuild", action="store_true", help="forget a failed build (or the built library) and build again")
    options = parser.parse_args(argv)
    if not enabled():
        print(f"off: {SWITCH} is {os.environ[SWITCH]!r}")
        return 0
    if options.rebuild:
        forget_build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is printed below
        reason = load()
    if reason is not None:
        cxx = compiler()
        remembered = cxx is not None and failure_file(library_path(cxx)).exists()
        print(f"not available: {reason}" + (f"\n(remembered: once the cause is fixed, `{RETRY_COMMAND}` tries again)" if remembered else ""))
        return 1
    print(f"ready: {library_path(compiler())}")  # type: ignore[arg-type]
    return 0

