"""Checks of data prefixes against the run, done before any training work: files present, same tokenizer."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

import numpy
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import DType

from megatron_emoe.data.indexed import LOSS_MASK_SUFFIX, sequence_lengths
from megatron_emoe.data.sidecar import find_sidecar, sidecar_tokenizer
from megatron_emoe.errors import UsageError

_IDX_DTYPE_OFFSET = 17  # 9-byte magic + 8-byte version, then one byte: the dtype code


def check_data_prefixes(
    prefixes: Iterable[str], *, tokenizer_vocab_size: int, sft: bool, flag: str = "--data-path"
) -> None:
    """Raise a ValueError naming `flag` if a prefix lacks its files or was made with another tokenizer.

    `prefixes` may hold Megatron blend weights ("0.3 a 0.7 b"); numbers are skipped.
    `tokenizer_vocab_size` is the unpadded size (Megatron's `tokenizer.vocab_size`, `len(hf_tokenizer)`).
    """
    for prefix in prefixes:
        if _is_number(prefix):
            continue
        _check_files(prefix, flag, what="data")
        if sft:
            _check_files(prefix + LOSS_MASK_SUFFIX, flag, what="SFT loss mask (--sft-packed)")
            if not numpy.array_equal(sequence_lengths(prefix), sequence_lengths(prefix + LOSS_MASK_SUFFIX)):
                raise UsageError(
                    f"{flag}: {prefix}{LOSS_MASK_SUFFIX} does not match {prefix} document for document; "
                    "re-run emoe-preprocess-data --sft"
                )
        _check_vocab(prefix, tokenizer_vocab_size, flag)


def check_split_has_documents(prefixes: Iterable[str], split: str, needed: Sequence[bool]) -> None:
    """Raise naming --split when a train/valid/test split that the run draws samples from
    (`needed`, in that order) gets no document of a `--data-path` prefix: Megatron would loop
    forever building that split's sample index."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        if _is_number(prefix):
            continue
        documents = len(sequence_lengths(prefix))
        for name, bounds, wanted in zip(("train", "validation", "test"), matrix, needed):
            if not wanted or bounds is None:
                continue
            begin, end = (int(round(b * documents)) for b in bounds)
            if end <= begin:
                raise UsageError(
                    f"--split {split} leaves the {name} split of {prefix} ({documents} documents) "
                    f"empty: give it a share of at least 1/{documents}, give it 0 (e.g. --split "
                    "98,2,0), or pass --train-data-path/--valid-data-path"
                )


def max_token_id(prefix: str) -> int:
    """Largest token id in `<prefix>.bin` (-1 when empty), scanned with numpy in chunks."""
    with open(prefix + ".idx", "rb") as f:
        f.seek(_IDX_DTYPE_OFFSET)
        code = struct.unpack("<B", f.read(1))[0]
    dtype = DType.dtype_from_code(code)
    if os.path.getsize(prefix + ".bin") == 0:
        return -1
    values = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    chunk = 1 << 24
    return int(max(values[i : i + chunk].max() for i in range(0, len(values), chunk)))


def _check_files(prefix: str, flag: str, what: str) -> None:
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            hint = "write it with emoe-preprocess-data" + (" --sft" if "SFT" in what else "")
            raise UsageError(f"{flag}: missing {what} file {prefix}{suffix} ({hint})")


def _check_vocab(prefix: str, tokenizer_vocab_size: int, flag: str) -> None:
    found = find_sidecar(prefix)
    if found is not None and isinstance(found[1].get("vocab_size"), int):
        path, sidecar = found
        if sidecar["vocab_size"] != tokenizer_vocab_size:
            raise UsageError(
                f"{flag}: {prefix} was made with a tokenizer of {sidecar['vocab_size']} tokens "
                f"({sidecar_tokenizer(path, sidecar)}, per {path}) but the tokenizer has "
                f"{tokenizer_vocab_size}; --tokenizer-model must be the tokenizer the data was made with"
            )
        return
    largest = max_token_id(prefix)
    if largest >= tokenizer_vocab_size:
        raise UsageError(
            f"{flag}: {prefix} holds token id {largest} (so its tokenizer has at least {largest + 1} "
            f"tokens) but the tokenizer has {tokenizer_vocab_size}; --tokenizer-model must be the "
            "tokenizer the data was made with"
        )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
