"""Build (once) and locate the embedded default data: stdlib corpus, BPE tokenizer, indexed datasets.

Layout of the folder (default `data/default` in the repo, or $MEGATRON_EMOE_DATA):

    manifest.json                      inputs (python, stdlib file-list hash, parameters) and counts
    tokenizer/                         byte-level BPE, Hugging Face format
    raw/{pretrain,sft}_{train,valid}.jsonl
    pretrain_{train,valid}.json        sidecars, and pretrain_{train,valid}_text_document.bin/.idx
    sft_{train,valid}.json             sidecars, and sft_{train,valid}_text_document[_lossmask].bin/.idx

The whole folder is built under a temporary name next to it and renamed into place at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import tokenizers

from megatron_emoe.data import default_corpus
from megatron_emoe.data.bpe import MIN_VOCAB_SIZE, SPECIAL_TOKENS, train_bpe_tokenizer
from megatron_emoe.data.preprocess import PreprocessConfig, preprocess
from megatron_emoe.data.sidecar import write_json_atomic
from megatron_emoe.errors import UsageError

BUILDER = "megatron-emoe default data"
VERSION = 2  # bump whenever the builder would write different bytes for the same inputs
ENV_VAR = "MEGATRON_EMOE_DATA"
DEFAULT_CORPUS_BYTES = 8_000_000
DEFAULT_VOCAB_SIZE = 4096
SPLITS = ("train", "valid")
KEY = "text"


def default_output_dir() -> Path:
    """$MEGATRON_EMOE_DATA, else `data/default` in this checkout, else ~/.cache/megatron_emoe/default."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "setup.py").is_file() and (repo / "megatron_emoe").is_dir():
        return repo / "data" / "default"
    return Path.home() / ".cache" / "megatron_emoe" / "default"


def data_paths(output_dir: str | os.PathLike) -> dict[str, str]:
    """Absolute paths of the tokenizer folder and the four dataset prefixes in `output_dir`."""
    out = Path(output_dir).resolve()
    paths = {"output_dir": str(out), "manifest": str(out / "manifest.json"),
             "tokenizer_model": str(out / "tokenizer")}
    for kind in ("pretrain", "sft"):
        for split in SPLITS:
            paths[f"{kind}_{split}"] = str(out / f"{kind}_{split}_{KEY}_document")
    return paths


def build_inputs(corpus_bytes: int, vocab_size: int) -> dict:
    """What the data is a function of; a manifest with equal `inputs` needs no rebuild."""
    files = default_corpus.stdlib_files(default_corpus.stdlib_root())
    return {
        "builder": BUILDER, "version": VERSION,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "stdlib_files": len(files), "stdlib_files_sha256": default_corpus.fingerprint(files),
        "tokenizers": tokenizers.__version__,
        "corpus_bytes": corpus_bytes, "vocab_size": vocab_size,
    }


def ensure_default_data(
    output_dir: str | os.PathLike | None = None, *, corpus_bytes: int = DEFAULT_CORPUS_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE, workers: int | None = None, progress: bool = False,
) -> dict[str, str]:
    """Paths of the default data (see `data_paths`), building it first unless the manifest matches."""
    return build_default_data(
        output_dir, corpus_bytes=corpus_bytes, vocab_size=vocab_size, workers=workers,
        overwrite=False, progress=progress,
    )


def build_default_data(
    output_dir: str | os.PathLike | None = None, *, corpus_bytes: int = DEFAULT_CORPUS_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE, workers: int | None = None, overwrite: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Build the default data into `output_dir` (cached: skipped when current unless `overwrite`)."""
    if corpus_bytes < 1:
        raise UsageError(f"--corpus-bytes must be >= 1; got {corpus_bytes}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + 5 special tokens); got {vocab_size}")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers must be >= 1; got {workers}")
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (e.g. several ranks)
        inputs = build_inputs(corpus_bytes, vocab_size)
        current = _read_manifest(out)
        if current is None and out.exists() and any(out.iterdir()):
            raise UsageError(
                f"--output-dir: {out} is not empty and holds no default-data manifest.json; "
                "choose a new or empty folder"
            )
        if current is not None and not overwrite and _is_current(out, current, inputs):
            print(f"Default data is up to date in {out}")
            return data_paths(out)
        start = time.time()
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        stage.chmod(0o755)  # mkdtemp makes it private; the data folder is not
        try:
            manifest = _build(stage, inputs, corpus_bytes, vocab_size, workers, progress)
            _replace_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        corpus = manifest["corpus"]
        tokens = sum(d["num_tokens"] for d in manifest["datasets"].values())
        print(
            f"Built default data in {out} in {time.time() - start:.1f}s: {corpus['files']} stdlib files, "
            f"{corpus['bytes'] / 1e6:.1f} MB text, {tokens:,} tokens, vocab {manifest['tokenizer']['vocab_size']}"
        )
        return data_paths(out)


def _build(stage: Path, inputs: dict, corpus_bytes: int, vocab_size: int, workers: int, progress: bool) -> dict:
    """Corpus -> raw JSONL -> tokenizer -> four preprocessed datasets -> manifest, all inside `stage`."""
    root = default_corpus.stdlib_root()
    corpus = default_corpus.build_corpus(root, default_corpus.stdlib_files(root), corpus_bytes)
    raw = stage / "raw"
    raw.mkdir()
    for split in SPLITS:
        _write_jsonl(raw / f"pretrain_{split}.jsonl", corpus.text[split])
        _write_jsonl(raw / f"sft_{split}.jsonl", corpus.sft[split])
    tokenizer = train_bpe_tokenizer(
        (doc["text"] for doc in corpus.text["train"]), str(stage / "tokenizer"), vocab_size=vocab_size
    )
    datasets = {}
    for kind in ("pretrain", "sft"):
        for split in SPLITS:
            name = f"{kind}_{split}"
            sidecar = preprocess(PreprocessConfig(
                inputs=[str(raw / f"{name}.jsonl")], output_prefix=str(stage / name),
                tokenizer_model=str(stage / "tokenizer"), json_keys=[KEY], sft=kind == "sft",
                workers=workers, progress=progress,
            ))
            datasets[name] = {"kind": kind, "sidecar": f"{name}.json", **sidecar["datasets"][KEY]}
    manifest = {
        "inputs": inputs,
        "tokenizer": {
            "path": "tokenizer", "vocab_size": len(tokenizer), "eod": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id, "special_tokens": list(SPECIAL_TOKENS),
        },
        "datasets": datasets,
        "corpus": corpus.stats(),
        "files": {
            p.relative_to(stage).as_posix(): p.stat().st_size
            for p in sorted(stage.rglob("*")) if p.is_file()
        },
    }
    write_json_atomic(str(stage / "manifest.json"), manifest)
    return manifest


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def _read_manifest(out: Path) -> dict | None:
    try:
        with open(out / "manifest.json", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("inputs", {}).get("builder") == BUILDER else None


def _is_current(out: Path, manifest: dict, inputs: dict) -> bool:
    """Same inputs, and every file the manifest lists is there with its size."""
    if manifest.get("inputs") != inputs:
        return False
    return all(
        (out / rel).is_file() and (out / rel).stat().st_size == size
        for rel, size in manifest.get("files", {}).items()
    )


def _replace_dir(stage: Path, out: Path) -> None:
    """Move the finished `stage` to `out`; an older build there is moved aside, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
