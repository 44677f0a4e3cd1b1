"""One training update (update.py): the device update's skip, the updates whose metrics are read
later. The objective is tested with the model's terms (test_model.py), whole runs in test_train.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from zforcing_cli.model import ZForcing
from zforcing_cli.runconfig import TrainConfig
from zforcing_cli.schedule import annealed_kl_weight, kl_anneal_updates
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


# -- the skip rules: ours (loss and gradient) and the authors' (the loss only; Blizzard's KL limit) --------


def non_finite_gradient_update(tiny_dataset, on_device: bool, **train_overrides):
    """An update whose loss is finite but whose gradient is not (a hook poisons one weight's):
    its record's skipped flag, and whether the weights stayed, stayed finite."""
    run_config = tiny_run_config(tiny_dataset, **train_overrides)
    torch.manual_seed(0)
    model = ZForcing(run_config.model)
    model.prior.out.weight.register_hook(lambda grad: grad * math.nan)
    updater = Updater(model, run_config.train, CPU, on_device=on_device)
    batch, noise, share = batch_inputs(tiny_dataset.split("train"), np.arange(4), model, seed=0, step=0, device=CPU)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    record = updater(batch, noise, share, step=0, kl_weight=1.0)
    unchanged = all(torch.equal(before[name], p) for name, p in model.named_parameters())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return bool(record[SKIPPED]), torch.isfinite(record[0]).item(), unchanged, finite


@pytest.mark.parametrize("on_device", [False, True])
def test_skip_rule_loss_and_grad_keeps_a_non_finite_gradient_from_adam(tiny_dataset, on_device):
    skipped, loss_finite, unchanged, _ = non_finite_gradient_update(tiny_dataset, on_device)
    assert loss_finite and skipped and unchanged


@pytest.mark.parametrize("on_device", [False, True])
def test_skip_rule_loss_lets_a_non_finite_gradient_reach_adam_as_the_authors_did(tiny_dataset, on_device):
    skipped, loss_finite, unchanged, finite = non_finite_gradient_update(tiny_dataset, on_device, skip_rule="loss")
    assert loss_finite and not skipped and not unchanged and not finite  # the run then stops (divergence)


@pytest.mark.parametrize("on_device", [False, True])
def test_skip_kl_above_skips_an_update_whose_kl_reaches_it(tiny_dataset, on_device):
    def update(limit: float | None):
        run_config = tiny_run_config(tiny_dataset, skip_kl_above=limit)
        torch.manual_seed(0)
        model = ZForcing(run_config.model)
        updater = Updater(model, run_config.train, CPU, on_device=on_device)
        batch, noise, share = batch_inputs(tiny_dataset.split("train"), np.arange(4), model, seed=0, step=0, device=CPU)
        before = [p.detach().clone() for p in model.parameters()]
        record = updater(batch, noise, share, step=0, kl_weight=1.0)
        return record, all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    record, _ = update(None)
    kl = record[METRICS.index("kl")].item()
    assert kl > 0
    record, unchanged = update(kl * 0.999)
    assert record[SKIPPED] == 1.0 and unchanged
    record, unchanged = update(kl * 1.001)
    assert record[SKIPPED] == 0.0 and not unchanged


@pytest.mark.parametrize("rule, counted", [("freeze", 1.0), ("advance", 2.0)])
def test_the_kl_weight_on_the_device_counts_skipped_updates_only_when_it_advances(tiny_dataset, rule, counted):
    run_config = tiny_run_config(tiny_dataset, kl_anneal=True, kl_anneal_on_skip=rule)
    torch.manual_seed(0)
    model = ZForcing(run_config.model)
    updater = Updater(model, run_config.train, CPU, on_device=True)
    updater.start(0)
    batch, noise, share = batch_inputs(tiny_dataset.split("train"), np.arange(4), model, seed=0, step=0, device=CPU)
    updater(batch, noise, share, step=0, kl_weight=0.2)
    updater(batch, noise * math.nan, share, step=1, kl_weight=0.2)  # a non-finite loss: skipped
    assert updater.good_updates.item() == counted


def test_kl_anneal_updates_leave_out_skipped_ones_only_when_frozen():
    frozen, advancing = (TrainConfig(kl_anneal=True, kl_anneal_on_skip=rule) for rule in ("freeze", "advance"))
    assert kl_anneal_updates(frozen, 10, 3) == 7 and kl_anneal_updates(advancing, 10, 3) == 10
    assert annealed_kl_weight(advancing, kl_anneal_updates(advancing, 10, 3)) == pytest.approx(0.2 + 10 * 5e-5)
