"""Tokenize JSONL/Parquet/text (pretraining text or SFT conversations) into Megatron indexed datasets.

Writes `<output-prefix>_<key>_document.bin/.idx` (GPTDataset reads them), for SFT also
`<output-prefix>_<key>_document_lossmask.bin/.idx` (uint8, same document lengths), and the
sidecar `<output-prefix>.json`. Everything is staged under temporary names and renamed at the end.

Bad input (flags, files, lines) raises `megatron_emoe.errors.UsageError` before any output is
written. Records lacking a needed key (absent or null) are skipped and counted in the sidecar
(`skipped_missing`), or refused with `strict`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import datasets
import numpy
import pyarrow.compute as pc
from megatron.core.datasets.indexed_dataset import DType
from tqdm.auto import tqdm

from megatron_emoe.data import chat
from megatron_emoe.data.indexed import (
    LOSS_MASK_SUFFIX,
    StagedIndexedDataset,
    dataset_files,
    dataset_prefix,
    refuse_existing,
)
from megatron_emoe.data.inputs import (
    TEXT_SAMPLE_BY,
    check_inputs,
    detect_format,
    load_records,
    peek_columns,
    records_lacking,
    resolve_inputs,
)
from megatron_emoe.data.sidecar import portable_path, write_json_atomic
from megatron_emoe.data.tokenizer import (
    check_tokenizer_dir,
    encode,
    eod_id,
    load_tokenizer,
    special_token_ids,
)
from megatron_emoe.errors import UsageError


@dataclass
class PreprocessConfig:
    """What to read, how to tokenize, where to write; one field per flag of `emoe-preprocess-data`."""

    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    input_format: str | None = None
    text_sample_by: str = "document"
    append_eod: bool = True
    sft: bool = False
    messages_key: str | None = None
    prompt_key: str | None = None
    response_key: str | None = None
    system_key: str | None = None
    workers: int = 1
    batch_size: int = 1000
    overwrite: bool = False
    progress: bool = True
    strict: bool = False  # refuse records lacking a needed key instead of skipping (and counting) them


@dataclass
class _Plan:
    """The validated run: input files and format, tokenizer, and the outputs per key."""

    files: list[str]
    fmt: str
    tokenizer_dir: str
    vocab_size: int
    eod: int
    prefixes: dict[str, str]
    outputs: list[str]
    sidecar: str
    special: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> type:
        """Token dtype of the .bin files."""
        return DType.optimal_dtype(self.vocab_size)


def output_paths(config: PreprocessConfig) -> list[str]:
    """Every file the run writes (data, loss masks, sidecar)."""
    paths = []
    for key in config.json_keys:
        prefix = dataset_prefix(config.output_prefix, key)
        paths += dataset_files(prefix)
        if config.sft:
            paths += dataset_files(prefix + LOSS_MASK_SUFFIX)
    return paths + [config.output_prefix + ".json"]


def plan(config: PreprocessConfig) -> _Plan:
    """Check every flag, the tokenizer and the input files before any work; raise UsageError naming them."""
    if not config.output_prefix or config.output_prefix.endswith(os.sep):
        raise UsageError(f"--output-prefix must name files, e.g. data/corpus; got {config.output_prefix!r}")
    keys = list(config.json_keys)
    if not keys or len(set(keys)) != len(keys) or not all(keys):
        raise UsageError(f"--json-keys must be distinct non-empty names; got {keys}")
    if config.sft and len(keys) != 1:
        raise UsageError(f"--json-keys: --sft writes one dataset, give one name (got {keys})")
    if config.sft and not config.append_eod:
        raise UsageError("--no-append-eod: --sft always closes each response with the EOD token")
    if config.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {config.workers}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {config.batch_size}")
    if config.text_sample_by not in TEXT_SAMPLE_BY:
        raise UsageError(
            f"--text-sample-by must be one of {', '.join(TEXT_SAMPLE_BY)}; got {config.text_sample_by!r}"
        )
    files = [f for f in resolve_inputs(config.inputs) if os.path.getsize(f) > 0]
    if not files:
        raise UsageError(f"--input: every input file is empty ({', '.join(config.inputs)})")
    fmt = detect_format(files, config.input_format)
    if fmt == "text" and keys != ["text"] and not config.sft:
        raise UsageError(f"--json-keys: text input has one field, 'text'; got {keys}")
    if fmt == "text" and config.sft:
        raise UsageError("--sft needs JSONL or Parquet records (messages or prompt/response), not text")
    columns = peek_columns(files, fmt)
    if columns is not None:
        check_columns(columns, config)
    outputs = output_paths(config)
    refuse_existing(outputs, config.overwrite)
    tokenizer_dir = check_tokenizer_dir(config.tokenizer_model)
    tokenizer = load_tokenizer(tokenizer_dir)
    special = special_token_ids(tokenizer, [chat.USER, chat.ASSISTANT]) if config.sft else {}
    eod = eod_id(tokenizer)
    vocab_size = len(tokenizer)
    check_inputs(files, fmt, progress=config.progress)  # the one full pass; last, after the cheap checks
    return _Plan(
        files=files, fmt=fmt, tokenizer_dir=tokenizer_dir, vocab_size=vocab_size, eod=eod,
        prefixes={k: dataset_prefix(config.output_prefix, k) for k in keys},
        outputs=outputs, sidecar=config.output_prefix + ".json", special=special,
    )


def preprocess(config: PreprocessConfig) -> dict:
    """Run the preprocessing; returns the sidecar's contents (counts per dataset).

    Raises `UsageError` for bad flags or input, and (`strict`) for records lacking a needed key.
    """
    run = plan(config)
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    if not config.progress:
        datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="emoe-preprocess-") as cache_dir:
            records = load_records(run.files, run.fmt, cache_dir=cache_dir, text_sample_by=config.text_sample_by)
            fields = check_columns(list(records.column_names), config)
            needs = _needed_columns(config, fields)
            missing = _count_missing(records, needs)
            if config.strict and any(missing.values()):
                raise UsageError(_missing_message(run, needs, missing, len(records)))
            num_records = len(records)
            encoded = _encode(records, config, run, fields)
            stats = _write(encoded, config, run)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    for key, counts in stats.items():  # missing records were encoded as empty documents
        counts["skipped_missing"] = missing[key]
        counts["skipped_empty"] -= missing[key]
        if config.sft:
            counts["conversation"] = fields.describe()
    sidecar_dir = os.path.dirname(os.path.abspath(run.sidecar))
    sidecar = {
        "kind": "sft" if config.sft else "pretrain",
        "tokenizer": portable_path(run.tokenizer_dir, sidecar_dir),
        "vocab_size": run.vocab_size,
        "eod": run.eod,
        "dtype": numpy.dtype(run.dtype).name,
        "num_records": num_records,
        "num_documents": sum(s["num_documents"] for s in stats.values()),
        "num_tokens": sum(s["num_tokens"] for s in stats.values()),
        "datasets": stats,
        "inputs": [portable_path(p, sidecar_dir) for p in run.files],
        "input_format": run.fmt,
    }
    write_json_atomic(run.sidecar, sidecar)
    return sidecar


def check_columns(columns: list[str], config: PreprocessConfig) -> chat.ConversationFields | None:
    """The data has the `--json-keys` (or, with --sft, a conversation layout); returns the SFT fields."""
    if config.sft:
        return chat.detect_fields(
            columns, messages_key=config.messages_key, prompt_key=config.prompt_key,
            response_key=config.response_key, system_key=config.system_key,
        )
    missing = [k for k in config.json_keys if k not in columns]
    if missing:
        raise UsageError(f"--json-keys: {', '.join(missing)} not in the data (columns: {', '.join(columns)})")
    return None


def missing_summary(sidecar: dict) -> str | None:
    """One line on the records skipped for lacking a needed key, or None when none were."""
    parts = []
    for key, counts in sidecar["datasets"].items():
        if counts.get("skipped_missing"):
            what = f"--json-keys {key!r}"
            if "conversation" in counts:
                what = f"the conversation columns {counts['conversation']}"
            parts.append(f"{counts['skipped_missing']} of {sidecar['num_records']} records lack {what}")
    if not parts:
        return None
    return "; ".join(parts) + " (absent or null) and were skipped; --strict refuses them"


def _needed_columns(
    config: PreprocessConfig, fields: chat.ConversationFields | None
) -> dict[str, tuple[str, list[str]]]:
    """Per output dataset: how to name what a record needs, and the columns it needs (present, not null)."""
    if not config.sft:
        return {key: (f"--json-keys {key!r}", [key]) for key in config.json_keys}
    if fields.messages:
        return {config.json_keys[0]: (f"the messages column {fields.messages!r}", [fields.messages])}
    return {config.json_keys[0]: (
        f"the prompt or response column ({fields.prompt!r}, {fields.response!r})", [fields.prompt, fields.response]
    )}


def _count_missing(records, needs: dict[str, tuple[str, list[str]]]) -> dict[str, int]:
    """Records per output dataset with a needed column absent or null (Arrow null counts, no Python loop)."""
    counts = {}
    for key, (_, columns) in needs.items():
        lacking = None
        for column in columns:
            nulls = pc.is_null(records.data.column(column))
            lacking = nulls if lacking is None else pc.or_(lacking, nulls)
        counts[key] = int(pc.sum(lacking).as_py() or 0)
    return counts


def _missing_message(run: _Plan, needs: dict, missing: dict[str, int], total: int, show_files: int = 4) -> str:
    """The --strict refusal: counts, and which files (and lines or rows) hold the records lacking a key."""
    parts = []
    for key, count in missing.items():
        if not count:
            continue
        what, columns = needs[key]
        found, unknown = [], []
        for path in run.files:
            located = records_lacking(path, run.fmt, lambda r: any(r.get(c) is None for c in columns), columns)
            if located is None:
                unknown.append(path)
            elif located[0]:
                places = ", ".join(located[1]) + (", ..." if located[0] > len(located[1]) else "")
                found.append(f"{path}: {located[0]} ({places})")
        where = found[:show_files] + ([f"{len(found) - show_files} more files"] if len(found) > show_files else [])
        if unknown:
            where.append(f"maybe in {', '.join(unknown)}")
        parts.append(f"{count} of {total} records lack {what} (absent or null) in {'; '.join(where)}")
    return "--strict: " + "; ".join(parts) + "; fix the input, or drop --strict to skip (and count) them"


def _encode(records, config: PreprocessConfig, run: _Plan, fields: chat.ConversationFields | None):
    """`datasets.map` the records into `ids_<key>` (and `mask_<key>` for SFT) columns."""
    columns = list(records.column_names)
    if config.sft:
        function = _EncodeConversations(run.tokenizer_dir, config.json_keys[0], fields, run.special, run.eod)
        desc = f"Tokenizing conversations ({fields.describe()})"
    else:
        function = _EncodeText(run.tokenizer_dir, list(config.json_keys), run.eod, config.append_eod)
        desc = "Tokenizing " + ", ".join(config.json_keys)
    return records.map(
        function, batched=True, batch_size=config.batch_size, remove_columns=columns,
        num_proc=config.workers if config.workers > 1 else None, desc=desc,
    )


def _write(encoded, config: PreprocessConfig, run: _Plan) -> dict[str, dict]:
    """Write every key's documents (skipping empty ones) to staged files, then rename all into place."""
    writers: dict[str, list[StagedIndexedDataset]] = {}
    try:
        for key, prefix in run.prefixes.items():
            writers[key] = [StagedIndexedDataset(prefix, run.dtype)]
            if config.sft:
                writers[key].append(StagedIndexedDataset(prefix + LOSS_MASK_SUFFIX, numpy.uint8))
        skipped = {key: 0 for key in run.prefixes}
        loss_tokens = {key: 0 for key in run.prefixes}
        with tqdm(total=len(encoded), desc="Writing documents", unit="doc", disable=not config.progress) as bar:
            for batch in encoded.iter(batch_size=config.batch_size):
                for key, (tokens, *mask) in writers.items():
                    for i, ids in enumerate(batch[f"ids_{key}"]):
                        if not ids:
                            skipped[key] += 1
                            continue
                        tokens.add_document(numpy.asarray(ids, dtype=numpy.int64))
                        if mask:
                            values = numpy.asarray(batch[f"mask_{key}"][i], dtype=numpy.uint8)
                            mask[0].add_document(values)
                            loss_tokens[key] += int(values.sum())
                bar.update(len(batch[next(iter(batch))]))
        for staged in writers.values():
            for writer in staged:
                writer.finalize()
        for staged in writers.values():
            for writer in staged:
                writer.commit()
    except BaseException:
        for staged in writers.values():
            for writer in staged:
                writer.discard()
        raise
    return {
        key: {
            "prefix": os.path.basename(run.prefixes[key]),
            "num_documents": staged[0].num_documents,
            "num_tokens": staged[0].num_tokens,
            "skipped_empty": skipped[key],
            **({"num_loss_tokens": loss_tokens[key]} if config.sft else {}),
        }
        for key, staged in writers.items()
    }


