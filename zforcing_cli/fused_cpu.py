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

ZFORCING_COMPILED_LOOPS=0 turns it off; ZFORCING_CACHE_DIR moves the cache (default
$XDG_CACHE_HOME/zforcing or ~/.cache/zforcing); CXX names the compiler. `python -m
zforcing_cli.build_loops` builds it and says where it is, or why not.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
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


def build(cxx: str, output: Path) -> None:
    """Compile into a temporary file beside output, then rename it: a process that loads the
    library never sees half of it, and two processes building at once both succeed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.with_name("build.log")
    handle, partial = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(handle)
    try:
        command = build_command(cxx, SOURCE, Path(partial))
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
        log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed (exit status {result.returncode}); its output is in {log}")
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


# Told, when set, just before the library is compiled (a CLI says so on the terminal: the build
# takes tens of seconds, once).
build_notice: Callable[[str], None] | None = None


def load() -> str | None:
    """Build (once per cache) and load the library (once per process). Returns None when the
    operators are ready, else why they are not. A failed build is not retried by every process:
    its reason is kept beside where the library would be (delete the folder to retry)."""
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
        failed = output.with_name("failed.txt")
        if failed.exists():
            return failed.read_text()
        if not output.exists():
            if build_notice is not None:
                build_notice(f"Compiling the recurrence's loops for this machine with {Path(cxx).name}, once: about 20 s.")
            try:
                build(cxx, output)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                reason = f"could not build {SOURCE.name}: {error}"
                with suppress(OSError):  # a cache that cannot be written: every process tries again
                    failed.write_text(reason)
                warnings.warn(f"{reason}. The recurrence runs its Python loops (slower on a CPU at small widths); "
                              f"{SWITCH}=0 skips the build.", RuntimeWarning, stacklevel=3)
                return reason
        torch.ops.load_library(str(output))
    except (OSError, RuntimeError) as error:
        return f"could not load the compiled loops: {error}"
    return None


def suits(reference: Tensor, *weights: Tensor) -> bool:
    """Whether the compiled loops take this call: a CPU, float32 or float64, products small
    enough for the plain product, not switched off."""
    return (reference.device.type == "cpu" and reference.dtype in (torch.float32, torch.float64) and enabled()
            and not any(onednn_ready(weight) for weight in weights))


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
    if not suits(reference, *weights) or load() is not None:
        return None
    return rollout, backpropagate


def main() -> int:
    """`python -m zforcing_cli.build_loops`: build the compiled loops now and say where they are."""
    if not enabled():
        print(f"off: {SWITCH} is {os.environ[SWITCH]!r}")
        return 0
    reason = load()
    if reason is not None:
        print(f"not available: {reason}")
        return 1
    print(f"ready: {library_path(compiler())}")  # type: ignore[arg-type]
    return 0

