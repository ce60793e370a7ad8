"""Tokenize JSONL/Parquet/text files into Megatron indexed datasets (pretraining text or SFT chats).

    emoe-preprocess-data --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer-model data/default/tokenizer --workers 2
    emoe-preprocess-data --sft --input chats.jsonl --output-prefix data/chats \
        --tokenizer-model data/default/tokenizer

Writes <output-prefix>_<key>_document.bin/.idx (+ _lossmask with --sft) and <output-prefix>.json,
and prints that sidecar. Bad input (a flag, a file, a line that is not JSON or not UTF-8) exits with
status 2 and one line on stderr naming it. Records lacking a needed key are skipped and counted (one
warning line on stderr); --strict refuses them instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megatron_emoe.data.inputs import FORMATS, TEXT_SAMPLE_BY
from megatron_emoe.data.preprocess import PreprocessConfig, missing_summary, preprocess
from megatron_emoe.errors import ArgumentParser, exits_on_usage_error

PROG = "emoe-preprocess-data"


def build_parser() -> argparse.ArgumentParser:
    """The flags, Megatron-style (`--kebab-case`)."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="Input files or globs (JSONL, Parquet or plain text).")
    io.add_argument("--input-format", choices=FORMATS, default=None,
                    help="Format of all inputs (default: from the file extensions).")
    io.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                    help="Fields to tokenize, one dataset each (default: text). With --sft, the one "
                    "name of the output dataset.")
    io.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default="document",
                    help="Plain-text inputs: one document per file (default), paragraph or line.")
    io.add_argument("--output-prefix", required=True,
                    help="Output path prefix: writes <prefix>_<key>_document.bin/.idx and <prefix>.json.")
    io.add_argument("--overwrite", action="store_true", help="Replace outputs that already exist.")
    io.add_argument("--strict", action="store_true",
                    help="Refuse records lacking a --json-keys field (or, with --sft, the messages or "
                    "prompt/response) instead of skipping and counting them.")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-model", required=True, metavar="DIR",
                     help="Local Hugging Face tokenizer folder (loaded with AutoTokenizer, no network).")
    tok.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                     help="End every document with the tokenizer's eos token as EOD (default: on).")
    sft = p.add_argument_group("instruction data (--sft)")
    sft.add_argument("--sft", action="store_true",
                     help="Records are conversations: also write a loss mask (1 on response tokens "
                     "and the EOD closing each response).")
    sft.add_argument("--messages-key", default=None,
                     help="Column with a [{role, content}] list (default: messages or conversations).")
    sft.add_argument("--prompt-key", default=None,
                     help="Prompt column (default: detect instruction[/input], query, problem, ...).")
    sft.add_argument("--response-key", default=None,
                     help="Response column (default: detect output, response, solution, ...).")
    sft.add_argument("--system-key", default=None,
                     help="Optional system-prompt column (default: system or system_prompt if present).")
    run = p.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=1, help="Tokenizer processes (datasets.map num_proc).")
    run.add_argument("--batch-size", type=int, default=1000, help="Records per tokenizer batch.")
    run.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    return p


@exits_on_usage_error(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, preprocess, print the sidecar; returns 0. Bad input: one line, exit status 2."""
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys, input_format=args.input_format, text_sample_by=args.text_sample_by,
        append_eod=args.append_eod, sft=args.sft, messages_key=args.messages_key,
        prompt_key=args.prompt_key, response_key=args.response_key, system_key=args.system_key,
        workers=args.workers, batch_size=args.batch_size, overwrite=args.overwrite,
        progress=not args.no_progress, strict=args.strict,
    )
    sidecar = preprocess(config)
    print(json.dumps(sidecar, indent=2, sort_keys=True))
    summary = missing_summary(sidecar)
    if summary:
        print(f"{PROG}: warning: {summary}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
