"""Megatron indexed datasets written under temporary names and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_emoe.errors import UsageError

LOSS_MASK_SUFFIX = "_lossmask"


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron's naming of a preprocessed field: `<output-prefix>_<key>_document`."""
    return f"{output_prefix}_{key}_document"


def dataset_files(prefix: str) -> list[str]:
    """The `.bin` and `.idx` files of an indexed dataset prefix."""
    return [prefix + ".bin", prefix + ".idx"]


def sequence_lengths(prefix: str) -> numpy.ndarray:
    """Document lengths `[documents]` of an indexed dataset (copied before its index is unmapped)."""
    dataset = IndexedDataset(prefix, multimodal=False, mmap=False)
    lengths = numpy.array(dataset.sequence_lengths)
    del dataset
    return lengths


def refuse_existing(paths, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise before any work when an output already exists and `overwrite` is off."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise UsageError(f"output already exists: {shown}; pass {flag} to replace it")


class StagedIndexedDataset:
    """`IndexedDatasetBuilder` writing `<prefix>.bin/.idx.tmp-<pid>`; `commit()` renames them into place."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.final = dataset_files(prefix)
        self.staged = [f"{path}.tmp-{os.getpid()}" for path in self.final]
        self.builder = IndexedDatasetBuilder(self.staged[0], dtype=dtype)
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, values: numpy.ndarray) -> None:
        """Append one document `[tokens]` (one sequence per document, as GPTDataset expects)."""
        self.builder.add_document(values, [len(values)])
        self.num_documents += 1
        self.num_tokens += len(values)

    def finalize(self) -> None:
        """Close the `.bin` and write the `.idx` (still under the temporary names)."""
        self.builder.finalize(self.staged[1])

    def commit(self) -> None:
        """Rename the finished files to `<prefix>.bin/.idx` and drop Megatron's stale index cache."""
        for staged, final in zip(self.staged, self.final):
            os.replace(staged, final)
        # GPTDataset caches sample indices in `<prefix>/cache/` keyed by config, not by content.
        shutil.rmtree(os.path.join(self.prefix, "cache"), ignore_errors=True)

    def discard(self) -> None:
        """Remove the temporary files (after a failure)."""
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in self.staged:
            if os.path.exists(path):
                os.remove(path)
