"""Text corpora into the prepared format: `prepare imdb` (the paper's protocol) and `prepare text`.

The pipeline, streamed so that memory stays bounded by the corpus's distinct words:

1. Documents are read one at a time (corpus.py) from a JSON-lines, CSV, JSON or parquet file
   (through `datasets`' local loaders), the `aclImdb` folder, plain text files, or the hub.
2. Each document is cleaned (HTML line breaks become paragraph breaks, entities and curly quotes
   made plain), split into sentences by a Punkt model that NLTK's PunktTrainer learns from the
   corpus's first documents (nothing is downloaded), lower-cased, and split into Penn Treebank
   word tokens by NLTK's TreebankWordTokenizer ("does n't", "it 's").
3. Sentences of min_tokens..max_tokens tokens are kept. Their words go to a provisional
   vocabulary (word -> id, count) and their ids to a file in the staging folder.
4. The sentences are shuffled with a fixed seed and split 85/5/10. The vocabulary is the
   vocabulary_size most frequent words of the train split (ties by spelling), after the four
   specials; other words become <unk>. Each split is then written in chunks as token ids with
   sentence offsets.

A stored sentence holds its word ids only; the model's targets are those ids followed by </s>
(and its first input is <s>), so a perplexity covers every word and the end of every sentence.
"""

from __future__ import annotations

import html
import itertools
import re
from array import array
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from ..fileio import reserve
from .corpus import Documents, open_documents
from .prepared import (
    END,
    PAD,
    SPECIALS,
    SPLITS,
    START,
    UNKNOWN,
    DatasetMeta,
    PreparedDataset,
    open_prepared,
    prepared_staging,
    seal_prepared,
)

SENTENCE_FILE = "sentences.raw"
PUNKT_DOCUMENTS = 2000  # documents the sentence splitter learns from (~5 s of training) ...
PUNKT_CHARACTERS = 2_000_000  # ... or this much text, whichever comes first
WRITE_CHUNK = 1 << 16  # sentences copied into a split file at a time
IMDB_ATTRIBUTION = "IMDB movie reviews; used under the terms of their source"
LINE_BREAK = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
PLAIN_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                              "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
                              "\u00a0": " "})

# progress(documents_read, sentences_kept, fraction_done or None when the total is unknown)
ProgressCallback = Callable[[int, int, "float | None"], None]


@dataclass(frozen=True)
class TextProtocol:
    """How a corpus becomes sentences of token ids (the paper's IMDB protocol by default)."""

    min_tokens: int = 5
    max_tokens: int = 15
    vocabulary_size: int = 16000  # words, besides the four specials
    lowercase: bool = True
    split: tuple[float, float, float] = (85.0, 5.0, 10.0)
    seed: int = 0

    def check(self) -> None:
        if self.min_tokens < 1:
            raise UsageError(f"--min-tokens must be at least 1, not {self.min_tokens}.", "For example --min-tokens 5.")
        if self.max_tokens < self.min_tokens:
            raise UsageError(
                f"--max-tokens {self.max_tokens} is below --min-tokens {self.min_tokens}.",
                "Give a range such as --min-tokens 5 --max-tokens 15.",
            )
        if self.vocabulary_size < 1:
            raise UsageError(f"--vocab-size must be at least 1, not {self.vocabulary_size}.", "For example --vocab-size 16000.")

    @property
    def name(self) -> str:
        case = "lower" if self.lowercase else "cased"
        shares = "-".join(f"{share:g}" for share in self.split)
        return f"ptb-{case}-{self.min_tokens}to{self.max_tokens}-v{self.vocabulary_size}-{shares}-seed{self.seed}"


IMDB_PROTOCOL = TextProtocol()


# -- cleaning and tokenizing --------------------------------------------------------------------


def clean_paragraphs(text: str) -> list[str]:
    """A raw document's paragraphs: HTML line breaks split it, entities are decoded, curly
    quotes and no-break spaces made plain, and unicode composed (NFC)."""
    text = unicodedata.normalize("NFC", html.unescape(text)).translate(PLAIN_QUOTES)
    return [paragraph for part in LINE_BREAK.split(text) if (paragraph := " ".join(part.split()))]