class _EncodeText:
    """Batched map function: each key's text -> token ids (+ EOD); loads the tokenizer per worker."""

    def __init__(self, tokenizer_dir: str, keys: list[str], eod: int, append_eod: bool) -> None:
        self.tokenizer_dir, self.keys, self.eod, self.append_eod = tokenizer_dir, keys, eod, append_eod

    def __call__(self, batch: dict) -> dict:
        tokenizer = load_tokenizer(self.tokenizer_dir)
        out = {}
        for key in self.keys:
            texts = [_as_text(t, key) for t in batch[key]]
            ids = encode(tokenizer, texts)
            tail = [self.eod] if self.append_eod else []
            out[f"ids_{key}"] = [(x + tail) if text else [] for x, text in zip(ids, texts)]
        return out


class _EncodeConversations:
    """Batched map function: records -> conversation token ids and response masks."""

    def __init__(self, tokenizer_dir, key, fields, special, eod) -> None:
        self.tokenizer_dir, self.key, self.fields, self.special, self.eod = (
            tokenizer_dir, key, fields, special, eod,
        )

    def __call__(self, batch: dict) -> dict:
        tokenizer = load_tokenizer(self.tokenizer_dir)
        size = len(batch[next(iter(batch))])
        rows = [{column: values[i] for column, values in batch.items()} for i in range(size)]
        conversations = [chat.record_turns(row, self.fields) for row in rows]
        special = dict(self.special)
        if any(role == "system" for turns in conversations for role, _ in turns):
            special.update(special_token_ids(tokenizer, [chat.SYSTEM]))
        ids, masks = chat.render_batch(tokenizer, conversations, special, self.eod)
        return {f"ids_{self.key}": ids, f"mask_{self.key}": masks}


def _as_text(value, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"--json-keys: field {key!r} holds {type(value).__name__}, not text")
    return value
