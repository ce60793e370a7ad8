"""Build the embedded default data from this machine's Python standard library (cached).

    emoe-build-default-data [--output-dir DIR] [--overwrite]

Writes a byte-level BPE tokenizer, pretraining text and instruction (SFT) datasets, train and
valid, into data/default/ (or --output-dir, or $MEGATRON_EMOE_DATA). Does nothing when the
manifest there matches the current inputs. Prints the paths as JSON; bad flags exit with status 2
and one line on stderr naming the flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megatron_emoe.data.default_data import (
    DEFAULT_CORPUS_BYTES,
    DEFAULT_VOCAB_SIZE,
    ENV_VAR,
    build_default_data,
)
from megatron_emoe.errors import ArgumentParser, exits_on_usage_error

PROG = "emoe-build-default-data"


def build_parser() -> argparse.ArgumentParser:
    """The flags."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default=None,
                   help=f"Data folder (default: ${ENV_VAR}, else data/default in the repo).")
    p.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES,
                   help="Text budget: stdlib files are taken until code + docstrings reach it.")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size.")
    p.add_argument("--workers", type=int, default=None, help="Tokenizer processes (default: up to 2).")
    p.add_argument("--overwrite", action="store_true", help="Rebuild even when the data is current.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    return p


@exits_on_usage_error(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Build (or find) the data and print its paths as JSON; returns 0. Bad flags: one line, exit 2."""
    args = build_parser().parse_args(argv)
    paths = build_default_data(
        args.output_dir, corpus_bytes=args.corpus_bytes, vocab_size=args.vocab_size,
        workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