def word_tokenizer():
    from nltk.tokenize.treebank import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize_sentence(sentence: str, lowercase: bool = True, tokenizer=None) -> list[str]:
    """One sentence's Penn Treebank tokens, cleaned as prepared corpora are (for prompts and
    interpolation endpoints)."""
    tokenizer = tokenizer or word_tokenizer()
    text = " ".join(clean_paragraphs(sentence))
    return tokenizer.tokenize(text.lower() if lowercase else text)


class SentenceTokenizer:
    """Punkt sentence splitting learnt from sample documents, then Treebank word tokens."""

    def __init__(self, sample: Iterable[str], lowercase: bool):
        from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

        trainer = PunktTrainer()
        for document in sample:
            trainer.train("\n\n".join(clean_paragraphs(document)), finalize=False)
        trainer.finalize_training()
        self.splitter = PunktSentenceTokenizer(trainer.get_params())
        self.words = word_tokenizer()
        self.lowercase = lowercase

    def sentences(self, document: str, max_tokens: int | None = None) -> Iterator[list[str] | None]:
        """Each sentence's tokens; None, untokenized, for a sentence of more than max_tokens
        words. The Treebank tokenizer only ever splits whitespace-separated words, so a
        sentence with more words than that has more tokens too."""
        for paragraph in clean_paragraphs(document):
            for sentence in self.splitter.tokenize(paragraph):
                if max_tokens is not None and len(sentence.split()) > max_tokens:
                    yield None
                else:
                    yield self.words.tokenize(sentence.lower() if self.lowercase else sentence)


# -- pass 1: sentences with provisional ids -----------------------------------------------------


