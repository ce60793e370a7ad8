"""Downstream tasks (EleutherAI lm-eval) on a megatron-emoe checkpoint at one or more budgets k'.

    emoe-lm-eval --load CKPT --tasks emoe_mc --budgets 1 2 4 --output results.json
    emoe-lm-eval --load CKPT --tasks emoe_mc --active-experts 1 2 --active-experts 4

`--budgets K ...` runs once per value (every MoE layer at K); each `--active-experts K [K ...]` is
one more run (one value for all MoE layers, or one per MoE layer). Without either: the training
top-k. The model is loaded once, in one process at TP=1, EP=1 (any saved layout reshards), and the
budget changes between runs. The shipped offline task folder (`emoe_mc`, 60 four-way questions) is
always included; `--include-path` adds task folders. Bad flags exit with status 2 and a one-line
error before any model is built. The JSON has the metrics of every task at every budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version

import torch

from megatron_emoe.budget import Budget
from megatron_emoe.layers import decoder_moe_layers
from megatron_emoe.errors import ArgumentParser, UsageError, exits_on_usage_error
from megatron_emoe.evaluation.lm_eval_adapter import (
    MegatronEMoELM,
    evaluate_budgets,
    task_manager,
    unknown_tasks,
)
from megatron_emoe.files import write_text_atomically
from megatron_emoe.runtime.saved_args import checkpoint_args, checkpoint_config
from megatron_emoe.runtime.launch import local_backend, run_ranks

PROG = "emoe-lm-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Megatron torch_dist checkpoint folder (any TP/EP layout)")
    parser.add_argument("--tasks", nargs="+", default=["emoe_mc"],
                        help="lm-eval task, group or tag names (space- or comma-separated; default emoe_mc)")
    parser.add_argument("--active-experts", type=int, nargs="+", action="append", default=[], metavar="K",
                        help="one run at this budget: one K for every MoE layer or one per MoE layer; repeatable")
    parser.add_argument("--budgets", type=int, nargs="+", default=[], metavar="K",
                        help="one run per K, every MoE layer at K (e.g. --budgets 1 2 4)")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="extra lm-eval task folder (repeatable; the shipped tasks are always included)")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="new tokens per generation at most")
    parser.add_argument("--tokenizer-model", default=None,
                        help="Hugging Face tokenizer folder (default: the checkpoint's --tokenizer-model)")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's random seed (few-shot sampling)")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser


def check(args: argparse.Namespace):
    """Validate every flag without building a model; returns (budgets, transformer config, task manager)."""
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                               ("--batch-size", args.batch_size, 1), ("--max-gen-toks", args.max_gen_toks, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    saved = checkpoint_args(args.load)
    config = checkpoint_config(saved)
    budgets = []
    for flag, values in [("--budgets", [k]) for k in args.budgets] + \
                        [("--active-experts", ks) for ks in args.active_experts]:
        budgets.append(Budget.of(values, flag=flag).validate(config, flag=flag))
    tokenizer = args.tokenizer_model or saved.tokenizer_model
    if not tokenizer or not os.path.isdir(tokenizer):
        raise UsageError(f"--tokenizer-model {tokenizer}: not a tokenizer folder"
                         + ("" if args.tokenizer_model else " (the checkpoint's; pass --tokenizer-model)"))
    for folder in args.include_path:
        if not os.path.isdir(folder):
            raise UsageError(f"--include-path {folder}: not a folder")
    if args.output and os.path.isdir(args.output):
        raise UsageError(f"--output {args.output}: is a folder, give a file name")
    manager = task_manager(args.tasks, args.include_path)
    missing = unknown_tasks(manager, args.tasks)
    if missing:
        raise UsageError(f"--tasks: unknown task {', '.join(missing)} (not in the shipped tasks, "
                         f"--include-path or lm-eval's own)")
    return budgets or [None], config, manager


def _evaluate_rank(rank, args, budgets, manager, runs):
    """Body of the one gloo rank: load the checkpoint once, evaluate every budget."""
    print(f"[lm-eval] loading {args.load} (TP=1, EP=1)", flush=True)
    with MegatronEMoELM(load=args.load, tokenizer_model=args.tokenizer_model, batch_size=args.batch_size,
                        max_gen_toks=args.max_gen_toks) as lm:
        runs.extend(evaluate_budgets(
            lm, budgets, args.tasks, manager, log=lambda line: print(line, flush=True),
            limit=args.limit, num_fewshot=args.num_fewshot, random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed))


@exits_on_usage_error(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.tasks = [name for item in args.tasks for name in item.split(",") if name]
    budgets, config, manager = check(args)

    runs: list[dict] = []
    run_ranks(_evaluate_rank, world_size=1, backend=local_backend(1, torch.cuda.device_count()),
              args=(args, budgets, manager, runs), timeout=24 * 3600)
    report = {
        "load": os.path.abspath(args.load), "tasks": args.tasks, "limit": args.limit,
        "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "seed": args.seed,
        "num_experts": config.num_moe_experts, "moe_router_topk": config.moe_router_topk,
        "moe_layers": decoder_moe_layers(config), "lm_eval_version": version("lm_eval"),
        "runs": runs,
    }
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_text_atomically(args.output, json.dumps(report, indent=2) + "\n")
        print(f"[lm-eval] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
