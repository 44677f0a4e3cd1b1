"""Everything that runs only on a GPU, checked in one go: scripts/gpu_check.sh runs this.

CI has no GPU. The CPU capture guard (tests/test_capture.py) keeps out of the GPU paths what
CUDA-graph capture refuses; this script runs those paths for real, on one GPU, in a few minutes:

- the CUDA tests (the recurrence's CUDA graphs, training at every precision, resume, no wait
  for the GPU per update);
- `zforcing bench --device cuda` for each preset, and MNIST's small one again with the
  recurrence's loops as Triton kernels (ZFORCING_TRITON_LOOPS=1);
- a short training for each data kind (images, speech, text) at each precision (fp32, tf32,
  bf16, fp16), each followed by `evaluate` and `sample`;
- a one-process `torchrun` training (DistributedDataParallel over NCCL).

It prints one line per check, PASS or FAIL with its figure, and exits 1 if any failed. The
speech and text corpora are synthesised here (no download). `--device cpu` runs the same
checks on a CPU at tiny sizes (the GPU-only precisions and tests left out): a check of the
script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tree's zforcing_cli, installed or not

BENCH_PRESETS = (("mnist", "small"), ("mnist", "paper"), ("timit", "paper"), ("blizzard", "paper"), ("imdb", "paper"))
KINDS = ("images", "speech", "text")
GPU_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
CPU_PRECISIONS = ("fp32", "bf16")  # tf32 and fp16 are refused on a CPU
TRAIN_UPDATES = {"images": 20, "speech": 40, "text": 30}
SAMPLE_OPTIONS = {"images": ["--num", "4", "--out", "sample.png"], "speech": ["--seconds", "1", "--out", "sample.wav"],
                  "text": ["--num", "4", "--out", "sample.txt"]}


class CheckFailed(Exception):
    """A check's failure, in one line."""


@dataclass
class Outcome:
    name: str
    passed: bool
    figure: str
    seconds: float


