"""allocator.py: freed memory is kept for the next update instead of being faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zforcing_cli.allocator import glibc_mallopt

# Three rounds of an "update" that allocates eight 8 MiB blocks, touches them and frees them;
# the page faults of the last round. In a fresh process, so that the default allocator is there
# to compare with (the setting is process-wide and the test process may have it already).
ROUNDS = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "kept":
    from zforcing_cli.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(2 << 20, dtype=np.float32) for _ in range(8)]
    del blocks
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(faults))
"""
PAGES = 8 * (8 << 20) // 4096  # the pages one round touches


def last_round_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(glibc_mallopt() is None, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    assert last_round_faults("default") > PAGES // 8  # a good part returned to the kernel, zeroed again
    assert last_round_faults("kept") < PAGES // 100


def test_the_command_line_keeps_freed_memory(monkeypatch):
    from zforcing_cli import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(cli, "app", lambda **options: None)
    cli.main()
    assert calls == [True]
