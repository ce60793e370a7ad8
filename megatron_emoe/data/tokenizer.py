"""The Hugging Face tokenizer of the preprocessing: local loading, EOD and special-token ids, encoding."""

from __future__ import annotations

import functools
import os

from transformers import AutoTokenizer

from megatron_emoe.errors import UsageError

FLAG = "--tokenizer-model"


def check_tokenizer_dir(path: str, flag: str = FLAG) -> str:
    """The absolute tokenizer folder, or a ValueError naming `flag` when it cannot hold a tokenizer."""
    if not path or not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} is not a folder (a Hugging Face tokenizer saved locally)")
    names = set(os.listdir(path))
    if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}:
        raise UsageError(
            f"{flag}: {path} holds no tokenizer files (tokenizer.json / tokenizer_config.json)"
        )
    return os.path.abspath(path)


def load_tokenizer(path: str):
    """`AutoTokenizer` from a local folder (no network); cached per process until its files change."""
    stamp = tuple(
        (entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
        for entry in sorted(os.scandir(path), key=lambda e: e.name) if entry.is_file()
    )
    return _load_tokenizer(os.path.abspath(path), stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, stamp: tuple):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eod_id(tokenizer, flag: str = FLAG) -> int:
    """The EOD id: the tokenizer's eos token."""
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{flag}: the tokenizer has no eos token to use as end of document")
    return int(tokenizer.eos_token_id)


def special_token_ids(tokenizer, tokens, flag: str = FLAG) -> dict[str, int]:
    """Ids of special tokens that must each be one vocabulary entry, e.g. `<|user|>`."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise UsageError(
            f"{flag}: the tokenizer lacks the special token(s) {', '.join(missing)} that the SFT "
            "template uses; use a tokenizer that has them (e.g. emoe-build-default-data's)"
        )
    return {t: int(vocab[t]) for t in tokens}


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of raw texts: no BOS/EOS added, and special-token strings in the text stay plain text."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
