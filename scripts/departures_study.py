"""The measured effect of each departure from the authors' code (docs/protocols.md, "Departures").

    python scripts/departures_study.py ROOT [--only NAME ...] [--seed 0] [--limit 2000] [--max-steps N]

Trains the MNIST small preset (`zforcing train`, embedded MNIST) once as it is and once per
departure switched to the authors' form (--max-steps: shorter runs), one run at a time, each on one thread (`--threads 1`:
the numbers do not depend on the machine's load), at the same seed. Each run is then
evaluated on the first --limit test images (`zforcing evaluate RUN --limit N --json`). Runs
go to ROOT/NAME; ROOT/results.json collects each run's test bound and KL (nats per image) as it
ends, and a run already there is not trained again, so the study continues where it stopped.
At the end, the results as the Markdown rows of protocols.md's table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> the options that switch one departure to the authors' form ("as is": none).
VARIANTS = {
    "as is": [],
    "output head": ["--output-head", "linear"],
    "init": ["--init", "authors"],
    "biases": ["--lstm-biases", "two"],
    "KL anneal": ["--kl-anneal", "--kl-anneal-on-skip", "advance"],
    "skip rule": ["--skip-rule", "loss"],
    "cond_ln": ["--cond-ln"],
    "backward layers 2": ["--backward-layers", "2"],
    "aux l2": ["--aux-cost", "l2"],
    "aux condition": ["--aux-condition", "hz"],
}


def zforcing(*arguments: str) -> subprocess.CompletedProcess:
    """`zforcing ARGUMENTS` from this checkout, its stdout captured, its stderr passed on."""
    command = [sys.executable, "-m", "zforcing_cli", *arguments]
    return subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def measure(run: Path, options: list[str], seed: int, limit: int, length: list[str]) -> dict:
    """Train the run (unless it has ended before) and evaluate its best checkpoint."""
    if not any((run / "checkpoints").glob("best*")):
        zforcing("train", "--out", str(run), "--force", "--seed", str(seed), "--threads", "1", *length, *options)
    report = json.loads(zforcing("evaluate", str(run), "--limit", str(limit), "--json", "--threads", "1").stdout)
    return {"options": options, "bound": report["nll_elbo"], "kl": report["kl"]}


def table_rows(results: dict) -> list[str]:
    base = results.get("as is")
    rows = []
    for name, result in results.items():
        change = "" if base is None or name == "as is" else f" ({result['bound'] - base['bound']:+.2f})"
        option = " ".join(result["options"]) or "(defaults)"
        rows.append(f"| {name} | `{option}` | {result['bound']:.2f}{change} | {result['kl']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder of the runs and results.json")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=2000, help="test images evaluated")
    parser.add_argument("--max-steps", type=int, help="updates per run (default: the preset's 1,000)")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    results_file = args.root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.only or VARIANTS:
        if name not in results:
            length = [] if args.max_steps is None else ["--max-steps", str(args.max_steps)]
            results[name] = measure(args.root / name.replace(" ", "-"), VARIANTS[name], args.seed, args.limit, length)
            results_file.write_text(json.dumps(results, indent=2))
        print(f"{name}: bound {results[name]['bound']:.2f}, KL {results[name]['kl']:.2f}", file=sys.stderr)
    print("\n".join(table_rows(results)))


if __name__ == "__main__":
    main()
