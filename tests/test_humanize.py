"""How sizes, durations and counts read in messages."""

from __future__ import annotations

import pytest

from zforcing_cli.humanize import byte_size, duration, plural


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 bytes"), (1, "1 byte"), (900, "900 bytes"), (2**10, "1.0 KiB"), (62_725, "61.3 KiB"),
    (5 * 2**20, "5.0 MiB"), (int(1.25 * 2**30), "1.2 GiB"), (3 * 2**40, "3.0 TiB"),
])
def test_a_size_reads_in_the_unit_that_shows_it(count, text):
    assert byte_size(count) == text  # never "0.0 GiB" for a small size


def test_durations_and_counts():
    assert duration(7.04) == "7.0 s" and duration(3 * 86400) == "3.0 days"
    assert plural(1, "update") == "1 update" and plural(1563, "update") == "1,563 updates"
