"""The `<output-prefix>.json` written next to preprocessed data: tokenizer, vocabulary, counts, kind."""

from __future__ import annotations

import json
import os

KINDS = ("pretrain", "sft")


def portable_path(path: str, base_dir: str) -> str:
    """`path` relative to `base_dir` when it lies inside it (so a moved folder stays valid), else absolute."""
    path, base_dir = os.path.abspath(path), os.path.abspath(base_dir)
    inside = os.path.commonpath([path, base_dir]) == base_dir
    return os.path.relpath(path, base_dir) if inside else path


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON to `<path>.tmp-<pid>` and rename it into place."""
    staged = f"{path}.tmp-{os.getpid()}"
    with open(staged, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(staged, path)


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
