"""`python -m zforcing_cli.bench ARGS` runs `zforcing bench ARGS`; bench_shared's workers start
here too (sharing.WORKER_FLAG). The only module of the benchmark that imports the command line,
and nothing imports it: run as __main__, it is never loaded a second time."""

from __future__ import annotations

import json
import sys

from ..allocator import keep_freed_memory
from .sharing import WORKER_FLAG, shared_worker


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        keep_freed_memory()  # as the command line does for the trainings it measures against
        shared_worker(**json.loads(argv[1]))
        return
    from ..cli import main as cli_main  # the workers never need the command line

    sys.argv = ["zforcing", "bench", *argv]
    cli_main(prog_name="zforcing")  # the help shows `zforcing bench`, the same command


if __name__ == "__main__":
    main()
