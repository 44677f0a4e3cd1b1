"""Reading text corpora one document at a time, whatever their form: JSON lines, CSV, TSV, JSON
and parquet files (through `datasets`' local loaders, streamed), the aclImdb folder, folders of
.txt files, plain text files, and datasets on the Hugging Face hub (`hf:NAME[:SPLIT]`).

A Documents object yields each document as a string and says how far through the source the
reading is, for the progress bar; nothing holds more than one document (or one table batch).
"""

from __future__ import annotations

import codecs
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
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
# What each format's file must be, for the hint of an error reading one.
ENCODING_ADVICE = "in UTF-8 or the encoding named with --encoding (e.g. --encoding latin-1)"
FORMAT_HINTS = {
    "json lines": "Check that the file is complete, with one JSON object per line, in UTF-8 (JSON's encoding).",
    "json": "Check that the file is complete JSON, in UTF-8: an array of objects, or one object per line.",
    "csv": f"Check that the file is complete CSV: a header row, then one record per row, {ENCODING_ADVICE}.",
    "tsv": f"Check that the file is complete TSV: a header row, then one record per row, tab-separated, {ENCODING_ADVICE}.",
    "parquet": "Check that the file is a complete parquet file.",
    "hub": "Check the dataset's name and split on huggingface.co, and run again.",
}
DEFAULT_ENCODING = "utf-8"
# Files that say what they are in their first bytes, and are no text: (signature, what it is).
BINARY_SIGNATURES = (
    (b"RIFF", "a RIFF file (WAV audio, or AVI video)"), (b"fLaC", "FLAC audio"), (b"OggS", "an Ogg file (audio)"),
    (b"ID3", "MP3 audio"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"), (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive (or a Word or OpenDocument file)"),
    (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"), (b"\x7fELF", "a program"),
    (b"PAR1", "a parquet file"),
)
UNICODE_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
                 (codecs.BOM_UTF16_BE, "utf-16"))
SNIFF_BYTES = 8192  # how much of a text file is looked at for a binary header or NUL bytes
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


def open_documents(source: str, text_column: str | None = None, encoding: str | None = None) -> Documents:
    """The documents of a corpus: `hf:NAME[:SPLIT]`, a table file (.jsonl/.json/.csv/.tsv/
    .parquet), a plain text file, the aclImdb folder, or a folder of text files. Plain text and
    CSV/TSV are decoded with encoding (default UTF-8); JSON is UTF-8 by definition, and parquet
    and the hub say their own."""
    if encoding is not None:
        encoding = check_encoding(encoding)
    if source.startswith("hf:"):
        refuse_encoding(encoding, "a Hugging Face dataset")
        return hub_documents(source[3:], text_column)
    path = Path(source)
    hint = ("SOURCE is a JSON-lines, CSV, JSON or parquet file with a text column, a plain text file, the aclImdb "
            "folder, a folder of .txt files, or hf:NAME for a dataset on the Hugging Face hub.")
    if not path.exists():
        raise DataError(f"{path} does not exist.", hint)
    if path.is_dir():
        return folder_documents(path, encoding or DEFAULT_ENCODING)
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES or (suffix == ".json" and holds_json_lines(path)):
        refuse_encoding(encoding, "JSON, which is UTF-8 by definition")
        return json_lines_documents(path, text_column)
    if suffix in TABLE_SUFFIXES:
        if suffix in (".json", ".parquet"):
            refuse_encoding(encoding, "JSON, which is UTF-8 by definition" if suffix == ".json" else "parquet, which names its own")
        return table_documents(path, TABLE_SUFFIXES[suffix], text_column, encoding or DEFAULT_ENCODING)
    if text_column is not None:
        raise UsageError("--text-column applies to table files (CSV, JSON, parquet) and hub datasets only.",
                         f"{path} is read as plain text.")
    return text_file_documents(path, encoding or DEFAULT_ENCODING)


