"""One training update (update.py): the device update's skip, the updates whose metrics are read
later. The objective is tested with the model's terms (test_model.py), whole runs in test_train.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from zforcing_cli.model import ZForcing
from zforcing_cli.update import METRICS, SKIPPED, PendingUpdate, PendingUpdates, Updater, batch_inputs, device_update

from conftest import tiny_run_config

CPU = torch.device("cpu")


def weights_and_adam(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {name: p.detach().clone() for name, p in model.named_parameters()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{key}": value.clone() for key, value in state.items()})
    return tensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gradient_scaler_skips_a_non_finite_update_and_backs_off(tiny_dataset):
    config = tiny_run_config(tiny_dataset).train
    torch.manual_seed(0)
    model = ZForcing(tiny_run_config(tiny_dataset).model)
    updater = Updater(model, config, CPU, on_device=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batch, noise, share = batch_inputs(tiny_dataset.split("train"), np.arange(4), model, seed=0, step=0, device=CPU)
    assert share == 1.0 and noise.shape == (4, batch.targets.shape[1], model.config.latent_size)

    def update(kl_weight: float) -> float:
        record = device_update(updater.training_step, updater.optimizer, batch, noise, kl_weight, config, scaler)
        return record[SKIPPED].item()

    assert update(1.0) == 0.0 and scaler.get_scale() == 2.0**8
    before = weights_and_adam(model, updater.optimizer)
    assert update(float("nan")) == 1.0 and scaler.get_scale() == 2.0**7
    assert same(before, weights_and_adam(model, updater.optimizer))  # weights and Adam's state untouched
    assert update(1.0) == 0.0 and not same(before, weights_and_adam(model, updater.optimizer))


def record(skipped: bool) -> torch.Tensor:
    return torch.tensor([*range(len(METRICS)), float(skipped)], dtype=torch.float64)


def test_pending_updates_are_read_at_once_and_name_the_update_that_broke_the_weights():
    model = nn.Linear(2, 1)
    pending = PendingUpdates()
    skips = [False, True, False, True, True]

    def take_all():
        for step, skipped in enumerate(skips, start=1):
            pending.begin()
            pending.add(PendingUpdate(step, 0, 1e-3, record(skipped)))

    take_all()
    read, seconds, elapsed = pending.read(model)
    assert [update.step for update, _, _ in read] == [1, 2, 3, 4, 5]
    assert [metrics is None for _, metrics, _ in read] == skips
    assert read[0][1] == {name: float(index) for index, name in enumerate(METRICS)}
    assert not any(broke for _, _, broke in read)  # the weights are finite: the skips broke nothing
    assert elapsed > 0 and seconds == pytest.approx(elapsed / len(skips))
    assert pending.read(model) == ([], 0.0, 0.0)  # read once
    with torch.no_grad():
        model.weight.fill_(math.nan)
    take_all()
    read, _, _ = pending.read(model)
    # Non-finite weights make every later update non-finite: the last run of skips began with them.
    assert [broke for _, _, broke in read] == [False, False, False, True, False]
