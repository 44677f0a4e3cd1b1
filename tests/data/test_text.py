"""Text corpora: tokenizer cases, sources, the length filter, the vocabulary, the split, errors."""

from __future__ import annotations

import codecs
import json
import socket
import time

import numpy as np
import pytest

from conftest import assert_clean_error, invoke, plain, write_reviews_jsonl
from zforcing_cli.data import open_dataset, prepare
from zforcing_cli.data import corpus
from zforcing_cli.data.text import END, PAD, SPECIALS, UNKNOWN, clean_paragraphs, decode, encode, tokenize_sentence
from zforcing_cli.errors import DataError, UsageError


# -- tokenizer cases -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, tokens",
    [
        ("I don't think it's bad.", ["i", "do", "n't", "think", "it", "'s", "bad", "."]),
        ("We'll see; they're gonna win...", ["we", "'ll", "see", ";", "they", "'re", "gon", "na", "win", "..."]),
        ("It\u2019s \u201cgreat\u201d, isn\u2019t it?", ["it", "'s", "``", "great", "''", ",", "is", "n't", "it", "?"]),
        ("It cost $5.50, not 1,000 dollars!", ["it", "cost", "$", "5.50", ",", "not", "1,000", "dollars", "!"]),
        ("Tom &amp; Jerry (1940)", ["tom", "&", "jerry", "(", "1940", ")"]),
        ("Cafe\u0301 cre\u0300me", ["caf\u00e9", "cr\u00e8me"]),  # combining accents composed (NFC)
        ("Fin.<br />Next", ["fin.", "next"]),
    ],
)
def test_treebank_tokens(sentence, tokens):
    assert tokenize_sentence(sentence) == tokens


def test_case_can_be_kept():
    assert tokenize_sentence("The Movie", lowercase=False) == ["The", "Movie"]


def test_html_line_breaks_split_paragraphs():
    assert clean_paragraphs("One.<br /><br />Two<BR>three <br/> four") == ["One.", "Two", "three", "four"]


def test_encode_and_decode():
    vocabulary = list(SPECIALS) + ["the", "film"]
    ids, unknown = encode(["the", "plot", "film"], vocabulary)
    assert ids == [4, UNKNOWN, 5] and unknown == ["plot"]
    assert decode([1, 4, 3, 5, END, 4, PAD], vocabulary) == "the <unk> film"


# -- the prepared dataset ---------------------------------------------------------------------------


def test_imdb_protocol_from_json_lines(text_data):
    dataset = open_dataset(text_data)
    meta, text = dataset.meta, dataset.meta.text
    assert (meta.kind, meta.modality, meta.sequence_length) == ("imdb", "tokens", 16)
    assert text["vocabulary"][:4] == list(SPECIALS) and meta.input_size == len(text["vocabulary"])
    assert sum(meta.counts.values()) == text["sentences_kept"] <= text["sentences_read"]
    assert text["documents"] == 60
    shares = np.array([meta.counts[split] for split in ("train", "valid", "test")]) / text["sentences_kept"]
    assert np.allclose(shares, [0.85, 0.05, 0.10], atol=0.02)
    for split in ("train", "valid", "test"):
        part = dataset.split(split)
        lengths = np.diff(part.arrays["offsets"])
        assert len(part) == meta.counts[split] and lengths.min() >= 5 and lengths.max() <= 15
        assert part.arrays["tokens"].dtype == np.uint16


def test_token_batch_ends_with_end_token_and_pads(text_data):
    split = open_dataset(text_data).split("train")
    batch = split.batch(np.array([0, 1, 2, 3]))
    for row in range(4):
        words = split.sentence(row)
        steps = len(words) + 1
        assert batch.targets[row, : len(words)].tolist() == words.tolist()
        assert batch.targets[row, len(words)] == END and batch.mask[row, :steps].sum() == steps
        assert batch.mask[row, steps:].sum() == 0 and (batch.targets[row, steps:] == PAD).all()
    assert batch.first_input is None


def test_split_is_reproducible_and_seeded(tmp_path):
    write_reviews_jsonl(tmp_path / "r.jsonl", count=30)
    first = prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "a")
    again = prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "b")
    other = prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "c", seed=7)
    assert first.meta.fingerprint == again.meta.fingerprint
    assert other.meta.fingerprint != first.meta.fingerprint
    assert other.meta.counts == first.meta.counts


