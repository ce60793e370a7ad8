"""Load a task's JSON/JSONL files with the `json` dataset builder, paths relative to this folder.

lm-eval hands `dataset_kwargs` to a task's `custom_dataset`; resolving `data_files` here (not
against the working directory) lets the shipped task run from anywhere, offline.
"""

from __future__ import annotations

import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def resolve(data_files, folder: str = HERE):
    """`data_files` (a path, a list, or split -> path(s)) with relative paths joined to `folder`."""
    if isinstance(data_files, str):
        return data_files if os.path.isabs(data_files) else os.path.join(folder, data_files)
    if isinstance(data_files, dict):
        return {split: resolve(files, folder) for split, files in data_files.items()}
    return [resolve(files, folder) for files in data_files]


def load(data_files, **_metadata):
    """A `datasets.DatasetDict` with one split per `data_files` key (local files only)."""
    return datasets.load_dataset("json", data_files=resolve(data_files))
