"""bench/measure.py: how updates are timed."""

from __future__ import annotations

import torch

from zforcing_cli.bench.measure import Meter, interleaved_updates


def test_interleaved_updates_take_turns_and_count_every_update():
    taken: list[str] = []
    counts: list[tuple[int, int]] = []
    updates = {name: (lambda name=name: taken.append(name)) for name in ("a", "b", "c")}
    result = interleaved_updates(updates, 2, Meter(torch.device("cpu")), lambda done, total: counts.append((done, total)))
    assert taken == ["a", "b", "c", "a", "b", "c", "b", "c", "a"]  # a warm-up each, then rounds in rotated order
    assert counts == [(done, 9) for done in range(1, 10)]
    assert set(result) == {"a", "b", "c"} and all(entry["seconds"] >= 0 for entry in result.values())
