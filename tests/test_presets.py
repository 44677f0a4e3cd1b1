"""The presets (presets.py): `paper` is the authors' model and training rules for every data kind,
at the paper's sizes, except where the paper disagrees; `small` keeps our defaults."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from zforcing_cli.model import ZForcing, ZForcingConfig, count_parameters
from zforcing_cli.presets import preset_configs
from zforcing_cli.runconfig import TrainConfig

KINDS = {"mnist": ("binary", 2), "timit": ("frames", 200), "blizzard": ("frames", 200), "imdb": ("tokens", 16004)}


def meta(kind: str) -> SimpleNamespace:
    modality, input_size = KINDS[kind]
    return SimpleNamespace(kind=kind, modality=modality, input_size=input_size)


def parameters(config: ZForcingConfig) -> int:
    with torch.device("meta"):  # shapes only: Blizzard's 75 M parameters cost nothing
        return count_parameters(ZForcing(config))


def authors_speech_parameters(inp: int, emb: int, rnn: int, z: int, mlp: int) -> int:
    """The parameters of the authors' speech model (their model.py, layer by layer), out = 2·inp."""
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    out = 2 * inp
    return (linear(inp, emb)  # emb_mod
            + 4 * rnn * (emb + rnn) + 8 * rnn  # bwd_mod: nn.LSTM, two biases
            + 4 * rnn * (emb + mlp) + 4 * rnn * rnn + 8 * rnn  # fwd_mod: weight_ih, weight_hh, bias_ih, bias_hh
            + linear(rnn, mlp) + linear(mlp, 2 * z)  # pri_mod
            + linear(2 * rnn, mlp) + linear(mlp, 2 * z)  # inf_mod
            + linear(z, mlp)  # gen_mod
            + linear(z + rnn, mlp) + linear(mlp, 2 * rnn)  # aux_mod on (h, z)
            + 2 * linear(rnn, out))  # fwd_out_mod, bwd_out_mod


@pytest.mark.parametrize(("kind", "sizes", "millions"), [("timit", (512, 1024, 256, 512), 19.6),
                                                         ("blizzard", (1024, 2048, 256, 1024), 74.8)])
def test_paper_speech_presets_count_the_authors_parameters(kind, sizes, millions):
    """REFERENCE.md: 19.6 M parameters for TIMIT and 74.8 M for Blizzard in the authors' code
    (LSTMs of 1024 / 2048, z 256, MLPs of 512 / 1024). Ours has exactly their layers with the aux
    head on (h_{t-1}, z_t) as theirs; on z_t alone (Eq. 8, the preset) one H × M block fewer."""
    model, _ = preset_configs("paper", meta(kind))
    emb, rnn, z, mlp = sizes
    assert (model.embed_size, model.hidden_size, model.latent_size, model.mlp_size) == sizes
    theirs = authors_speech_parameters(200, emb, rnn, z, mlp)
    assert round(theirs / 1e6, 1) == millions
    assert parameters(replace(model, aux_on_hidden=True)) == theirs
    assert parameters(model) == theirs - rnn * mlp


def test_paper_mnist_preset_has_lstms_of_1024():
    model, _ = preset_configs("paper", meta("mnist"))
    with torch.device("meta"):
        built = ZForcing(model)
    assert built.backward_rnn.hidden_size == 1024 and built.forward_cell.hidden_to_gates.weight.shape == (4096, 1024)
    assert isinstance(built.output_head, torch.nn.Linear) and built.output_head.weight.shape == (1, 1024)


@pytest.mark.parametrize("kind", KINDS)
def test_paper_presets_take_the_authors_forms_but_where_the_paper_disagrees(kind):
    model, train = preset_configs("paper", meta(kind))
    assert (model.output_head, model.init, model.lstm_biases) == ("linear", "authors", "two")
    assert (train.skip_rule, train.kl_anneal_on_skip) == ("loss", "advance")
    assert not model.aux_on_hidden and not model.cond_ln and model.backward_layers == 1  # Eq. 8; their scripts' defaults
    speech = kind in ("timit", "blizzard")
    assert model.backward_first == ("data" if speech else "skip")  # u_1 is data for speech only
    assert train.kl_anneal == speech  # the paper: annealing hurt on MNIST, and IMDB used none
    assert train.skip_kl_above == (10_000 if kind == "blizzard" else None)


@pytest.mark.parametrize("kind", KINDS)
def test_small_presets_keep_the_defaults_of_earlier_runs(kind):
    model, train = preset_configs("small", meta(kind))
    defaults_model, defaults_train = ZForcingConfig(), TrainConfig()
    for name in ("output_head", "backward_first", "init", "lstm_biases", "cond_ln", "backward_layers", "aux_cost"):
        assert getattr(model, name) == getattr(defaults_model, name)
    for name in ("skip_rule", "kl_anneal_on_skip", "skip_kl_above", "kl_anneal"):
        assert getattr(train, name) == getattr(defaults_train, name)
