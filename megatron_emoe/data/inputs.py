"""Input files of the preprocessing: glob expansion, format detection, loading with `datasets`."""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
from collections.abc import Sequence

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
        raise ValueError(f"{flag}: give at least one file or glob")
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"{flag}: no file matches {pattern!r}")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise ValueError(f"{flag}: {pattern!r} is not a file")
        files += [os.path.abspath(p) for p in matches]
    return list(dict.fromkeys(files))


def detect_format(files: Sequence[str], input_format: str | None = None) -> str:
    """The one input format of `files`: `input_format` if given, else from the file extensions."""
    if input_format is not None:
        if input_format not in FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(FORMATS)}; got {input_format!r}")
        return input_format
    found = {}
    for path in files:
        name = path.lower()
        for suffix in _COMPRESSION:
            name = name.removesuffix(suffix)
        fmt = _EXTENSIONS.get(os.path.splitext(name)[1])
        if fmt is None:
            raise ValueError(
                f"--input: cannot tell the format of {path} from its extension; "
                f"pass --input-format {{{','.join(FORMATS)}}}"
            )
        found.setdefault(fmt, path)
    if len(found) > 1:
        examples = ", ".join(f"{fmt} ({path})" for fmt, path in found.items())
        raise ValueError(f"--input: files of one format only, got {examples}; split the run")
    return next(iter(found))


def load_records(files: Sequence[str], fmt: str, *, cache_dir: str, text_sample_by: str = "document"):
    """A `datasets.Dataset` of the records of `files` (text: one record per document/paragraph/line)."""
    import datasets

    if text_sample_by not in TEXT_SAMPLE_BY:
        raise ValueError(
            f"--text-sample-by must be one of {', '.join(TEXT_SAMPLE_BY)}; got {text_sample_by!r}"
        )
    kwargs = {"sample_by": text_sample_by} if fmt == "text" else {}
    return datasets.load_dataset(
        _BUILDER[fmt], data_files=list(files), split="train", cache_dir=cache_dir, **kwargs
    )


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
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


def _peek_file(path: str, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _COMPRESSION and suffix not in _OPENERS:
        return None  # .zst/.lz4: no stdlib reader; `datasets` will tell
    columns: dict[str, None] = {}
    try:
        with _OPENERS.get(suffix, open)(path, "rt", encoding="utf-8") as f:
            for _, line in zip(range(PEEK_RECORDS), f):
                record = json.loads(line) if line.strip() else {}
                if not isinstance(record, dict):
                    return None
                columns.update(dict.fromkeys(record))
    except (OSError, ValueError):
        return None  # not JSON Lines (e.g. one JSON document): leave it to `datasets`
    return list(columns)