def last_error_line(text: str) -> str:
    """The command's `Error:` line (or its last line): what a failure says."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def zforcing(*args: str) -> tuple[str, str]:
    """Run a zforcing command in this process (start-up and CUDA's initialisation paid once);
    its stdout and stderr, or CheckFailed with its error line."""
    from typer.testing import CliRunner

    from zforcing_cli.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if result.exit_code != 0:
        detail = last_error_line(result.stderr) if result.stderr.strip() else repr(result.exception)
        raise CheckFailed(f"`zforcing {shlex.join(args)}` exited {result.exit_code}: {detail}")
    return result.stdout, result.stderr


def python_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)


# -- the checks -------------------------------------------------------------------------------------


def cuda_tests(device: str) -> str:
    done = python_module("pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", "cuda", str(ROOT / "tests"), timeout=600)
    summary = last_error_line(done.stdout)
    if done.returncode != 0:
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise CheckFailed(f"{summary}; first: {failed[0] if failed else '(see pytest)'}")
    if device == "cuda" and "skipped" in summary:
        raise CheckFailed(f"{summary}: tests skipped on a machine with a GPU")
    return summary


def bench(preset: str, size: str, device: str) -> str:
    size = size if device == "cuda" else "tiny"
    stdout, _ = zforcing("bench", "--preset", preset, "--size", size, "--device", device, "--updates", "3", "--json")
    figures = json.loads(stdout)
    fused, pair = figures["update_ms_fused"], figures["update_ms_fused_lstm_pair"]
    return f"fused {fused:.1f} ms, fused LSTM pair {pair:.1f} ms: {fused / pair:.2f}×"


def bench_triton(device: str) -> str:
    """MNIST's small update with the recurrence's loops as Triton kernels (fused_gpu.py), against
    the same pair: what `bench mnist (small)` gives with the CUDA-graph loops."""
    os.environ["ZFORCING_TRITON_LOOPS"] = "1"
    try:
        return bench("mnist", "small", device)
    finally:
        del os.environ["ZFORCING_TRITON_LOOPS"]


def write_speech(folder: Path, files: int = 20, seconds: float = 3.0, rate: int = 16000) -> None:
    """Voiced-speech-like audio: harmonics of a gliding pitch under a syllable envelope, plus noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    t = np.arange(int(seconds * rate)) / rate
    for index in range(files):
        pitch = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.random() * 6), 0, None)
        signal = 0.3 * voiced * envelope + 0.02 * rng.standard_normal(len(t))
        samples = np.clip(signal / np.abs(signal).max() * 20000, -32768, 32767).astype("<i2")
        with wave.open(str(folder / f"utterance{index:02d}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(samples.tobytes())


SUBJECTS = ("the film", "this movie", "the acting", "the plot", "the music", "every scene", "the ending", "the cast")
VERBS = ("was", "is", "seemed", "felt", "looked", "became")
OBJECTS = ("great", "awful", "boring", "funny", "too long", "a waste of time", "really good", "a small masterpiece")
TAILS = ("", " in the end", " to me", " at times", " for its age", " after an hour", " on the big screen")


def write_text(path: Path, sentences: int = 3000) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(sentences):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
        lines.append(words[0].upper() + words[1:] + ".")
    path.write_text("\n".join(lines) + "\n")


def prepare(kind: str, work: Path) -> str:
    if kind == "speech":
        write_speech(work / "speech-raw")
        stdout, stderr = zforcing("prepare", "wav", work / "speech-raw", "--out", work / "speech")
    else:
        write_text(work / "text.txt")
        stdout, stderr = zforcing("prepare", "text", work / "text.txt", "--out", work / "text")
    counts = json.loads((work / kind / "meta.json").read_text())["counts"]
    return ", ".join(f"{split} {count:,}" for split, count in counts.items())


def data_option(kind: str, work: Path) -> list[str]:
    return [] if kind == "images" else ["--data", str(work / kind)]


def train(kind: str, precision: str, device: str, work: Path) -> str:
    run = work / "runs" / f"{kind}-{precision}"
    updates = TRAIN_UPDATES[kind]
    tiny = [] if device == "cuda" else ["--batch-size", "4"]
    zforcing("train", *data_option(kind, work), "--out", run, "--device", device, "--precision", precision,
             "--max-steps", updates, *tiny)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid"]
    if not valid or not math.isfinite(valid[-1]["nll_bound"]):
        raise CheckFailed(f"no finite validation bound in {run / 'metrics.jsonl'}")
    return f"{updates} updates, {1 / statistics.median(seconds):.1f} updates/s; validation NLL bound {valid[-1]['nll_bound']:,.2f}"


def evaluate(kind: str, precision: str, device: str, work: Path) -> str:
    stdout, _ = zforcing("evaluate", work / "runs" / f"{kind}-{precision}", "--device", device, "--limit", "64", "--json")
    report = json.loads(stdout)
    if not math.isfinite(report["nll_elbo"]):
        raise CheckFailed(f"test NLL bound {report['nll_elbo']}")
    return f"test NLL bound {report['nll_elbo']:,.2f} {report['unit']} (first 64)"


def sample(kind: str, precision: str, device: str, work: Path) -> str:
    run = work / "runs" / f"{kind}-{precision}"
    options = SAMPLE_OPTIONS[kind]
    out = run / options[-1]
    zforcing("sample", run, "--device", device, *options[:-1], str(out))
    if not out.is_file() or out.stat().st_size == 0:
        raise CheckFailed(f"{out} was not written")
    return f"{out.name}, {out.stat().st_size:,} bytes"


def torchrun(device: str, work: Path) -> str:
    run = work / "runs" / "torchrun"
    tiny = [] if device == "cuda" else ["--batch-size", "4"]
    done = python_module("torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "zforcing_cli", "train",
                         "--out", str(run), "--device", device, "--max-steps", "10", *tiny)
    if done.returncode != 0:
        raise CheckFailed(f"torchrun exited {done.returncode}: {last_error_line(done.stderr)}")
    backend = "(nccl, cuda)" if device == "cuda" else "(gloo, cpu)"
    if f"on 1 process {backend}" not in done.stderr:
        raise CheckFailed(f"the training did not report 1 process {backend}: {last_error_line(done.stderr)}")
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    return f"DDP over {backend[1:-1].split(',')[0]}, 10 updates; validation NLL bound {valid[-1]['nll_bound']:,.2f}"


# -- running them -----------------------------------------------------------------------------------


def planned_checks(device: str, work: Path) -> list[tuple[str, Callable[[], str]]]:
    precisions = GPU_PRECISIONS if device == "cuda" else CPU_PRECISIONS
    checks: list[tuple[str, Callable[[], str]]] = [("cuda tests", lambda: cuda_tests(device))]
    checks += [(f"bench {preset} ({size})", lambda p=preset, s=size: bench(p, s, device)) for preset, size in BENCH_PRESETS]
    if device == "cuda":
        checks.append(("bench mnist (small, triton)", lambda: bench_triton(device)))
    checks += [(f"prepare {kind}", lambda k=kind: prepare(k, work)) for kind in ("speech", "text")]
    for kind in KINDS:
        for precision in precisions:
            for name, step in (("train", train), ("evaluate", evaluate), ("sample", sample)):
                checks.append((f"{name} {kind} {precision}", lambda s=step, k=kind, p=precision: s(k, p, device, work)))
    checks.append(("torchrun 1 process", lambda: torchrun(device, work)))
    return checks


def run_check(name: str, check: Callable[[], str]) -> Outcome:
    began = time.perf_counter()
    try:
        figure, passed = check(), True
    except CheckFailed as error:
        figure, passed = str(error), False
    except Exception as error:  # a bug shows as a failed check, with its traceback on stderr
        traceback.print_exc(file=sys.stderr)
        figure, passed = f"{type(error).__name__}: {error}", False
    return Outcome(name, passed, figure, time.perf_counter() - began)


def report(outcome: Outcome) -> None:
    print(f"{'PASS' if outcome.passed else 'FAIL'}  {outcome.name:<24} {outcome.figure}  [{outcome.seconds:.1f} s]", flush=True)


def machine(device: str) -> str:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return f"{where}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the same checks at tiny sizes (default cuda)")
    parser.add_argument("--only", nargs="*", default=[], help="run the checks whose names contain one of these words")
    parser.add_argument("--work", type=Path, help="keep the datasets and runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        report(Outcome("cuda available", False, "torch.cuda.is_available() is False: run on a machine with a GPU, or --device cpu", 0.0))
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="zforcing-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # runs/latest and other relative outputs land here
    print(f"gpu_check: {machine(args.device)}; work folder {work}", flush=True)
    began, outcomes = time.perf_counter(), []
    for name, check in planned_checks(args.device, work):
        if args.only and not any(word in name for word in args.only):
            continue
        outcomes.append(run_check(name, check))
        report(outcomes[-1])
    failed = [outcome.name for outcome in outcomes if not outcome.passed]
    minutes, seconds = divmod(time.perf_counter() - began, 60)
    print(f"gpu_check: {len(outcomes) - len(failed)} of {len(outcomes)} checks passed in {int(minutes)} min {seconds:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if args.work is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
    elif failed:
        print(f"gpu_check: the datasets and runs are kept in {work}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
