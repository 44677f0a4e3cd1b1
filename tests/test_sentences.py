"""Text models: decoding rules, perplexity against a direct computation, IWAE ≥ ELBO, and the
interpolation of Table 3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zforcing_cli.data import open_dataset
from zforcing_cli.data.text import END, PAD, START
from zforcing_cli.generate import generator_for
from zforcing_cli.evaluate import evaluate_split, perplexity, unigram_perplexity
from zforcing_cli.model import ZForcing, ZForcingConfig
from zforcing_cli.sentences import (
    Decoding,
    TextInputError,
    TextVocabulary,
    interpolate,
    mixed_latents,
    sample_sentences,
)
from zforcing_cli.runconfig import text_description


def text_model(dataset, seed: int = 0) -> ZForcing:
    torch.manual_seed(seed)
    config = ZForcingConfig(modality="tokens", input_size=dataset.meta.input_size, start_index=START, embed_size=8,
                            hidden_size=16, latent_size=4, mlp_size=16)
    return ZForcing(config).train(False)


@pytest.fixture(scope="module")
def dataset(text_data):
    return open_dataset(text_data)


@pytest.fixture
def vocabulary(dataset) -> TextVocabulary:
    return TextVocabulary.of({"modality": "tokens", "kind": "imdb", "text": text_description(dataset.meta.text)})


# -- decoding ----------------------------------------------------------------------------------------


def test_top_k_and_top_p_cuts():
    logits = torch.log(torch.tensor([[0.05, 0.1, 0.4, 0.3, 0.15]]))
    kept = lambda cut: torch.isfinite(cut).squeeze(0).nonzero().flatten().tolist()  # noqa: E731
    assert kept(Decoding(top_k=2).cut(logits)) == [2, 3]
    assert kept(Decoding(top_p=0.5).cut(logits)) == [2, 3]  # 0.4 alone holds less than 0.5
    assert kept(Decoding(top_p=0.4).cut(logits)) == [2]
    assert kept(Decoding(top_p=0.86).cut(logits)) == [1, 2, 3, 4]
    assert kept(Decoding().cut(logits)) == [0, 1, 2, 3, 4]


def test_chooser_bans_specials_and_early_end():
    logits = torch.zeros(3, 1, 6)
    logits[:, 0, PAD] = logits[:, 0, START] = 50.0
    logits[:, 0, END] = 40.0
    choose = Decoding(greedy=True, min_tokens=2).chooser(None)
    assert (choose(logits, 0) != END).all() and (choose(logits, 1) != END).all()
    assert (choose(logits, 2) == END).all()  # two tokens are out: </s> may end the sentence
    assert (Decoding(greedy=True, min_tokens=2).chooser(None, offset=2)(logits, 0) == END).all()  # a prompt counts
    sampled = Decoding(temperature=0.5, min_tokens=3).chooser(torch.Generator().manual_seed(0))
    assert not torch.isin(sampled(logits, 0), torch.tensor([PAD, START, END])).any()


@pytest.mark.parametrize("top_k, top_p", [(-1, 1.0), (0, 0.0), (0, 1.5)])
def test_bad_decoding_options(top_k, top_p):
    from zforcing_cli.errors import UsageError

    with pytest.raises(UsageError):
        Decoding(top_k=top_k, top_p=top_p).check()


def test_samples_and_prompt(dataset, vocabulary):
    model = text_model(dataset)
    sentences = sample_sentences(model, vocabulary, 4, Decoding(top_k=5), length=12, seed=3)
    assert len(sentences) == 4 and all(0 < len(s.split()) <= 12 for s in sentences)
    assert sentences == sample_sentences(model, vocabulary, 4, Decoding(top_k=5), length=12, seed=3)
    continued = sample_sentences(model, vocabulary, 2, Decoding(greedy=True), length=6, prompt="This movie zzzq", seed=0)
    assert all(s.startswith("this movie <unk>") for s in continued)
    assert vocabulary.unknown == ["zzzq"]


# -- perplexity --------------------------------------------------------------------------------------


def test_perplexity_matches_per_token_probabilities(dataset):
    """With z cut off from the LSTM and prior = posterior = N(0, 1), KL = 0 and every bound is
    Σ_t log p(y_t | h_t): compute those probabilities step by step and compare."""
    model = text_model(dataset, seed=1)
    with torch.no_grad():
        for layer in (model.forward_cell.latent_embed, model.prior.out, model.posterior.out):
            layer.weight.zero_()
            layer.bias.zero_()
    split = dataset.split("test")
    result = evaluate_split(model, split, batch_size=3, iwae_samples=4)
    total, tokens = 0.0, 0
    cell = model.forward_cell
    with torch.no_grad():
        for index in range(len(split)):
            targets = split.sentence(index).tolist() + [END]
            h = c = torch.zeros(1, model.config.hidden_size)
            for previous, target in zip([START] + targets[:-1], targets):
                gates = cell.input_gates(model.embed(torch.tensor([[previous]])))[:, 0] + h @ cell.hidden_to_gates.weight.t()
                h, c = cell.update(gates, c)
                total += torch.log_softmax(model.output_head(h), -1)[0, target].item()
                tokens += 1
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.steps == tokens
    expected = math.exp(-total / tokens)
    assert perplexity(result.elbo, result.sequences, result.steps) == pytest.approx(expected, rel=1e-4)
    assert perplexity(result.iwae, result.sequences, result.steps) == pytest.approx(expected, rel=1e-4)


def test_iwae_is_at_least_the_elbo_on_average(dataset):
    result = evaluate_split(text_model(dataset, seed=2), dataset.split("test"), iwae_samples=20)
    assert result.iwae >= result.elbo
    assert perplexity(result.iwae, result.sequences, result.steps) <= perplexity(result.elbo, result.sequences, result.steps)


def test_unigram_perplexity_by_hand(dataset):
    train, test = dataset.split("train"), dataset.split("test")
    words = dataset.meta.input_size
    counts = np.bincount(np.asarray(train.arrays["tokens"]), minlength=words).astype(float)
    counts[END] += len(train)
    probability = (counts + 1) / (counts.sum() + words - 2)
    log_sum = sum(np.log(probability[list(test.sentence(i)) + [END]]).sum() for i in range(2))
    length = sum(len(test.sentence(i)) + 1 for i in range(2))
    assert unigram_perplexity(train, test, limit=2) == pytest.approx(math.exp(-log_sum / length))


# -- interpolation -------------------------------------------------------------------------------------


def test_mixed_latents():
    a, b = torch.ones(3, 2), torch.full((5, 2), 2.0)
    given, weights = mixed_latents([a, b], torch.tensor([0.0, 0.25, 1.0]))
    assert given.shape == (3, 5, 2) and weights.shape == (3, 5)
    assert torch.equal(given[0, :3], a) and torch.equal(weights[0], torch.tensor([1.0, 1, 1, 0, 0]))
    assert torch.allclose(given[1, :3], 0.75 * a + 0.25 * b[:3]) and torch.allclose(given[1, 3:], 0.25 * b[3:])
    assert torch.allclose(weights[1], torch.tensor([1.0, 1, 1, 0.25, 0.25]))
    assert torch.equal(given[2], b) and torch.equal(weights[2], torch.ones(5))


def test_interpolation_endpoints_decode_each_sentences_posterior(dataset, vocabulary):
    """α = 0 and α = 1 decode A's and B's own posterior latents; within a sentence's length no
    prior draw enters, so the greedy rows equal a direct greedy decoding from those latents."""
    model = text_model(dataset, seed=4)
    sentence_a, sentence_b = "the film was great .", "my wife felt the music was too long ."
    steps = len(vocabulary.ids(sentence_a)) + 1
    rows = interpolate(model, vocabulary, sentence_a, sentence_b, points=5, length=steps, seed=0)
    assert [row.alpha for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row, sentence in ((rows[0], sentence_a), (rows[-1], sentence_b)):
        ids = vocabulary.ids(sentence) + [END]
        z = model.posterior_means(torch.tensor([ids]))
        generator = generator_for(model, 0)
        decoding = Decoding(greedy=True, min_tokens=vocabulary.min_tokens)
        tokens = model.generate(1, steps, generator=generator, stop=lambda y: y == END, choose=decoding.chooser(generator),
                                latents=(z, torch.ones(1, len(ids))))
        assert row.greedy == vocabulary.text(tokens[0].tolist())


def test_interpolation_decodes_a_chunk_of_mixes_at_a_time(dataset, vocabulary, monkeypatch):
    import zforcing_cli.sentences as sentences_module

    model = text_model(dataset)
    monkeypatch.setattr(sentences_module, "rows_per_chunk", lambda bytes_per_row: 4)
    rows, reports, real = [], [], model.generate
    monkeypatch.setattr(model, "generate", lambda num, *args, **kwargs: rows.append(num) or real(num, *args, **kwargs))
    points = interpolate(model, vocabulary, "the film was great .", "the plot is boring !", points=11,
                         progress=lambda done, total: reports.append((done, total)))
    assert rows == [4, 4, 3, 4, 4, 3] and len(points) == 11 and all(point.greedy for point in points)
    assert reports == [(4, 22), (8, 22), (11, 22), (15, 22), (19, 22), (22, 22)]


def test_interpolation_input_errors(dataset, vocabulary):
    model = text_model(dataset)
    with pytest.raises(TextInputError, match="first sentence"):
        interpolate(model, vocabulary, "  ", "the film was great .")
    with pytest.raises(TextInputError, match="at most 15"):
        interpolate(model, vocabulary, "the film was great .", " ".join(["good"] * 16))
    with pytest.raises(TextInputError, match="model of audio"):
        TextVocabulary.of({"modality": "frames", "kind": "timit"})


def test_text_resume_with_dropout_and_weight_decay_is_bit_identical(dataset, tmp_path):
    """Dropout draws from torch's global generator, which a checkpoint saves and restores."""
    from safetensors.torch import load_file

    from zforcing_cli.presets import preset_configs
    from zforcing_cli.runconfig import RunConfig, data_description
    from zforcing_cli.train import train

    def config(**extra) -> RunConfig:
        model, training = preset_configs("small", dataset.meta)
        model.embed_size, model.hidden_size, model.latent_size, model.mlp_size = 8, 16, 4, 16
        assert model.embed_dropout == 0.2 and training.weight_decay == 1e-6
        training.batch_size, training.valid_limit, training.max_steps = 8, 4, 6
        for name, value in extra.items():
            setattr(training, name, value)
        return RunConfig(model, training, data_description(dataset))

    cpu = torch.device("cpu")
    train(tmp_path / "a", config(), dataset, cpu)
    train(tmp_path / "b", config(max_steps=3), dataset, cpu)
    train(tmp_path / "b", config(), dataset, cpu, resume=True)
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000006" / "model.safetensors") for run in "ab")
    for name in a:
        assert torch.equal(a[name], b[name]), name