def check_encoding(name: str) -> str:
    """The codec name Python knows for --encoding NAME (latin-1 -> iso8859-1), or a usage error."""
    try:
        codec = codecs.lookup(name)
    except LookupError:
        codec = None
    if codec is None or not getattr(codec, "_is_text_encoding", True):  # base64, zlib: bytes to bytes
        raise UsageError(f"--encoding {name!r} is not a text encoding Python knows.",
                         "For example --encoding utf-8 (the default), latin-1, cp1252 or utf-16.")
    return codec.name


def refuse_encoding(encoding: str | None, what: str) -> None:
    if encoding is not None:
        raise UsageError(f"--encoding does not apply to {what}.", "Leave --encoding out; it applies to plain text and CSV/TSV files.")


def refuse_binary(path: Path, encoding: str) -> None:
    """A DataError when path is no text: a known binary header (a WAV renamed .txt), or NUL
    bytes, which no text holds outside UTF-16 and UTF-32."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    wide = encoding.startswith(("utf-16", "utf-32"))
    marked = next((name for mark, name in UNICODE_MARKS if head.startswith(mark)), None)
    if marked and not wide:
        raise DataError(f"{path} is {marked.upper()} text (it starts with a {marked.upper()} byte order mark), not {encoding}.",
                        f"Pass --encoding {marked}.")
    what = next((name for signature, name in BINARY_SIGNATURES if head.startswith(signature)), None)
    if what is None and b"\0" in head and not wide:
        what = "binary data: it holds NUL bytes, which text never does"
    if what is not None:
        raise DataError(f"{path} is not a text file: it starts like {what}.",
                        "Pass a plain text file (UTF-8, or name its encoding with --encoding); audio is prepared with "
                        "`zforcing prepare wav FOLDER`.")


def undecodable(path: Path, encoding: str) -> DataError:
    """The error for a file that does not decode: the line and the value of its first bad byte."""
    line, byte = first_undecodable(path, encoding)
    return DataError(f"Cannot read {path}, line {line:,}: byte 0x{byte:02X} is not {encoding_label(encoding)} text.",
                     "Pass the file's encoding with --encoding, e.g. --encoding latin-1 (Western European) or cp1252 (Windows).")


def encoding_label(encoding: str) -> str:
    """utf-8 as UTF-8, the way it is written; other names as Python gives them."""
    return encoding.upper() if encoding.startswith("utf") else encoding


def first_undecodable(path: Path, encoding: str) -> tuple[int, int]:
    """(line number, byte value) of the first byte of path that encoding cannot decode; read in
    blocks through an incremental decoder, so a file of any size is never held whole."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as handle:
        for block, final in blocks_and_end(handle):
            try:
                line += decoder.decode(block, final).count("\n")
            except UnicodeDecodeError as error:  # error.object: the bytes held back from the last block, then this one
                good = codecs.decode(error.object[:error.start], encoding, "replace")
                return line + good.count("\n"), error.object[error.start]
    return line, 0


def blocks_and_end(handle, size: int = 1 << 16) -> Iterator[tuple[bytes, bool]]:
    """(block, False) for each block of a binary file, then (b"", True)."""
    for block in iter(lambda: handle.read(size), b""):
        yield block, False
    yield b"", True


def text_file_paragraphs(path: Path, encoding: str = DEFAULT_ENCODING) -> Iterator[str]:
    """A plain text file's paragraphs (runs of non-blank lines, joined), each at most about
    PARAGRAPH_CHARACTERS long, so a file without blank lines is never read whole. A file that
    is not text, or does not decode, is an error naming its first bad byte."""
    lines: list[str] = []
    size = 0
    try:
        refuse_binary(path, encoding)
        with open(path, encoding=encoding) as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.strip())
                    size += len(line)
                if lines and (not line.strip() or size > PARAGRAPH_CHARACTERS):
                    yield " ".join(lines)
                    lines, size = [], 0
    except UnicodeDecodeError:
        raise undecodable(path, encoding) from None
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error.strerror}.", "Check the file's permissions, or copy it somewhere readable.") from None
    if lines:
        yield " ".join(lines)


def text_file_documents(path: Path, encoding: str) -> Documents:
    total = max(1, path.stat().st_size)
    position = {"done": 0}

    def paragraphs() -> Iterator[str]:
        for paragraph in text_file_paragraphs(path, encoding):
            position["done"] += len(paragraph.encode(encoding, errors="replace")) + 1
            yield paragraph

    return Documents(paragraphs(), f"text file {path}", lambda: min(1.0, position["done"] / total))


