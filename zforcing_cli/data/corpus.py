"""Reading text corpora one document at a time, whatever their form: JSON lines, CSV, TSV, JSON
and parquet files (through `datasets`' local loaders, streamed), the aclImdb folder, folders of
.txt files, plain text files, and datasets on the Hugging Face hub (`hf:NAME[:SPLIT]`).

A Documents object yields each document as a string and says how far through the source the
reading is, for the progress bar; nothing holds more than one document (or one table batch).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import DataError, UsageError
from ..fileio import files_under

PARAGRAPH_CHARACTERS = 1 << 16  # a plain-text paragraph longer than this is cut at a line end
HUB_TIMEOUT = 1.5  # seconds to wait for the Hugging Face hub before calling the machine offline
TEXT_COLUMNS = ("text", "review", "review_text", "reviewText", "content", "body", "sentence", "comment")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".text")
TABLE_HINT = "Check that the file is complete and of the format its name says (one JSON object per line for .jsonl)."
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
POSITION = re.compile(r"at position (\d+)")  # how the loaders of whole JSON files say where they stopped


class Documents:
    """The documents of a source, one string at a time, with how far through the source the
    reading is (`fraction`, None when the size is not known in advance)."""

    def __init__(self, items: Iterator[str], describe: str, fraction: Callable[[], float | None] = lambda: None):
        self.items = items
        self.describe = describe
        self.fraction = fraction

    def __iter__(self) -> Iterator[str]:
        return self.items


def open_documents(source: str, text_column: str | None = None) -> Documents:
    """The documents of a corpus: `hf:NAME[:SPLIT]`, a table file (.jsonl/.json/.csv/.tsv/
    .parquet), a plain text file, the aclImdb folder, or a folder of text files."""
    if source.startswith("hf:"):
        return hub_documents(source[3:], text_column)
    path = Path(source)
    hint = ("SOURCE is a JSON-lines, CSV, JSON or parquet file with a text column, a plain text file, the aclImdb "
            "folder, a folder of .txt files, or hf:NAME for a dataset on the Hugging Face hub.")
    if not path.exists():
        raise DataError(f"{path} does not exist.", hint)
    if path.is_dir():
        return folder_documents(path)
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES or (suffix == ".json" and holds_json_lines(path)):
        return json_lines_documents(path, text_column)
    if suffix in TABLE_SUFFIXES:
        return table_documents(path, TABLE_SUFFIXES[suffix], text_column)
    if text_column is not None:
        raise UsageError("--text-column applies to table files (CSV, JSON, parquet) and hub datasets only.",
                         f"{path} is read as plain text.")
    return text_file_documents(path)


def text_file_paragraphs(path: Path) -> Iterator[str]:
    """A plain text file's paragraphs (runs of non-blank lines, joined), each at most about
    PARAGRAPH_CHARACTERS long, so a file without blank lines is never read whole."""
    lines: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.strip())
                    size += len(line)
                if lines and (not line.strip() or size > PARAGRAPH_CHARACTERS):
                    yield " ".join(lines)
                    lines, size = [], 0
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error.strerror}.", "Check the file's permissions, or copy it somewhere readable.") from None
    if lines:
        yield " ".join(lines)


def text_file_documents(path: Path) -> Documents:
    total = max(1, path.stat().st_size)
    position = {"done": 0}

    def paragraphs() -> Iterator[str]:
        for paragraph in text_file_paragraphs(path):
            position["done"] += len(paragraph.encode("utf-8", errors="replace")) + 1
            yield paragraph

    return Documents(paragraphs(), f"text file {path}", lambda: min(1.0, position["done"] / total))


def folder_documents(folder: Path) -> Documents:
    """The aclImdb folder (train|test/pos|neg|unsup/*.txt, one review per file), or any folder
    of .txt files (each read as paragraphs), in sorted order."""
    files = files_under(folder, TEXT_SUFFIXES)
    if not files:
        raise DataError(f"No text files in {folder} (looked for {', '.join(TEXT_SUFFIXES)} in every subfolder).",
                        "Pass the aclImdb folder, a folder of .txt files, or a single corpus file.")
    done = {"files": 0}
    acl_imdb = (folder / "train").is_dir() and (folder / "test").is_dir()

    def documents() -> Iterator[str]:
        for path in files:
            if acl_imdb:  # one review per file
                yield " ".join(text_file_paragraphs(path))
            else:
                yield from text_file_paragraphs(path)
            done["files"] += 1

    describe = f"aclImdb folder {folder}" if acl_imdb else f"folder {folder}"
    return Documents(documents(), f"{describe} ({len(files):,} files)", lambda: done["files"] / len(files))


def holds_json_lines(path: Path) -> bool:
    """Whether a .json file is JSON lines: its first line is a whole JSON object (a file of one
    object spread over lines, or an array, is read whole by `datasets` instead)."""
    with open(path, "rb") as handle:
        first = next((line for line in handle if line.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def json_lines_documents(path: Path, text_column: str | None) -> Documents:
    """Rows of a JSON-lines file, parsed one line at a time by the json module, so that a
    broken line is named by its number; blank lines are passed over."""
    size, position = max(1, path.stat().st_size), {"done": 0}

    def rows() -> Iterator[dict]:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                position["done"] += len(line)
                if line.strip():
                    yield json_record(line, number, path)

    return row_documents(rows(), str(path), text_column, fraction=lambda: min(1.0, position["done"] / size))


def json_record(line: bytes, number: int, path: Path) -> dict:
    try:
        record = json.loads(line.rstrip(b"\r\n"))  # a column past the line end would point at the next line
    except UnicodeDecodeError:
        raise DataError(f"Cannot read {path}, line {number:,}: it is not UTF-8 text.", TABLE_HINT) from None
    except json.JSONDecodeError as error:
        at = "" if error.msg.endswith(" at") else " at"  # "Invalid control character at", "Expecting value"
        raise DataError(f"Cannot read {path}, line {number:,}: not valid JSON ({error.msg}{at} column {error.colno}).",
                        TABLE_HINT) from None
    if not isinstance(record, dict):
        raise DataError(f"Cannot read {path}, line {number:,}: a JSON {type(record).__name__} where an object "
                        "(one record with a text field) belongs.", TABLE_HINT)
    return record


def quiet_datasets():
    """`datasets`, imported with its own logging and progress bars off: what goes wrong is said
    once, in the error that names the file."""
    import datasets

    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets


def table_documents(path: Path, builder: str, text_column: str | None) -> Documents:
    """Rows of a CSV/TSV, whole-JSON or parquet file, streamed by `datasets`' local loader."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file never needs the hub
    datasets = quiet_datasets()
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
    except Exception as error:  # datasets raises many types for a malformed file
        raise DataError(f"Cannot read {path} as {builder.upper()}{located(path, error)}.", TABLE_HINT) from None
    return row_documents(rows, str(path), text_column, locate=lambda error: located(path, error))


def located(path: Path, error: BaseException) -> str:
    """': ' and a loader's first line of error, or ', line N: ' and it when it names a
    character position: the line of the file it stopped at."""
    text = first_line(error)
    found = POSITION.search(text)
    if not found:
        return f": {text}"
    with open(path, encoding="utf-8", errors="replace") as handle:
        line = handle.read(int(found.group(1))).count("\n") + 1
    return f", line {line:,}: {text}"


def hub_documents(name: str, text_column: str | None) -> Documents:
    """A dataset on the Hugging Face hub, `NAME` or `NAME:SPLIT` (default split: train)."""
    name, _, split = name.partition(":")
    if not name:
        raise UsageError("hf: needs a dataset name.", "For example hf:stanfordnlp/imdb or hf:stanfordnlp/imdb:unsupervised.")
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        raise DataError(
            f"Cannot reach the Hugging Face hub to stream {name}: this machine looks offline.",
            "Download the dataset's files elsewhere and pass the local file or folder as SOURCE.",
        )
    datasets = quiet_datasets()

    try:
        rows = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as error:
        raise DataError(f"Cannot open hf:{name}{':' + split if split else ''}: {first_line(error)}.",
                        "Check the dataset's name and split on huggingface.co.") from None
    return row_documents(rows, f"hf:{name}", text_column)


def hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether a TCP connection to the hub opens within HUB_TIMEOUT seconds (name lookup
    included, which can hang on a machine without a network, hence the thread)."""
    result = {"ok": False}

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT).close()
            result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT)
    return result["ok"]


def row_documents(rows, where: str, text_column: str | None, fraction: Callable[[], float | None] = lambda: None,
                  locate: Callable[[BaseException], str] = lambda error: f": {first_line(error)}") -> Documents:
    """The text column of rows (dicts); errors name where, and the record (and line, where
    `locate` finds it) they stopped at."""
    iterator = iter(rows)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError(f"{where} holds no records.", "Pass a corpus with at least a few documents.") from None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"Cannot read {where}{locate(error)}.", TABLE_HINT) from None
    column = choose_text_column(first, text_column, where)
    done = {"rows": 0}

    def documents() -> Iterator[str]:
        try:
            for row in itertools.chain([first], iterator):
                done["rows"] += 1
                value = row.get(column)
                if isinstance(value, str):
                    yield value
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"Cannot read {where} after record {done['rows']:,}{locate(error)}.", TABLE_HINT) from None

    return Documents(documents(), where, fraction)


def choose_text_column(row: dict, asked: str | None, where: str) -> str:
    """The column holding the text: the one asked for, a usual name, or the only string one."""
    columns = ", ".join(f"{name} ({type(value).__name__})" for name, value in row.items())
    if asked is not None:
        if asked not in row:
            raise DataError(f"{where} has no column {asked!r}.", f"Its columns: {columns}.")
        return asked
    for name in TEXT_COLUMNS:
        if isinstance(row.get(name), str):
            return name
    strings = [name for name, value in row.items() if isinstance(value, str)]
    if len(strings) == 1:
        return strings[0]
    raise DataError(f"Cannot tell which column of {where} holds the text.",
                    f"Name it with --text-column; the columns are: {columns}.")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".")
