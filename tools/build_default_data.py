#!/usr/bin/env python3
"""Build the embedded default data from this machine's Python standard library (cached).

    python tools/build_default_data.py [--output-dir DIR] [--overwrite]

Writes a byte-level BPE tokenizer, pretraining text and instruction (SFT) datasets, train and
valid, into data/default/ (or --output-dir, or $MEGATRON_EMOE_DATA). Does nothing when the
manifest there matches the current inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emoe.data.default_data import (
    DEFAULT_CORPUS_BYTES,
    DEFAULT_VOCAB_SIZE,
    ENV_VAR,
    build_default_data,
)


def build_parser() -> argparse.ArgumentParser:
    """The flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default=None,
                   help=f"Data folder (default: ${ENV_VAR}, else data/default in the repo).")
    p.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES,
                   help="Text budget: stdlib files are taken until code + docstrings reach it.")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size.")
    p.add_argument("--workers", type=int, default=None, help="Tokenizer processes (default: up to 2).")
    p.add_argument("--overwrite", action="store_true", help="Rebuild even when the data is current.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Build (or find) the data and print its paths as JSON."""
    args = build_parser().parse_args(argv)
    try:
        paths = build_default_data(
            args.output_dir, corpus_bytes=args.corpus_bytes, vocab_size=args.vocab_size,
            workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(paths, indent=2))
    return paths


if __name__ == "__main__":
    main()