def test_length_filter_keeps_5_to_15_tokens(tmp_path):
    lengths = [4, 5, 9, 15, 16, 5, 30]
    lines = [" ".join(f"w{i}" for i in range(n - 1)) + " ." for n in lengths]  # n tokens with the period
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    dataset = prepare("text", str(tmp_path / "corpus.txt"), tmp_path / "out", split="34,33,33")
    kept = sorted(int(n) for split in dataset.splits.values() for n in np.diff(split.arrays["offsets"]))
    assert kept == [5, 5, 9, 15]
    assert dataset.meta.text["sentences_read"] == len(lengths)


def test_length_limits_are_options(tmp_path):
    lines = [" ".join(["w"] * (n - 1)) + " ." for n in (2, 3, 4, 20)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines))
    dataset = prepare("text", str(tmp_path / "corpus.txt"), tmp_path / "out", min_tokens=2, max_tokens=4, split="34,33,33")
    assert sorted(int(n) for s in dataset.splits.values() for n in np.diff(s.arrays["offsets"])) == [2, 3, 4]
    assert dataset.meta.sequence_length == 5


def test_vocabulary_is_the_most_frequent_train_words(tmp_path):
    """With every word kept, the train split's counts are exact; a 6-word vocabulary (the same
    split: it depends only on the sentences and the seed) must be their top 6, ties by spelling."""
    write_reviews_jsonl(tmp_path / "r.jsonl", count=40)
    full = prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "full", vocab_size=10_000)
    small = prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "small", vocab_size=6)
    words = full.meta.text["vocabulary"]
    counts = np.bincount(np.asarray(full.split("train").arrays["tokens"]), minlength=len(words))
    expected = sorted(range(len(SPECIALS), len(words)), key=lambda i: (-counts[i], words[i]))[:6]
    assert small.meta.text["vocabulary"] == list(SPECIALS) + [words[i] for i in expected]
    assert small.meta.counts == full.meta.counts
    stored = np.asarray(small.split("train").arrays["tokens"])
    unknown_words = sum(counts[i] for i in range(len(SPECIALS), len(words)) if i not in expected)
    assert (stored == UNKNOWN).sum() == unknown_words
    assert small.meta.text["coverage"] == pytest.approx(1 - unknown_words / len(stored))
    sentences = len(small.split("train"))  # each also has its </s> among the targets
    assert small.meta.text["unknown_share"]["train"] == pytest.approx(unknown_words / (len(stored) + sentences))


# -- sources ---------------------------------------------------------------------------------------


def write_acl_imdb(root, reviews):
    for index, review in enumerate(reviews):
        folder = root / ("train" if index % 2 else "test") / ("pos" if index % 3 else "neg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}_7.txt").write_text(review)


def test_acl_imdb_folder_one_review_per_file(tmp_path):
    reviews = write_reviews_jsonl(tmp_path / "r.jsonl", count=20)
    write_acl_imdb(tmp_path / "aclImdb", reviews)
    (tmp_path / "aclImdb" / "README").write_text("not a review")
    dataset = prepare("imdb", str(tmp_path / "aclImdb"), tmp_path / "out")
    assert dataset.meta.text["documents"] == 20
    assert "aclImdb folder" in dataset.meta.text["read_from"]