class SentenceStore:
    """Kept sentences as provisional word ids, appended to a file; words counted as they come."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")
        self.ids: dict[str, int] = {}
        self.lengths = array("I")  # 4 bytes per kept sentence, not a Python int's 36
        self.buffer = array("i")

    def add(self, tokens: list[str]) -> None:
        ids = self.ids
        for token in tokens:
            self.buffer.append(ids.setdefault(token, len(ids)))
        self.lengths.append(len(tokens))
        if len(self.buffer) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        self.buffer.tofile(self.handle)
        self.buffer = array("i")

    def close(self) -> None:
        if not self.handle.closed:
            self.flush()
            self.handle.close()

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.int32, mode="r") if self.lengths else np.zeros(0, np.int32)


def read_sentences(documents: Documents, protocol: TextProtocol, store: SentenceStore,
                   progress: ProgressCallback | None) -> dict[str, int]:
    """Tokenize every document into store (pass 1); returns counts of documents and sentences."""
    items = iter(documents)
    sample, characters = [], 0
    for document in items:  # the sentence splitter learns from the first documents
        sample.append(document)
        characters += len(document)
        if len(sample) >= PUNKT_DOCUMENTS or characters >= PUNKT_CHARACTERS:
            break
    if not sample:
        raise DataError(f"{documents.describe} holds no text.", "Pass a corpus with at least a few documents.")
    tokenizer = SentenceTokenizer(sample, protocol.lowercase)
    counts = {"documents": 0, "sentences": 0}
    for document in itertools.chain(sample, items):
        for tokens in tokenizer.sentences(document, protocol.max_tokens):
            counts["sentences"] += 1
            if tokens is not None and protocol.min_tokens <= len(tokens) <= protocol.max_tokens:
                store.add(tokens)
        counts["documents"] += 1
        if progress is not None and counts["documents"] % 200 == 0:
            progress(counts["documents"], len(store.lengths), documents.fraction())
    if progress is not None:
        progress(counts["documents"], len(store.lengths), 1.0)
    return counts


# -- pass 2: split, vocabulary, arrays -----------------------------------------------------------


def split_sentences(count: int, protocol: TextProtocol) -> dict[str, np.ndarray]:
    """Sorted sentence indices per split: a seeded shuffle cut by the protocol's shares (valid
    and test get at least one sentence each)."""
    order = np.random.default_rng(protocol.seed).permutation(count)
    valid = max(1, round(count * protocol.split[1] / 100))
    test = max(1, round(count * protocol.split[2] / 100))
    train = count - valid - test
    return {"train": np.sort(order[:train]), "valid": np.sort(order[train:train + valid]),
            "test": np.sort(order[train + valid:])}


def token_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions in the token file of the sentences starting at starts with these lengths."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1])


def choose_vocabulary(store: SentenceStore, starts: np.ndarray, lengths: np.ndarray, train: np.ndarray,
                      size: int) -> tuple[list[str], np.ndarray, dict]:
    """The `size` most frequent words of the train split (ties by spelling), after the specials;
    returns the vocabulary, the provisional -> final id map, and train-token statistics."""
    counts = np.zeros(len(store.ids), dtype=np.int64)
    tokens = store.tokens()
    for chunk in range(0, len(train), WRITE_CHUNK):
        rows = train[chunk:chunk + WRITE_CHUNK]
        counts += np.bincount(tokens[token_positions(starts[rows], lengths[rows])], minlength=len(counts))
    words = np.array(list(store.ids), dtype=object)
    seen = np.flatnonzero(counts)
    ranked = seen[sorted(range(len(seen)), key=lambda i: (-counts[seen[i]], words[seen[i]]))][:size]
    mapping = np.full(len(counts), UNKNOWN, dtype=np.int64)
    mapping[ranked] = np.arange(len(SPECIALS), len(SPECIALS) + len(ranked))
    total = int(counts.sum())
    stats = {"distinct_words": int(len(seen)),
             "coverage": float(counts[ranked].sum() / total) if total else 0.0}
    return list(SPECIALS) + [str(word) for word in words[ranked]], mapping, stats


def write_token_split(staging: Path, split: str, store: SentenceStore, starts: np.ndarray, lengths: np.ndarray,
                      rows: np.ndarray, mapping: np.ndarray, dtype: np.dtype) -> tuple[dict[str, str], dict]:
    """split.tokens.npy (final ids, sentences back to back) and split.offsets.npy (N + 1 starts)."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths[rows], out=offsets[1:])
    files = {"tokens": f"{split}.tokens.npy", "offsets": f"{split}.offsets.npy"}
    np.save(staging / files["offsets"], offsets)
    out = np.lib.format.open_memmap(staging / files["tokens"], mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
    reserve(staging / files["tokens"])
    tokens, unknown = store.tokens(), 0
    for chunk in range(0, len(rows), WRITE_CHUNK):
        part = rows[chunk:chunk + WRITE_CHUNK]
        ids = mapping[tokens[token_positions(starts[part], lengths[part])]]
        out[offsets[chunk]:offsets[chunk] + len(ids)] = ids
        unknown += int((ids == UNKNOWN).sum())
    out.flush()
    del out
    targets = int(offsets[-1]) + len(rows)  # the words and one </s> per sentence
    return files, {"tokens": int(offsets[-1]), "unknown_share": unknown / targets if targets else 0.0}


def prepare_text(
    source: str, out: Path, kind: str = "text", protocol: TextProtocol = IMDB_PROTOCOL, text_column: str | None = None,
    force: bool = False, progress: ProgressCallback | None = None, encoding: str | None = None,
) -> PreparedDataset:
    """Tokenize a corpus (see the module's docstring) into a prepared dataset at out; plain text
    and CSV are decoded with encoding (default UTF-8)."""
    protocol.check()
    documents = open_documents(source, text_column, encoding)
    with prepared_staging(out, force) as staging:
        with closing(SentenceStore(staging / SENTENCE_FILE)) as store:
            read = read_sentences(documents, protocol, store, progress)
        kept = len(store.lengths)
        if kept < 3:
            raise DataError(
                f"{documents.describe} gave {kept} sentence(s) of {protocol.min_tokens} to {protocol.max_tokens} tokens; "
                "a train, a valid and a test sentence are the least.",
                "Use a larger corpus, or widen the length range with --min-tokens and --max-tokens (prepare text).",
            )
        lengths = np.frombuffer(store.lengths, dtype=np.uint32).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        rows = split_sentences(kept, protocol)
        vocabulary, mapping, stats = choose_vocabulary(store, starts, lengths, rows["train"], protocol.vocabulary_size)
        dtype = np.dtype(np.uint16 if len(vocabulary) <= np.iinfo(np.uint16).max else np.int32)
        files, split_stats = {}, {}
        for split in SPLITS:
            files[split], split_stats[split] = write_token_split(staging, split, store, starts, lengths, rows[split], mapping, dtype)
        (staging / SENTENCE_FILE).unlink()
        meta = text_meta(kind, protocol, vocabulary, {split: len(rows[split]) for split in SPLITS}, source, documents,
                         {**read, "sentences_kept": kept, **stats}, split_stats)
        meta.files = files
        seal_prepared(staging, meta)
    return open_prepared(Path(out))


def text_meta(kind: str, protocol: TextProtocol, vocabulary: list[str], counts: dict[str, int], source: str,
              documents: Documents, read: dict, split_stats: dict) -> DatasetMeta:
    return DatasetMeta(
        kind=kind,
        protocol=protocol.name if kind == "text" or protocol != IMDB_PROTOCOL else "imdb-ptb-5to15-v16000-85-5-10",
        modality="tokens",
        sequence_length=protocol.max_tokens + 1,
        counts=counts,
        source=source if source.startswith("hf:") else str(Path(source).resolve()),
        attribution=IMDB_ATTRIBUTION if kind == "imdb" else "",
        text={
            "vocabulary": vocabulary,
            "specials": dict(zip(("pad", "start", "end", "unknown"), SPECIALS)),
            "lowercase": protocol.lowercase,
            "min_tokens": protocol.min_tokens,
            "max_tokens": protocol.max_tokens,
            "split": list(protocol.split),
            "seed": protocol.seed,
            "tokenizer": "nltk TreebankWordTokenizer; PunktSentenceTokenizer trained on the corpus's first documents",
            "read_from": documents.describe,
            "documents": read["documents"],
            "sentences_read": read["sentences"],
            "sentences_kept": read["sentences_kept"],
            "distinct_words": read["distinct_words"],
            "coverage": read["coverage"],
            "tokens": {split: stats["tokens"] for split, stats in split_stats.items()},
            "unknown_share": {split: stats["unknown_share"] for split, stats in split_stats.items()},
        },
    )


def describe_vocabulary(meta: DatasetMeta) -> str:
    """What `prepare` prints about a text dataset's vocabulary."""
    text = meta.text or {}
    shares = ", ".join(f"{share:.1%} of {split}" for split, share in text["unknown_share"].items())
    return (f"{text['documents']:,} documents, {text['sentences_kept']:,} of {text['sentences_read']:,} sentences kept "
            f"({text['min_tokens']} to {text['max_tokens']} tokens). Vocabulary: {len(text['vocabulary']) - len(SPECIALS):,} "
            f"of {text['distinct_words']:,} train words plus {len(SPECIALS)} specials, covering {text['coverage']:.1%} "
            f"of train word tokens; <unk> is {shares} target tokens.")


def decode(ids: Iterable[int], vocabulary: list[str]) -> str:
    """Token ids as text: words joined by spaces, up to the first </s>; <pad> and <s> dropped."""
    words = []
    for index in ids:
        if index == END:
            break
        if index not in (PAD, START):
            words.append(vocabulary[index])
    return " ".join(words)


def encode(tokens: list[str], vocabulary: list[str]) -> tuple[list[int], list[str]]:
    """Token strings as ids; also the words outside the vocabulary (mapped to <unk>)."""
    index = {word: i for i, word in enumerate(vocabulary)}
    unknown = [token for token in tokens if token not in index]
    return [index.get(token, UNKNOWN) for token in tokens], unknown


__all__ = ["IMDB_PROTOCOL", "SPECIALS", "TextProtocol", "prepare_text", "tokenize_sentence", "decode", "encode",
           "describe_vocabulary"]
