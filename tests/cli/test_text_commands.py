"""Text end to end through the command line: train, evaluate (perplexities), sample, interpolate."""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_clean_error, invoke, plain


def test_train_records_the_text_settings_and_vocabulary(text_trained):
    config = json.loads((text_trained / "config.json").read_text())
    assert config["model"]["modality"] == "tokens" and config["model"]["embed_dropout"] == 0.2
    assert config["train"]["weight_decay"] == 1e-6 and config["train"]["adam_beta2"] == 0.99
    assert config["data"]["text"]["vocabulary"][:4] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_evaluate_table_and_json(text_trained):
    table = plain(invoke("evaluate", text_trained, "--iwae", 3).stdout)
    for row in ("perplexity ≤ (ELBO)", "perplexity ≤ (IWAE, K=3)", "KL, nats per sentence", "unigram"):
        assert row in table
    result = invoke("evaluate", text_trained, "--iwae", 3, "--json")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    assert report["unit"] == "nats per sentence" and report["status"] == "ok"
    assert report["perplexity_elbo"] > 1 and report["perplexity_iwae"] > 1 and report["unigram_perplexity"] > 1
    # the unigram baseline as a bound per sentence too, the same figure as its perplexity
    assert report["baseline"].startswith("unigram")
    assert report["unigram_perplexity"] == pytest.approx(math.exp(report["baseline_nll"] * report["sequences"] / report["steps"]))
    tokens = report["steps"]
    assert abs(report["perplexity_elbo"] - 2.718281828 ** (-report["elbo"] * report["sequences"] / tokens)) < 1e-6 * report["perplexity_elbo"]


def test_sample_to_stdout_and_to_a_file(text_trained, cwd):
    result = invoke("sample", text_trained, "--num", 3, "--top-p", 0.9, "--seed", 2)
    assert result.exit_code == 0, plain(result.output)
    lines = plain(result.stdout).splitlines()
    assert len(lines) == 3 and all(line.strip() for line in lines)
    result = invoke("sample", text_trained, "--num", 4, "--greedy", "--out", "s.txt")
    assert result.exit_code == 0, plain(result.output)
    assert len((cwd / "s.txt").read_text().splitlines()) == 4 and "Wrote 4 sentences" in plain(result.stdout)
    assert_clean_error(invoke("sample", text_trained, "--out", "s.txt"), 1, "exists")


def test_sample_prompt_and_unknown_words(text_trained):
    result = invoke("sample", text_trained, "--num", 2, "--prompt", "This movie qqqz", "--length", 4)
    assert result.exit_code == 0, plain(result.output)
    assert all(line.startswith("this movie <unk>") for line in plain(result.stdout).splitlines())
    assert "'qqqz'" in plain(result.stderr) and "Warning" in plain(result.stderr)


def test_sample_option_errors(text_trained, best_checkpoint):
    assert_clean_error(invoke("sample", text_trained, "--out", "s.wav"), 1, "s.wav")
    assert_clean_error(invoke("sample", text_trained, "--top-p", 0), 2, "--top-p")
    assert_clean_error(invoke("sample", text_trained, "--seconds", 2), 2, "--seconds")
    assert_clean_error(invoke("sample", best_checkpoint, "--greedy"), 2, "text models only")


@pytest.mark.parametrize(("options", "ignored"), [
    (("--top-k", 5, "--top-p", 0.5), "--top-k and --top-p would have no effect"),
    (("--temperature", 0.5), "--temperature would have no effect"),
])
def test_greedy_decoding_refuses_the_options_it_would_ignore(text_trained, cwd, options, ignored):
    result = invoke("sample", text_trained, "--greedy", *options, "--out", "s.txt", "--device", "cpu")
    assert_clean_error(result, 2, ignored)
    assert "Leave out --greedy" in plain(result.stderr)
    assert list(cwd.iterdir()) == []


def test_interpolate_table_and_json(text_trained):
    result = invoke("interpolate", text_trained, "the film was great .", "my wife felt the music was awful .")
    assert result.exit_code == 0, plain(result.output)
    table = plain(result.stdout)
    assert "greedy" in table and "sampled (top-10)" in table and "0.5" in table
    result = invoke("interpolate", text_trained, "the film was great .", "the plot is boring !", "--json")
    records = json.loads(result.stdout)
    assert [record["alpha"] for record in records] == pytest.approx([i / 10 for i in range(11)])
    assert all(set(record) == {"alpha", "greedy", "sampled"} for record in records)


def test_interpolate_errors(text_trained, best_checkpoint):
    assert_clean_error(invoke("interpolate", text_trained, "", "the film was great ."), 1, "first sentence")
    long = " ".join(["great"] * 16)
    assert_clean_error(invoke("interpolate", text_trained, "the film was great .", long), 1, "at most 15")
    assert_clean_error(invoke("interpolate", text_trained, "the film .", "the plot .", "--length", 100_000), 2, "--length")
    assert_clean_error(invoke("interpolate", best_checkpoint, "a b c d e", "f g h i j"), 1, "not a text model")
    result = invoke("interpolate", text_trained, "the qqqz was great .", "the film was great .", "--points", 2)
    assert result.exit_code == 0 and "'qqqz'" in plain(result.stderr)