def test_folder_of_text_files_is_read_by_paragraph(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("The first book starts here today.\nIt goes on and on.\n\nA new paragraph starts now.\n")
    (tmp_path / "books" / "b.txt").write_text("Another book is in this folder.\n\nIt has two paragraphs too.\n")
    dataset = prepare("text", str(tmp_path / "books"), tmp_path / "out", split="34,33,33")
    assert dataset.meta.text["documents"] == 4 and dataset.meta.text["sentences_kept"] == 5


def test_csv_text_column_is_found_by_name(tmp_path):
    reviews = write_reviews_jsonl(tmp_path / "r.jsonl", count=20)
    import csv

    with open(tmp_path / "r.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "review"])
        writer.writerows([index, "a title", review] for index, review in enumerate(reviews))
    dataset = prepare("imdb", str(tmp_path / "r.csv"), tmp_path / "out")
    assert dataset.meta.text["documents"] == 20


def test_parquet_with_the_text_column_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    reviews = write_reviews_jsonl(tmp_path / "r.jsonl", count=20)
    pq.write_table(pa.table({"summary": ["short"] * 20, "body_of_review": reviews}), tmp_path / "r.parquet")
    with pytest.raises(DataError, match="Cannot tell which column") as caught:
        prepare("imdb", str(tmp_path / "r.parquet"), tmp_path / "out")
    assert "summary (str), body_of_review (str)" in caught.value.hint
    dataset = prepare("imdb", str(tmp_path / "r.parquet"), tmp_path / "out", text_column="body_of_review")
    assert dataset.meta.text["documents"] == 20


def test_unknown_text_column_lists_the_columns(tmp_path):
    write_reviews_jsonl(tmp_path / "r.jsonl", count=5)
    with pytest.raises(DataError, match="no column 'body'") as caught:
        prepare("imdb", str(tmp_path / "r.jsonl"), tmp_path / "out", text_column="body")
    assert "rating (int), text (str)" in caught.value.hint
    assert not (tmp_path / "out").exists()


def test_hub_source_offline_fails_fast(tmp_path, monkeypatch):
    def hanging_lookup(*args, **kwargs):
        time.sleep(10)  # a name lookup that never answers
        raise OSError("timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    started = time.perf_counter()
    with pytest.raises(DataError, match="looks offline"):
        prepare("imdb", "hf:stanfordnlp/imdb", tmp_path / "out")
    assert time.perf_counter() - started < 2.0
    assert not (tmp_path / "out").exists()


# -- errors ----------------------------------------------------------------------------------------


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare("imdb", str(tmp_path / "nothing.jsonl"), tmp_path / "out")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        prepare("text", str(tmp_path / "empty.txt"), tmp_path / "out")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="No text files"):
        prepare("text", str(tmp_path / "folder"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_few_sentences(tmp_path):
    (tmp_path / "short.txt").write_text("One two three four five six.\n")
    with pytest.raises(DataError, match="1 sentence"):
        prepare("text", str(tmp_path / "short.txt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_json_lines(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl") as caught:
        prepare("imdb", str(tmp_path / "bad.jsonl"), tmp_path / "out")
    assert caught.value.message == f"Cannot read {tmp_path / 'bad.jsonl'}, line 2: not valid JSON (Expecting value at column 10)."
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("empty.jsonl", "", "empty.jsonl holds no records."),
    ("blank.jsonl", "\n\n", "blank.jsonl holds no records."),
    ("late.jsonl", '{"text": "a fine film indeed ."}\n' * 3000 + '{"text": "cut', "late.jsonl, line 3,001: not valid JSON"),
    ("list.jsonl", '{"text": "a"}\n["text"]\n', "list.jsonl, line 2: a JSON list where an object"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "latin1.jsonl, line 1: byte 0xE9 is not UTF-8 text"),
    ("lines.json", '{"text": "fine"}\n{"text": \n', "lines.json, line 2: not valid JSON"),
    ("array.json", '[{"text": "fine"},\n {"text": ', "array.json, line 2: "),
])
def test_json_errors_name_the_file_and_the_line(cwd, name, content, expected):
    """One Error line, naming the file and the line, and nothing from the `datasets` logger."""
    (cwd / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    result = invoke("prepare", "imdb", name, "--out", "out")
    assert_clean_error(result, 1, expected)
    assert len(plain(result.stderr).splitlines()) == 2, plain(result.stderr)
    assert not (cwd / "out").exists()


@pytest.mark.parametrize(
    "options, fragment",
    [({"min_tokens": 0}, "--min-tokens"), ({"min_tokens": 9, "max_tokens": 3}, "--max-tokens 3"),
     ({"vocab_size": 0}, "--vocab-size"), ({"case": "upper"}, "--case"), ({"split": "80,20"}, "--split")],
)
def test_bad_text_options(tmp_path, options, fragment):
    write_reviews_jsonl(tmp_path / "r.jsonl", count=5)
    with pytest.raises(UsageError, match=fragment):
        prepare("text", str(tmp_path / "r.jsonl"), tmp_path / "out", **options)


def test_imdb_protocol_is_fixed(tmp_path):
    with pytest.raises(UsageError, match="--vocab-size applies only to `zforcing prepare text`"):
        prepare("imdb", str(tmp_path), tmp_path / "out", vocab_size=100)


def test_text_column_on_plain_text_is_a_usage_error(tmp_path):
    (tmp_path / "a.txt").write_text("Some words here for a test.\n")
    with pytest.raises(UsageError, match="--text-column"):
        prepare("text", str(tmp_path / "a.txt"), tmp_path / "out", text_column="body")


def test_streaming_reads_a_file_without_blank_lines_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PARAGRAPH_CHARACTERS", 100)
    (tmp_path / "a.txt").write_text("".join(f"Line number {i} of a long file.\n" for i in range(50)))
    pieces = list(corpus.text_file_paragraphs(tmp_path / "a.txt"))
    assert len(pieces) > 10 and max(len(piece) for piece in pieces) < 200


# -- encodings and files that are not text -------------------------------------------------------------

FRENCH = ["Le film est tr\u00e8s long mais il reste bon du d\u00e9but \u00e0 la fin.",
          "Une autre phrase ici pour le test du corpus fran\u00e7ais.", "Le caf\u00e9 du coin sert un th\u00e9 tr\u00e8s chaud ce matin."]


def write_latin1(path, repeat: int = 4) -> None:
    """Latin-1 bytes (0xE8 for \u00e8, ...), the first bad one for UTF-8 on line 3."""
    path.write_bytes(("Plain words come first here.\n\n" + "\n\n".join(FRENCH * repeat) + "\n").encode("latin-1"))


def test_latin1_text_is_refused_naming_the_line_and_the_byte(cwd):
    write_latin1(cwd / "latin1.txt")
    result = invoke("prepare", "text", "latin1.txt", "--out", "out")
    assert_clean_error(result, 1, "latin1.txt, line 3: byte 0xE8 is not UTF-8 text")
    assert "--encoding latin-1" in plain(result.stderr) and not (cwd / "out").exists()


def test_latin1_text_is_read_with_its_encoding(cwd):
    write_latin1(cwd / "latin1.txt")
    result = invoke("prepare", "text", "latin1.txt", "--out", "out", "--encoding", "latin-1", "--min-tokens", "3")
    assert result.exit_code == 0, plain(result.output)
    vocabulary = json.loads((cwd / "out" / "meta.json").read_text())["text"]["vocabulary"]
    assert "tr\u00e8s" in vocabulary and not any("\ufffd" in word for word in vocabulary)


@pytest.mark.parametrize(("head", "expected"), [
    (b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00", "is not a text file: it starts like a RIFF file (WAV audio"),
    (b"some words\x00\x01\x02 and then", "is not a text file: it starts like binary data: it holds NUL bytes"),
    (codecs.BOM_UTF16_LE + "Hello there.".encode("utf-16-le"), "is UTF-16 text"),
])
def test_a_file_that_is_not_text_is_refused(cwd, head, expected):
    (cwd / "speech.txt").write_bytes(head + bytes(range(256)) * 4)
    result = invoke("prepare", "text", "speech.txt", "--out", "out")
    assert_clean_error(result, 1, "speech.txt", expected)
    assert not (cwd / "out").exists()


def test_a_binary_file_in_a_folder_of_text_files_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(FRENCH) + "\n")
    (tmp_path / "corpus" / "b.txt").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    with pytest.raises(DataError, match="b.txt is not a text file"):
        prepare("text", str(tmp_path / "corpus"), tmp_path / "out")


def test_a_csv_with_bad_bytes_names_the_line_and_gives_the_csv_hint(cwd):
    rows = "".join(f'"{sentence}",{label}\n' for label, sentence in enumerate(FRENCH * 3))
    (cwd / "reviews.csv").write_bytes(("text,label\n" + rows).encode("latin-1"))
    result = invoke("prepare", "imdb", "reviews.csv", "--out", "out")
    assert_clean_error(result, 1, "reviews.csv, line 2: byte 0xE8 is not UTF-8 text")
    hint = next(line for line in plain(result.stderr).splitlines() if line.startswith("Hint:"))
    assert "CSV" in hint and "--encoding" in hint and "JSON" not in hint
    result = invoke("prepare", "text", "reviews.csv", "--out", "out", "--encoding", "cp1252", "--min-tokens", "3")
    assert result.exit_code == 0, plain(result.output)


def test_the_encoding_is_checked_and_applies_only_where_files_have_one(cwd):
    write_latin1(cwd / "latin1.txt")
    assert_clean_error(invoke("prepare", "text", "latin1.txt", "--encoding", "klingon"), 2, "--encoding 'klingon' is not a text encoding")
    assert_clean_error(invoke("prepare", "text", "latin1.txt", "--encoding", "base64"), 2, "--encoding 'base64'")
    write_reviews_jsonl(cwd / "r.jsonl", count=5)
    assert_clean_error(invoke("prepare", "imdb", "r.jsonl", "--encoding", "latin-1"), 2, "--encoding does not apply to JSON")
    assert_clean_error(invoke("prepare", "mnist", "embedded", "--encoding", "latin-1"), 2, "--encoding applies only to")
    assert not (cwd / "data").exists()


# -- the command line ---------------------------------------------------------------------------------


def test_cli_prepare_imdb_prints_counts_and_vocabulary(cwd):
    write_reviews_jsonl(cwd / "r.jsonl", count=30)
    result = invoke("prepare", "imdb", "r.jsonl", "--out", "d")
    assert result.exit_code == 0, plain(result.output)
    out = plain(result.stdout)
    meta = json.loads((cwd / "d" / "meta.json").read_text())
    assert f"train {meta['counts']['train']:,}" in out and "30 documents" in out
    assert "covering" in out and "<unk> is" in out


def test_cli_prepare_imdb_says_how_far_it_is_off_a_terminal(cwd, monkeypatch):
    """A line every JobProgress.LOG_SECONDS (here: every report, one per 200 reviews and one at
    the end) where no bar is drawn."""
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    write_reviews_jsonl(cwd / "r.jsonl", count=450)
    result = invoke("prepare", "imdb", "r.jsonl", "--out", "d")
    assert result.exit_code == 0, plain(result.output)
    lines = [line for line in plain(result.stderr).splitlines() if line.startswith("Preparing imdb: ")]
    assert [line.split(", ")[1] for line in lines] == ["200 documents", "400 documents", "450 documents"], lines
    assert lines[-1].startswith("Preparing imdb: 100%, 450 documents")


def test_prepare_help_shows_unk(cwd):
    help_text = " ".join(plain(invoke("prepare", "--help").output).replace("│", " ").split())
    assert "the rest become <unk>" in help_text, help_text


def test_cli_prepare_text_options(cwd):
    write_reviews_jsonl(cwd / "r.jsonl", count=30)
    result = invoke("prepare", "text", "r.jsonl", "--out", "d", "--max-tokens", "8", "--vocab-size", "10", "--case", "keep")
    assert result.exit_code == 0, plain(result.output)
    meta = json.loads((cwd / "d" / "meta.json").read_text())
    assert meta["text"]["max_tokens"] == 8 and len(meta["text"]["vocabulary"]) == 14
    assert meta["text"]["lowercase"] is False


def test_cli_prepare_from_the_hub_offline(cwd, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpus, "hub_reachable", lambda host="huggingface.co": False)
    assert_clean_error(invoke("prepare", "imdb", "hf:stanfordnlp/imdb"), 1, "offline")
    assert_clean_error(invoke("prepare", "imdb", "hf:"), 2, "dataset name")


def test_cli_prepare_text_errors(cwd):
    assert_clean_error(invoke("prepare", "imdb", "missing.jsonl"), 1, "does not exist")
    write_reviews_jsonl(cwd / "r.jsonl", count=5)
    assert_clean_error(invoke("prepare", "imdb", "r.jsonl", "--max-tokens", "9"), 2, "--max-tokens", "text")
    assert_clean_error(invoke("prepare", "text", "r.jsonl", "--case", "title"), 2, "--case")
    assert not (cwd / "data").exists()


def test_the_cli_does_not_import_the_text_libraries():
    """nltk and datasets load only when text is prepared or read: `zforcing --help` and the
    MNIST commands never pay for them."""
    import subprocess
    import sys

    code = "import sys, zforcing_cli.cli; print(sorted({'nltk', 'datasets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("sentence", ["Don't stop -- it's \"fine\" (really)!", "a  b\tc", "I'm gonna say: 1,000 $ 5.50 ...",
                                      "\"Quoted,\" he said.", "Ends with a period."])
def test_treebank_never_gives_fewer_tokens_than_words(sentence):
    """The premise of skipping long sentences before tokenizing them."""
    assert len(tokenize_sentence(sentence)) >= len(sentence.split())
