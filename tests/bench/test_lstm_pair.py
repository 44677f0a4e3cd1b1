"""The fused LSTM pair the speed benchmark measures against (bench/lstm_pair.py)."""

from __future__ import annotations

import pytest
import torch

from zforcing_cli.bench.lstm_pair import FusedLSTMPair
from zforcing_cli.bench.workload import update
from zforcing_cli.data import Batch
from zforcing_cli.model import ZForcingConfig
from zforcing_cli.runconfig import TrainConfig
from zforcing_cli.update import make_optimizer, objective


@pytest.mark.parametrize("modality, input_size, aux_on_hidden", [
    ("binary", 2, False), ("tokens", 11, False), ("frames", 3, False), ("frames", 3, True),
])
def test_the_fused_lstm_pair_trains_every_parameter(modality, input_size, aux_on_hidden):
    config = ZForcingConfig(modality=modality, input_size=input_size, start_index=2 if modality == "binary" else 1,
                            embed_size=4, hidden_size=6, latent_size=3, mlp_size=5, aux_on_hidden=aux_on_hidden)
    torch.manual_seed(0)
    pair = FusedLSTMPair(config)
    batch_size, steps = 3, 7
    if modality == "frames":
        targets = torch.randn(batch_size, steps, input_size)
    else:
        targets = torch.randint(0, input_size, (batch_size, steps)).float()
    mask = torch.ones(batch_size, steps)
    mask[1, 5:] = 0.0  # a shorter sequence
    train = TrainConfig(aux_weight=0.5, bwd_weight=0.5)
    first = torch.randn(batch_size, input_size) if modality == "frames" else None
    loss = objective(pair(targets, mask, torch.randn(batch_size, steps, 3), first), 1.0, train)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in pair.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    before = [parameter.detach().clone() for parameter in pair.parameters()]
    step_loss = update(pair, make_optimizer(pair, train, fused=False), Batch(targets, mask, first), train, torch.Generator().manual_seed(0))
    assert torch.isfinite(step_loss)
    assert all(not torch.equal(old, new) for old, new in zip(before, pair.parameters()))
