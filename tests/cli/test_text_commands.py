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
    assert_clean_error(invoke("interpolate", best_checkpoint, "a b c d e", "f g h i j"), 1, "not a text model")
    result = invoke("interpolate", text_trained, "the qqqz was great .", "the film was great .", "--points", 2)
    assert result.exit_code == 0 and "'qqqz'" in plain(result.stderr)


def test_evaluate_refuses_another_vocabulary(text_trained, cwd):
    from conftest import write_reviews_jsonl

    write_reviews_jsonl(cwd / "other.jsonl", count=30, seed=5)
    assert invoke("prepare", "text", "other.jsonl", "--out", "other", "--vocab-size", "12").exit_code == 0
    assert_clean_error(invoke("evaluate", text_trained, "--data", "other"), 1, "another vocabulary")
