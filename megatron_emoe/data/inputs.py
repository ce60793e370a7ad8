"""Input files of the preprocessing: glob expansion, format detection, checks, loading with `datasets`.

Bad input is a `UsageError` naming the file (and the line or byte where it is wrong), found by
`check_inputs` in one streaming pass before `datasets` reads anything.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import glob
import gzip
import itertools
import json
import lzma
import os
import zlib
from collections.abc import Callable, Iterator, Sequence

import datasets
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from megatron_emoe.errors import UsageError

FORMATS = ("jsonl", "parquet", "text")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")

_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text", ".md": "text",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BUILDER = {"jsonl": "json", "parquet": "parquet", "text": "text"}


def resolve_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """Expand paths and globs into a sorted-per-pattern, de-duplicated list of existing files."""
    if not patterns:
        raise UsageError(f"{flag}: give at least one file or glob")
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UsageError(f"{flag}: no file matches {pattern!r}")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise UsageError(f"{flag}: {pattern!r} is not a file")
        files += [os.path.abspath(p) for p in matches]
    return list(dict.fromkeys(files))


def detect_format(files: Sequence[str], input_format: str | None = None) -> str:
    """The one input format of `files`: `input_format` if given, else from the file extensions."""
    if input_format is not None:
        if input_format not in FORMATS:
            raise UsageError(f"--input-format must be one of {', '.join(FORMATS)}; got {input_format!r}")
        return input_format
    found = {}
    for path in files:
        name = path.lower()
        for suffix in _COMPRESSION:
            name = name.removesuffix(suffix)
        fmt = _EXTENSIONS.get(os.path.splitext(name)[1])
        if fmt is None:
            raise UsageError(
                f"--input: cannot tell the format of {path} from its extension; "
                f"pass --input-format {{{','.join(FORMATS)}}}"
            )
        found.setdefault(fmt, path)
    if len(found) > 1:
        examples = ", ".join(f"{fmt} ({path})" for fmt, path in found.items())
        raise UsageError(f"--input: files of one format only, got {examples}; split the run")
    return next(iter(found))


def load_records(files: Sequence[str], fmt: str, *, cache_dir: str, text_sample_by: str = "document"):
    """A `datasets.Dataset` of the records of `files` (text: one record per document/paragraph/line)."""
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise UsageError(
            f"--text-sample-by must be one of {', '.join(TEXT_SAMPLE_BY)}; got {text_sample_by!r}"
        )
    kwargs = {"sample_by": text_sample_by} if fmt == "text" else {}
    return datasets.load_dataset(
        _BUILDER[fmt], data_files=list(files), split="train", cache_dir=cache_dir, **kwargs
    )


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)  # gzip.BadGzipFile is an OSError
PEEK_RECORDS = 100


def peek_columns(files: Sequence[str], fmt: str) -> list[str] | None:
    """Column names from each file's schema or first records, cheaply; None when unknown."""
    if fmt == "text":
        return ["text"]
    columns: dict[str, None] = {}
    for path in files:
        found = _peek_file(path, fmt)
        if found is None:
            return None
        columns.update(dict.fromkeys(found))
    return list(columns) or None


def check_inputs(files: Sequence[str], fmt: str, *, progress: bool = False) -> None:
    """One streaming pass over text and JSONL inputs: UTF-8 throughout, one JSON object per JSONL line.

    Raises a `UsageError` naming the file and line (and byte, for bad UTF-8). Parquet files were
    checked by `peek_columns` (their schema); .zst/.lz4 files are left to `datasets`.
    """
    if fmt == "parquet":
        return
    for path in tqdm(files, desc="Checking inputs", unit="file", disable=not progress):
        if _readable(path):
            collections.deque(jsonl_records(path) if fmt == "jsonl" else _lines(path), maxlen=0)


def jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSON Lines file (plain or .gz/.bz2/.xz).

    A line that is not one JSON object, or not UTF-8, is a `UsageError` naming the file and line.
    A file holding one JSON array (`[...]`, which `datasets` also reads) is only checked to be UTF-8
    and yields nothing.
    """
    array = None
    for number, text in _lines(path):
        if not text.strip():
            continue
        if array is None:
            array = text.lstrip().startswith("[")
        if array:
            continue
        try:
            record = json.loads(text)
        except ValueError as error:
            reason = f"{error.msg} at column {error.pos + 1}" if isinstance(error, json.JSONDecodeError) else error
            raise UsageError(
                f"--input: {path} line {number} is not valid JSON ({reason}); "
                "JSON Lines hold one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise UsageError(
                f"--input: {path} line {number} is a JSON {_JSON_TYPES.get(type(record), 'value')}, "
                "not an object; JSON Lines hold one JSON object {...} per line"
            )
        yield number, record


def records_lacking(
    path: str, fmt: str, lacks: Callable[[dict], bool], columns: Sequence[str], show: int = 3
) -> tuple[int, list[str]] | None:
    """How many records of `path` `lacks`, and where the first `show` are (`line N` / `row N`).

    Reads `columns` only (Parquet) or streams the lines (JSONL); None when the file cannot be read
    record by record here (.zst/.lz4, a JSON array).
    """
    count, where = 0, []
    if fmt == "parquet":
        parquet = pq.ParquetFile(path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        rows = (
            (f"row {i}", row)
            for i, row in enumerate(r for batch in parquet.iter_batches(columns=present) for r in batch.to_pylist())
        )
    elif fmt == "jsonl" and _readable(path):
        rows = ((f"line {number}", record) for number, record in jsonl_records(path))
    else:
        return None
    seen = False
    for place, row in rows:
        seen = True
        if lacks(row):
            count += 1
            if len(where) < show:
                where.append(place)
    return (count, where) if seen else None


def _readable(path: str) -> bool:
    """Plain or compressed with a stdlib codec (.zst/.lz4 have none)."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix not in _COMPRESSION or suffix in _OPENERS


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decompressed; not UTF-8 is a `UsageError` naming line and byte."""
    suffix = os.path.splitext(path)[1].lower()
    number, offset = 0, 0
    try:
        with _OPENERS.get(suffix, open)(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    of = " of the decompressed data" if suffix in _OPENERS else ""
                    raise UsageError(
                        f"--input: {path} is not UTF-8 text: line {number}, byte offset {offset + error.start}{of} "
                        f"is {raw[error.start:error.end]!r} ({error.reason}); convert the file to UTF-8"
                    ) from None
                yield number, (text.removeprefix("\ufeff") if number == 1 else text)
                offset += len(raw)
    except _READ_ERRORS as error:
        where = f" at line {number + 1}" if number else ""
        raise UsageError(f"--input: cannot read {path}{where}: {error}") from None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _peek_file(path: str, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        try:
            return list(pq.read_schema(path).names)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"--input: {path} is not a readable Parquet file ({error})") from None
    if not _readable(path):
        return None  # .zst/.lz4: no stdlib reader; `datasets` will tell
    columns: dict[str, None] = {}
    with contextlib.closing(jsonl_records(path)) as records:
        for _, record in itertools.islice(records, PEEK_RECORDS):
            columns.update(dict.fromkeys(record))
    return list(columns) or None  # None: a JSON array (or blank lines only), left to `datasets`
