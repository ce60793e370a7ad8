"""The embedded default corpus: this machine's Python standard library as code, prose and Q&A.

Deterministic: files in a fixed hash order up to a byte budget; code documents are whole source
files, prose documents their `ast` docstrings, instruction records ask for docstrings and module
summaries. Train/valid is split by a hash of each document's source file, so no docstring sits in
valid while the code around it is in train.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "encodings", "pydoc_data",  # generated codec tables and the pydoc topic dump
})
MAX_FILE_BYTES = 256_000
MIN_PROSE_CHARS = 40
SFT_DOC_CHARS = (20, 2000)
VALID_FRACTION = 0.05
SYSTEM_PROMPT = "You are an expert on the Python standard library."


@dataclass
class Corpus:
    """Documents and instruction records, each per split ("train", "valid")."""

    text: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "valid": []})
    sft: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "valid": []})
    files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    code_bytes: int = 0
    prose_bytes: int = 0

    def stats(self) -> dict:
        """Counts for the manifest."""
        kinds = [d["kind"] for docs in self.text.values() for d in docs]
        return {
            "files": len(self.files), "valid_files": self.valid_files,
            "code_documents": kinds.count("code"), "prose_documents": kinds.count("prose"),
            "code_bytes": self.code_bytes, "prose_bytes": self.prose_bytes,
            "bytes": self.code_bytes + self.prose_bytes,
            "documents": {split: len(docs) for split, docs in self.text.items()},
            "sft_records": {split: len(recs) for split, recs in self.sft.items()},
        }


def stdlib_root() -> Path:
    """This interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[tuple[str, int]]:
    """Sorted (posix relative path, size) of candidate `.py` files."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                size = path.stat().st_size
                if 0 < size <= MAX_FILE_BYTES:
                    found.append((path.relative_to(root).as_posix(), size))
    return sorted(found)


def fingerprint(files: list[tuple[str, int]]) -> str:
    """sha256 of the candidate file list (paths and sizes): changes when the stdlib does."""
    digest = hashlib.sha256()
    for rel, size in files:
        digest.update(f"{rel}\t{size}\n".encode())
    return digest.hexdigest()


def build_corpus(root: Path, files: list[tuple[str, int]], corpus_bytes: int) -> Corpus:
    """Take files in hash order until code + prose reach `corpus_bytes`; split train/valid by file."""
    corpus = Corpus()
    seen_prose: set[str] = set()
    extracted = []
    with_records = 0
    for rel in sorted((rel for rel, _ in files), key=lambda r: _hash("order", r)):
        if corpus.code_bytes + corpus.prose_bytes >= corpus_bytes and with_records >= 2:
            break  # budget reached, and both splits can get instruction records
        docs = extract_file(root, rel)
        if docs is None:
            continue
        code, prose, records = docs
        prose = [p for p in prose if p not in seen_prose]
        seen_prose.update(prose)
        corpus.code_bytes += len(code.encode())
        corpus.prose_bytes += sum(len(p.encode()) for p in prose)
        with_records += bool(records)
        extracted.append((rel, code, prose, records))
    corpus.files = [rel for rel, *_ in extracted]
    valid = _valid_files(extracted)
    corpus.valid_files = sorted(valid)
    for rel, code, prose, records in extracted:
        split = "valid" if rel in valid else "train"
        corpus.text[split].append({"text": code, "source": rel, "kind": "code"})
        corpus.text[split] += [{"text": p, "source": rel, "kind": "prose"} for p in prose]
        corpus.sft[split] += records
    return corpus


def _valid_files(extracted) -> set[str]:
    """Files in split-hash order until VALID_FRACTION of them and one with instruction records."""
    n_valid = max(1, round(VALID_FRACTION * len(extracted)))
    valid, has_records = set(), False
    for rel, _, _, records in sorted(extracted, key=lambda e: _hash("split", e[0])):
        if len(valid) >= len(extracted) - 1 or (len(valid) >= n_valid and has_records):
            break
        valid.add(rel)
        has_records |= bool(records)
    return valid


def extract_file(root: Path, rel: str) -> tuple[str, list[str], list[dict]] | None:
    """(source, docstrings, instruction records) of one file; None if it does not decode or parse."""
    try:
        source = (root / rel).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None
    prose = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_PROSE_CHARS:
                prose.append(doc)
    module = module_name(rel)
    if any(part.startswith("_") for part in module.split(".")):
        return source, prose, []  # private modules: no Q&A about them
    return source, prose, [_with_system(r, rel) for r in _records(tree, module, rel)]


def module_name(rel: str) -> str:
    """Dotted module name of a stdlib path: `json/decoder.py` -> `json.decoder`."""
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _records(tree: ast.Module, module: str, rel: str):
    """Q&A records: the module's summary, and the docstring of each public class/function/method."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        summary = doc.strip().split("\n\n")[0].strip()
        if len(summary) >= SFT_DOC_CHARS[0]:
            yield _record(f"What does the Python module `{module}` do?", summary, rel)
    yield from _definition_records(tree.body, module, rel)


def _definition_records(body, qualname: str, rel: str):
    for node in body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_"):
            continue
        name = f"{qualname}.{node.name}"
        doc = ast.get_docstring(node, clean=True)
        if doc and SFT_DOC_CHARS[0] <= len(doc) <= SFT_DOC_CHARS[1]:
            if isinstance(node, ast.ClassDef):
                prompt = f"Write the docstring of the class `{name}`."
            else:
                returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
                prompt = f"Write the docstring of `{name}({ast.unparse(node.args)}){returns}`."
            yield _record(prompt, doc, rel)
        if isinstance(node, ast.ClassDef):
            yield from _definition_records(node.body, name, rel)


def _record(prompt: str, answer: str, rel: str) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "source": rel,
    }


def _with_system(record: dict, rel: str) -> dict:
    """Half of the records (by hash) start with a fixed system prompt."""
    if int(_hash("system", record["messages"][0]["content"], rel)[:2], 16) % 2 == 0:
        record["messages"].insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return record


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
