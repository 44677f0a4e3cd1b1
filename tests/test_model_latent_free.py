"""The model without latent (`--no-latent`, LatentFreeModel): the same embedding, forward LSTM and
output head as Z-Forcing's and nothing else, its NLL a plain LSTM's, its bound exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from zforcing_cli.evaluate import evaluate_split
from zforcing_cli.model import LatentFreeModel, ZForcing, build_model
from zforcing_cli.modelconfig import ZForcingConfig

CONFIGS = {
    "binary": dict(modality="binary", input_size=2, start_index=2),
    "tokens": dict(modality="tokens", input_size=9, start_index=7),
    "frames": dict(modality="frames", input_size=3, start_index=0),
}


def latent_free(modality: str, **changes) -> LatentFreeModel:
    torch.manual_seed(0)
    config = ZForcingConfig(**CONFIGS[modality], embed_size=4, hidden_size=6, latent_size=3, mlp_size=5, latent=False, **changes)
    return build_model(config)


def targets(modality: str, batch: int = 3, steps: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if modality == "frames":
        return torch.randn(batch, steps, 3, generator=generator)
    return torch.randint(0, 2 if modality == "binary" else 7, (batch, steps), generator=generator)


def plain_lstm_nll(model: LatentFreeModel, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-Σ_t log p(y_t | h_t) per sequence by hand: nn.LSTM with the forward cell's weights, fed the
    embedded inputs u_t = y_{t-1}, its states through the output head."""
    cell = model.forward_cell
    lstm = nn.LSTM(model.config.embed_size, model.config.hidden_size, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(cell.input_to_gates.weight)
        lstm.weight_hh_l0.copy_(cell.hidden_to_gates.weight)
        lstm.bias_ih_l0.copy_(cell.input_to_gates.bias)
        lstm.bias_hh_l0.copy_(cell.hidden_to_gates.bias if cell.hidden_to_gates.bias is not None else 0.0)
    start = model.start_input(y.shape[0], y.device).to(y.dtype)
    inputs = torch.cat([start, y[:, :-1]], dim=1)
    embedded = model.embedding(inputs if model.config.modality == "frames" else inputs.long())
    states, _ = lstm(embedded)
    return (model.distribution.nll(model.output_head(states), y) * mask).sum(1)


@pytest.mark.parametrize("modality", CONFIGS)
@pytest.mark.parametrize("biases", ["one", "two"])
def test_the_nll_is_a_plain_lstms_with_the_same_weights_and_the_bound_exact(modality, biases):
    model = latent_free(modality, lstm_biases=biases).eval()
    y = targets(modality)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0  # a shorter sequence: its padding counts for nothing
    with torch.no_grad():
        out = model(y, mask)
        expected = plain_lstm_nll(model, y, mask)
    torch.testing.assert_close(out.nll, expected)
    assert torch.equal(out.kl, torch.zeros(3)) and torch.equal(out.aux, torch.zeros(3)) and torch.equal(out.bwd, torch.zeros(3))
    assert torch.equal(out.elbo, -out.nll) and torch.equal(out.log_importance_weight, -out.nll)


def test_it_has_the_z_models_embedding_forward_lstm_and_output_head_and_nothing_else():
    model = latent_free("tokens")
    with_z = ZForcing(ZForcingConfig(**CONFIGS["tokens"], embed_size=4, hidden_size=6, latent_size=3, mlp_size=5))
    names = dict(model.named_parameters())
    assert {name.split(".")[0] for name in names} == {"embedding", "forward_cell", "output_head"}
    assert names["forward_cell.input_to_gates.weight"].shape == (24, 4)  # emb(u_t) alone, no g(z_t)
    for name in ("embedding.weight", "forward_cell.hidden_to_gates.weight", "output_head.hidden.weight", "output_head.out.weight"):
        assert names[name].shape == dict(with_z.named_parameters())[name].shape


def test_generation_runs_the_same_lstm_as_the_nll():
    """Each generated token's distribution is the one the NLL scores that token with."""
    model = latent_free("tokens").eval()
    chosen, params = [], []

    def choose(step_params, t):  # greedy, keeping what p(y_t | h_t) was
        params.append(step_params)
        chosen.append(step_params.argmax(-1))
        return chosen[-1]

    with torch.no_grad():
        y = model.generate(2, 6, choose=choose)
        nll = model.step_terms(y).nll
    expected = torch.stack([model.distribution.nll(p, c).squeeze(1) for p, c in zip(params, chosen)], dim=1)
    torch.testing.assert_close(nll, expected)


def test_a_continuation_starts_from_the_state_after_the_prompt():
    model = latent_free("frames").eval()
    y = targets("frames", batch=2, steps=5)
    with torch.no_grad():
        h, c = model.encode(y)
        states, last_c = model.lstm_states(model.embed(model.shift_right(y)))
    assert torch.equal(h, states[:, -1]) and torch.equal(c, last_c)
    assert model.posterior_means(y).shape == (2, 5, 0)  # no latent to read


def test_a_config_without_the_latent_key_is_a_z_model():
    values = ZForcingConfig(**CONFIGS["binary"]).to_dict()
    del values["latent"]  # a config.json written before the key existed
    config = ZForcingConfig.from_dict(values)
    assert config.latent is True and type(build_model(config)) is ZForcing


def test_cond_ln_without_latent_is_refused():
    with pytest.raises(ValueError, match="cond_ln"):
        ZForcingConfig(**CONFIGS["binary"], latent=False, cond_ln=True)


def test_evaluation_gives_the_exact_nll(tiny_dataset):
    model = latent_free("binary").eval()
    split = tiny_dataset.split("test")
    result = evaluate_split(model, split, batch_size=8, iwae_samples=0)
    batch = split.batch(np.arange(len(split)))  # (8, 784) pixels, every image whole
    with torch.no_grad():
        expected = plain_lstm_nll(model, batch.targets, batch.mask).double().mean().item()
    assert result.kl == 0.0 and result.elbo == pytest.approx(-expected, rel=1e-5)