def folder_documents(folder: Path, encoding: str) -> Documents:
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
                yield " ".join(text_file_paragraphs(path, encoding))
            else:
                yield from text_file_paragraphs(path, encoding)
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

    return row_documents(rows(), str(path), text_column, FORMAT_HINTS["json lines"],
                         fraction=lambda: min(1.0, position["done"] / size))


def json_record(line: bytes, number: int, path: Path) -> dict:
    try:
        record = json.loads(line.rstrip(b"\r\n"))  # a column past the line end would point at the next line
    except UnicodeDecodeError as error:
        raise DataError(f"Cannot read {path}, line {number:,}: byte 0x{error.object[error.start]:02X} is not UTF-8 text.",
                        FORMAT_HINTS["json lines"]) from None
    except json.JSONDecodeError as error:
        at = "" if error.msg.endswith(" at") else " at"  # "Invalid control character at", "Expecting value"
        raise DataError(f"Cannot read {path}, line {number:,}: not valid JSON ({error.msg}{at} column {error.colno}).",
                        FORMAT_HINTS["json lines"]) from None
    if not isinstance(record, dict):
        raise DataError(f"Cannot read {path}, line {number:,}: a JSON {type(record).__name__} where an object "
                        "(one record with a text field) belongs.", FORMAT_HINTS["json lines"])
    return record


def quiet_datasets():
    """`datasets`, imported with its own logging and progress bars off: what goes wrong is said
    once, in the error that names the file."""
    import datasets

    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets


def table_documents(path: Path, builder: str, text_column: str | None, encoding: str) -> Documents:
    """Rows of a CSV/TSV, whole-JSON or parquet file, streamed by `datasets`' local loader."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file never needs the hub
    datasets = quiet_datasets()
    tabs = path.suffix.lower() == ".tsv"
    options = {"delimiter": "\t"} if tabs else {}
    if builder == "csv":
        refuse_binary(path, encoding)
        options["encoding"] = encoding
    hint = FORMAT_HINTS["tsv" if tabs else builder]
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
    except Exception as error:  # datasets raises many types for a malformed file
        raise table_error(path, f"Cannot read {path} as {builder.upper()}", error, encoding, hint) from None
    return row_documents(rows, str(path), text_column, hint, locate=lambda error: located(path, error, encoding))


def table_error(path: Path, what: str, error: BaseException, encoding: str, hint: str) -> DataError:
    if isinstance(error, UnicodeDecodeError):
        return undecodable(path, encoding)
    return DataError(f"{what}{located(path, error, encoding)}.", hint)


def located(path: Path, error: BaseException, encoding: str = DEFAULT_ENCODING) -> str:
    """': ' and a loader's first line of error, or ', line N: ' and it when it names a
    character position: the line of the file it stopped at. A decoding error names the line
    and the value of the file's first bad byte (the loader's names only a position in a field)."""
    if isinstance(error, UnicodeDecodeError):
        line, byte = first_undecodable(path, encoding)
        return f", line {line:,}: byte 0x{byte:02X} is not {encoding_label(encoding)} text"
    text = first_line(error)
    found = POSITION.search(text)
    if not found:
        return f": {text}"
    with open(path, encoding=encoding, errors="replace") as handle:
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
    return row_documents(rows, f"hf:{name}", text_column, FORMAT_HINTS["hub"])


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


def row_documents(rows, where: str, text_column: str | None, hint: str, fraction: Callable[[], float | None] = lambda: None,
                  locate: Callable[[BaseException], str] = lambda error: f": {first_line(error)}") -> Documents:
    """The text column of rows (dicts); errors name where, and the record (and line, where
    `locate` finds it) they stopped at, with the hint of the source's format."""
    iterator = iter(rows)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError(f"{where} holds no records.", "Pass a corpus with at least a few documents.") from None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"Cannot read {where}{locate(error)}.", hint) from None
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
            raise DataError(f"Cannot read {where} after record {done['rows']:,}{locate(error)}.", hint) from None

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
