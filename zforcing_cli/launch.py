"""How this process was started: on its own, or as one rank of several (torchrun). Read from
the environment, without torch, so that the command line's error reporting (console.py) needs
none; distributed.py joins the ranks."""

from __future__ import annotations

import os

from .errors import ZForcingError


def launched_rank() -> int | None:
    """This process's rank when torchrun started it (TORCHELASTIC_RUN_ID), or when several
    processes were started otherwise (WORLD_SIZE > 1); None for a process on its own. A
    torchrun of one process is a group of one, so that it trains as with more (DDP, NCCL)."""
    by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 and not by_torchrun:
        return None
    return int(os.environ.get("RANK", "0") or 0)


class PeerFailed(ZForcingError):
    """Rank 0 failed where it works for every rank (setting up the run): the other ranks stop
    with its exit code and say nothing, since rank 0 reports the error."""

    def __init__(self, exit_code: int):
        super().__init__("rank 0 failed")
        self.exit_code = exit_code
