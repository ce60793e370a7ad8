"""The `<output-prefix>.json` written next to preprocessed data: tokenizer, vocabulary, counts, kind."""

from __future__ import annotations

import json
import os

from megatron_emoe.files import write_text_atomically

KINDS = ("pretrain", "sft")


def portable_path(path: str, base_dir: str) -> str:
    """`path` relative to `base_dir` when it lies inside it (so a moved folder stays valid), else absolute."""
    path, base_dir = os.path.abspath(path), os.path.abspath(base_dir)
    inside = os.path.commonpath([path, base_dir]) == base_dir
    return os.path.relpath(path, base_dir) if inside else path


def write_json_atomic(path: str, payload: dict) -> None:
    """Write `payload` as sorted, indented JSON through a temporary file and a rename."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def find_sidecar(prefix: str) -> tuple[str, dict] | None:
    """The sidecar describing dataset prefix `<output-prefix>_<key>_document`, with its entry, if any."""
    base = prefix.removesuffix("_document")
    name = os.path.basename(prefix)
    cut = len(base)
    while (cut := base.rfind("_", 0, cut)) > 0:
        path = base[:cut] + ".json"
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    sidecar = json.load(f)
            except (OSError, ValueError):
                continue
            entries = sidecar.get("datasets", {})
            if any(entry.get("prefix") == name for entry in entries.values()):
                return path, sidecar
    return None


def sidecar_tokenizer(path: str, sidecar: dict) -> str | None:
    """The absolute tokenizer path recorded in a sidecar (stored relative to the sidecar's folder)."""
    tokenizer = sidecar.get("tokenizer")
    if tokenizer is None:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), tokenizer))