def test_the_hint_for_an_over_long_sentence_stays_short(text_trained):
    words = [f"w{index}" for index in range(500)]
    result = invoke("interpolate", text_trained, "the film was great .", " ".join(words))
    assert_clean_error(result, 1, "500 tokens", "at most 15")
    hint = next(line for line in plain(result.stderr).splitlines() if line.startswith("Hint:"))
    assert "w0 w1" in hint and "w14" in hint and "w15" not in hint and len(hint) < 200


# -- bounded sampling: chunks, streaming, progress -------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Generation in chunks of 3 rows; returns the rows of every call to the model's generate."""
    import zforcing_cli.generate as generate_module
    import zforcing_cli.sentences as sentences_module
    from zforcing_cli.model import ZForcing

    for module in (generate_module, sentences_module):
        monkeypatch.setattr(module, "rows_per_chunk", lambda bytes_per_row: 3)
    rows, real = [], ZForcing.generate

    def recording(self, num, *args, **kwargs):
        rows.append(num)
        return real(self, num, *args, **kwargs)

    monkeypatch.setattr(ZForcing, "generate", recording)
    return rows


def test_sentences_are_generated_in_chunks_and_streamed_to_the_file(text_trained, cwd, small_chunks, monkeypatch):
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    result = invoke("sample", text_trained, "--num", 8, "--out", "s.txt", "--length", 6)
    assert result.exit_code == 0, plain(result.output)
    assert small_chunks == [3, 3, 2]
    assert len((cwd / "s.txt").read_text().splitlines()) == 8 and sorted(p.name for p in cwd.iterdir()) == ["s.txt"]
    assert "Sampling 8 sentences: 100%, 8 of 8 sentences" in plain(result.stderr)


def test_an_interrupted_text_sample_leaves_no_file(text_trained, cwd, small_chunks, monkeypatch):
    import zforcing_cli.sentences as sentences_module

    real = sentences_module.TextVocabulary.text
    written = []

    def interrupt_in_the_second_chunk(self, ids):
        written.append(ids)
        if len(written) > 4:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(sentences_module.TextVocabulary, "text", interrupt_in_the_second_chunk)
    result = invoke("sample", text_trained, "--num", 8, "--out", "s.txt", "--length", 6)
    assert result.exit_code == 130 and "Interrupted" in plain(result.stderr)
    assert list(cwd.iterdir()) == []


def test_a_text_sample_to_stdout_comes_chunk_by_chunk(text_trained, small_chunks):
    result = invoke("sample", text_trained, "--num", 7, "--length", 6)
    assert result.exit_code == 0, plain(result.output)
    assert small_chunks == [3, 3, 1] and len(plain(result.stdout).splitlines()) == 7


def test_a_sample_of_days_is_announced(text_trained, monkeypatch):
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "LONG_JOB_SECONDS", 0.0)
    result = invoke("sample", text_trained, "--num", 3000, "--length", 3)
    assert result.exit_code == 0, plain(result.output)
    warning = next(line for line in plain(result.stderr).splitlines() if line.startswith("Warning:"))
    assert "Sampling 3,000 sentences will take about" in warning and "--num" in warning


def test_a_prompt_longer_than_a_file_name_is_words(text_trained):
    result = invoke("sample", text_trained, "--num", 1, "--length", 2, "--prompt", " ".join(["the film was great ."] * 20))
    assert result.exit_code == 0, plain(result.output)


def test_an_audio_file_is_not_a_text_prompt(text_trained, cwd):
    (cwd / "x.wav").write_bytes(b"RIFF")
    for prompt in ("x.wav", "missing.flac"):
        line = assert_clean_error(invoke("sample", text_trained, "--prompt", prompt), 2, f"--prompt {prompt}", "text model")
        assert "names a file" in line


def test_evaluate_refuses_another_vocabulary(text_trained, cwd):
    from conftest import write_reviews_jsonl

    write_reviews_jsonl(cwd / "other.jsonl", count=30, seed=5)
    assert invoke("prepare", "text", "other.jsonl", "--out", "other", "--vocab-size", "12").exit_code == 0
    assert_clean_error(invoke("evaluate", text_trained, "--data", "other"), 1, "another vocabulary")


def test_training_gives_the_perplexity_evaluate_gives_on_the_valid_split(text_trained):
    """Text's bounds as the paper's Table 2 states them, in training's validation records and in
    evaluate alike: the same perplexity for the same sentences and seed."""
    records = [json.loads(line) for line in (text_trained / "metrics.jsonl").read_text().splitlines()]
    best = max((record for record in records if record.get("type") == "valid"), key=lambda record: record["elbo"])
    result = invoke("evaluate", text_trained, "--split", "valid", "--json", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert json.loads(result.stdout)["perplexity_elbo"] == pytest.approx(best["perplexity"], rel=1e-6)
