"""Hugging Face checkpoint folders: read safetensors one tensor at a time, write sharded output."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_emoe.conversion.families import ConversionError
from megatron_emoe.files import write_text_atomically

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied next to the weights so the output folder serves as-is (when the source has them).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class SafetensorsReader:
    """Lazy access to the tensors of an HF folder (memory-mapped; nothing is read until `get`)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._file_of = _tensor_files(folder)
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ConversionError(f"{self.folder}: tensor {name!r} is missing (partial checkpoint?)")
        path = os.path.join(self.folder, self._file_of[name])
        if path not in self._handles:
            if not os.path.isfile(path):
                raise ConversionError(f"{self.folder}: shard {self._file_of[name]} is missing")
            self._handles[path] = _open_shard(self.folder, self._file_of[name])
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as error:
            raise ConversionError(
                f"--hf-path {self.folder}: cannot read tensor {name!r} from "
                f"{self._file_of[name]} ({error}): the file is corrupt"
            ) from None


def _open_shard(folder: str, shard: str):
    """`safe_open` on a shard of `folder`; a truncated or garbled file (safetensors checks the
    header and that the file covers every tensor it lists) is a `ConversionError` naming it."""
    path = os.path.join(folder, shard)
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(
            f"--hf-path {folder}: {path} is truncated or corrupt ({error}): download it again"
        ) from None


def _tensor_files(folder: str) -> dict[str, str]:
    """Tensor name -> shard file, from the index, the single file, or every *.safetensors; every
    shard is opened (its header read) so that a missing, truncated or garbled one is refused now."""
    if not os.path.isdir(folder):
        raise ConversionError(f"--hf-path {folder}: no such folder")
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        return _indexed_files(folder, index)
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not shards:
        raise ConversionError(
            f"--hf-path {folder}: no safetensors weights (expected {SINGLE} or {INDEX}; "
            "convert .bin checkpoints with transformers' save_pretrained first)"
        )
    files = {}
    for shard in shards:
        with _open_shard(folder, shard) as f:
            files.update({name: shard for name in f.keys()})  # noqa: SIM118 (not iterable)
    return files


def _indexed_files(folder: str, index: str) -> dict[str, str]:
    """The index's weight map, once its JSON parses and each shard it names holds its tensors."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' is not a mapping of tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        what = "has no 'weight_map'" if isinstance(error, KeyError) else f"is not a valid index ({error})"
        raise ConversionError(f"--hf-path {folder}: {index} {what}") from None
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ConversionError(f"--hf-path {folder}: shard {shard} named in {INDEX} is missing "
                                  "(partial download?)")
        with _open_shard(folder, shard) as f:
            held = set(f.keys())  # noqa: SIM118 (not iterable)
        absent = sorted(name for name, file in weight_map.items() if file == shard and name not in held)
        if absent:
            raise ConversionError(
                f"--hf-path {folder}: {shard} lacks {len(absent)} tensors {INDEX} places there, "
                f"e.g. {absent[:3]} (partial download, or a stale index)"
            )
    return dict(weight_map)


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_bytes`, plus the HF index."""

    def __init__(self, folder: str, max_shard_bytes: int = 5 * 2**30):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self.folder, f".shard-{len(self._shards):05d}.safetensors")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as transformers does and write the index when there is more than one."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = [SINGLE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        for i, name in enumerate(names):
            os.replace(os.path.join(self.folder, f".shard-{i:05d}.safetensors"),
                       os.path.join(self.folder, name))
        if count > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_text_atomically(os.path.join(self.folder, INDEX), json.dumps(index, indent=2) + "\n")


def copy_side_files(source: str, destination: str, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """Copy config, generation and tokenizer files that exist in `source`; return their names."""
    copied = []
    for name in names:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(destination, name))
            copied.append(name)
    return copied


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
