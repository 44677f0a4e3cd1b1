"""Keep the memory one training update frees for the next (glibc's malloc, on Linux).

Why: every update allocates the same large blocks again (the recurrence's time-major buffers,
the heads' activations over all B·T steps: tens of megabytes). By default glibc hands blocks
of 128 KiB and more to the kernel when they are freed, directly (mmap) or by trimming the top
of its heap, and the kernel must then zero every page again when the next update touches it.
On MNIST's small preset that was 8,000 to 15,000 page faults per update, and at TIMIT's paper
size about 48,000. Measured on a 2-core AMD EPYC, alternating the two settings update by update
in one process: MNIST's small update took 536 ms instead of 718 ms (median of 6 each; 556
against 824 in a second run); at TIMIT's paper size, where the arithmetic dominates, no change.

The cost: the process keeps what it freed, up to its own peak, instead of returning it between
updates (`zforcing bench --memory` shows the resident memory). The command line applies this
for every command (cli.main); the library itself never changes the allocator of the program
that imports it.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1  # free memory at the heap's top beyond this goes back to the kernel
M_TOP_PAD = -2  # extra bytes the heap grows by each time it must grow
M_MMAP_THRESHOLD = -3  # blocks of at least this size are mapped (and unmapped) one by one

SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's ceiling on 64-bit systems: blocks up to 32 MiB from the heap
    (M_TRIM_THRESHOLD, 1 << 30),  # keep up to 1 GiB of free heap rather than returning it
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time
)


def glibc_mallopt():
    """glibc's mallopt, or None where the C library is another (macOS, Windows, musl)."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # only glibc answers this
        return ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc serve blocks up to 32 MiB from its heap and keep freed heap for reuse.
    Returns whether every setting was taken (False off glibc: nothing changes there)."""
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
