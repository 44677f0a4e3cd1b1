"""The weights of the objective's terms over training: the KL weight w_kl and the auxiliary
weight α (Eq. 10), each a function of how many updates came before.

Both follow the authors' schedules: a weight moves linearly by a fixed amount per update from
a start value to its final value, then stays there. The KL weight counts the updates taken
(skipped ones left out, kl_anneal_on_skip "freeze"), or every update as the authors' scripts do
("advance"); α counts every update, skipped ones too, so that the host knows it without
reading the device.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor


class Weights(Protocol):  # the TrainConfig fields read here
    kl_anneal: bool
    kl_start: float
    kl_increment: float
    kl_anneal_on_skip: str
    aux_weight: float
    aux_start: float | None
    aux_increment: float


def annealed_kl_weight(config: Weights, updates: int) -> float:
    if not config.kl_anneal:
        return 1.0
    return min(1.0, config.kl_start + config.kl_increment * updates)


def kl_anneal_updates(config: Weights, updates: int, skipped: int) -> int:
    """The updates the KL weight counts after `updates` updates of which `skipped` were skipped."""
    return updates if config.kl_anneal_on_skip == "advance" else updates - skipped


def annealed_kl_weight_on_device(config: Weights, updates: Tensor) -> Tensor:
    """annealed_kl_weight for a count of updates held on the device."""
    return torch.clamp(config.kl_start + config.kl_increment * updates, max=1.0)


def annealed_aux_weight(config: Weights, updates: int) -> float:
    """α after `updates` updates: aux_weight throughout, or, with aux_start set, aux_start moved
    towards aux_weight by aux_increment per update (up or down), then aux_weight."""
    if config.aux_start is None:
        return config.aux_weight
    distance = config.aux_weight - config.aux_start
    moved = config.aux_increment * updates
    if moved >= abs(distance):
        return config.aux_weight  # exactly, not aux_start + distance rounded
    return config.aux_start + math.copysign(moved, distance)


def aux_weight_reaches_zero(config: Weights) -> bool:
    """Whether α is 0 at some update (the auxiliary head then takes no part in it)."""
    return min(config.aux_weight, config.aux_weight if config.aux_start is None else config.aux_start) <= 0
