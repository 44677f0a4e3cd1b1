"""How figures read in messages, for the core and the command line alike: counts, durations
and sizes."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """'1 update', '2 updates', '1,563 updates'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def duration(seconds: float) -> str:
    """'3.2 days', '2.5 h', '12.3 min' or '7.0 s': hours for a corpus or a long job, seconds for
    a small one, days for a job that should not be run as it stands."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:,.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def size(count: float) -> str:
    """'512 bytes', '3.1 MiB', '1.50 GiB': bytes in the largest binary unit they fill, never
    '0.0 GiB' for a few megabytes."""
    if count < 1024:
        return f"{count:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:,.{2 if count < 10 else 1}f} {unit}"
    raise AssertionError("unreachable")
