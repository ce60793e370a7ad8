"""Flags of every app: Megatron-LM's own, the elastic-routing ones, and the training entry's few
extras; `--config FILE` expands a YAML mapping of flag names to values."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import yaml
from megatron.training.arguments import parse_args

from megatron_emoe.config import add_elastic_moe_args
from megatron_emoe.errors import UsageError


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`extra_args_provider` of the entry: elastic-routing flags plus the training extras."""
    _escape_bare_percents(parser)
    add_elastic_moe_args(parser)
    group = parser.add_argument_group(title="megatron-emoe training")
    group.add_argument(
        "--sft-packed", action="store_true",
        help="Data prefixes are instruction data written by emoe-preprocess-data --sft: "
        "documents are packed into sequences and only response tokens carry loss.",
    )
    group.add_argument(
        "--elastic-eval-budgets", type=int, nargs="+", default=None,
        help="After training, reload the saved checkpoint and report validation loss at each "
        "of these numbers of active experts (e.g. 1 2 3 4 5 6).",
    )
    group.add_argument(
        "--elastic-eval-output", type=str, default=None,
        help="JSON file for the --elastic-eval-budgets table (default: <save>/elastic_eval.json).",
    )
    group.add_argument(
        "--coactivation-dir", type=str, default=None,
        help="Record expert co-activation (tokens routed to both experts i and j, per MoE layer) "
        "in this folder: training matrices at each checkpoint save and at the end "
        "(train.npz, train_iter_N.npz, heatmaps in train/); with --elastic-eval-budgets also one "
        "per budget (eval_kK.npz) and the train-vs-eval Frobenius distances "
        "(coactivation_distance.json).",
    )
    group.add_argument(
        "--qk-layernorm-across-heads", action="store_true",
        help="With --qk-layernorm: normalise the whole query and key projections (all heads at "
        "once, as OLMoE does) instead of each head. Needs --tensor-model-parallel-size 1.",
    )
    group.add_argument(
        "--allow-overwrite-save", action="store_true",
        help="Allow --save to point at a folder holding a checkpoint this run does not resume "
        "from (its iterations would be overwritten).",
    )
    return parser


def _escape_bare_percents(parser: argparse.ArgumentParser) -> None:
    """argparse %-formats every help string, and a few of Megatron's contain a bare '%' (0.19.2:
    "headroom (e.g. 1.10 = 10%)"), which made `--help` crash; escape those, keep %(default)s."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"%%|%\(|%", lambda m: "%%" if m[0] == "%" else m[0], action.help)


def flags_argv(mapping: dict) -> list[str]:
    """argv from a mapping of flag names to values: `true` is a bare flag, false/None are left out."""
    argv: list[str] = []
    for name, value in mapping.items():
        flag = "--" + str(name).lstrip("-").replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def config_file_argv(path: str | os.PathLike) -> list[str]:
    """Turn a YAML mapping of Megatron flag names to values into argv (`true` = bare flag)."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            mapping = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(mapping, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    return flags_argv(mapping)


def expand_config_argv(argv: Sequence[str]) -> list[str]:
    """Replace `--config FILE` with the flags the file holds; flags given after it override them."""
    argv = list(argv)
    while "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UsageError("--config needs a YAML file")
        argv[i : i + 2] = config_file_argv(argv[i + 1])
    return argv


def parse_training_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse (without validating) the entry's flags from `argv` (default: sys.argv[1:])."""
    argv = expand_config_argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pretrain", *argv]
    try:
        return parse_args(extra_args_provider=add_training_args)
    finally:
        sys.argv = saved
