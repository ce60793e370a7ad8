"""Validation loss / perplexity of a Megatron checkpoint at inference budgets.

  emoe-elastic-eval --load CKPT --output DIR [--budgets 1 2 3 4 5 6]
         [--layer-budgets 1-2-4-4 ...] [--allocation allocation.json]
         [--top-p 0.5 0.8 --top-p-max-experts 6] [--nproc N --expert-model-parallel-size N]
         [--valid-data-path PREFIX ...] [--eval-iters N] [--coactivation-dir DIR] [--overwrite]

Writes DIR/elastic_eval.json (every figure), elastic_eval.csv (one row per budget) and
elastic_eval.png (loss against active experts and against routed-expert FLOPs per token). The
checkpoint loads at any TP/EP layout; by default it is evaluated on its own validation data with
its own --eval-iters and batch size, i.e. the batches of the training loop's first evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from megatron_emoe import coactivation
from megatron_emoe.errors import ArgumentParser, UsageError, exits_on_usage_error
from megatron_emoe.evaluation import budget_specs, report
from megatron_emoe.evaluation.checkpoint_eval import (
    add_eval_arguments,
    needs_top_p,
    options_from_args,
    run_on_ranks,
    saved_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    group = parser.add_argument_group("budgets")
    group.add_argument("--budgets", type=int, nargs="*", default=None,
                       help="k' for every MoE layer (default 1 ... 3k, capped at the experts)")
    group.add_argument("--layer-budgets", nargs="+", default=[],
                       help="per-layer budgets, one per MoE layer, e.g. 1-2-4-4")
    group.add_argument("--allocation", default=None,
                       help="JSON from emoe-search-budget-allocation (its 'allocation')")
    group.add_argument("--top-p", type=float, nargs="+", default=[],
                       help="token-adaptive budgets: fewest experts whose router probability reaches p")
    group.add_argument("--top-p-max-experts", type=int, default=None,
                       help="cap of the top-p budgets (default 3k, capped at the experts)")
    parser.add_argument("--output", required=True, help="folder for elastic_eval.{json,csv,png}")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --output")
    return parser


def evaluate_all(evaluator, budgets) -> dict:
    """Rank body: every budget in turn, with a progress line each; the JSON-ready record."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    results = []
    for index, budget in enumerate(budgets, 1):
        start = time.time()
        result = evaluator.evaluate(budget)
        results.append(result.to_dict())
        if rank0:
            print(f"[{index}/{len(budgets)}] budget {result.label:>14}: val loss {result.val_loss:.4f}"
                  f" | ppl {result.perplexity:8.2f} | experts/token {result.active_experts:.2f}"
                  f" | {time.time() - start:.1f} s", flush=True)
    args = evaluator.args
    return {
        "checkpoint": os.path.abspath(evaluator.options.load),
        "iteration": args.iteration,
        "router_mode": getattr(args, "moe_router_mode", "topk"),
        "train_topk": evaluator.train_topk,
        "num_experts": evaluator.num_experts,
        "num_moe_layers": evaluator.num_moe_layers,
        "layout": {"nproc": evaluator.options.nproc,
                   "tensor_model_parallel_size": args.tensor_model_parallel_size,
                   "expert_model_parallel_size": args.expert_model_parallel_size,
                   "moe_token_dispatcher_type": args.moe_token_dispatcher_type},
        "valid_data_path": args.valid_data_path or args.data_path,
        "eval_iters": args.eval_iters,
        "global_batch_size": args.global_batch_size,
        "seq_length": args.seq_length,
        "results": results,
    }


@exits_on_usage_error("emoe-elastic-eval")
def main(argv=None) -> int:
    flags = build_parser().parse_args(argv)
    options = options_from_args(flags)
    saved = saved_args(options)
    options.check_against(saved)
    budgets = budget_specs.collect(
        saved, flags.budgets, flags.layer_budgets, flags.allocation, flags.top_p,
        flags.top_p_max_experts, options.moe_token_dispatcher_type,
    )
    clash = report.existing_outputs(flags.output)
    if clash and not flags.overwrite:
        raise UsageError(f"--output {flags.output} already has {', '.join(clash)}: "
                         "pass --overwrite to replace them")
    if options.coactivation_dir:
        clash = coactivation.existing_eval_files(options.coactivation_dir, budgets)
        if clash and not flags.overwrite:
            raise UsageError(f"--coactivation-dir {options.coactivation_dir} already has "
                             f"{', '.join(clash)}: pass --overwrite to replace them")
        train = os.path.join(options.coactivation_dir, f"{coactivation.TRAIN_TAG}.npz")
        if os.path.isfile(train):  # compared with at the end: refuse a corrupt one before any work
            coactivation.load(train)
    print(f"evaluating {options.load} at {len(budgets)} budgets on {options.nproc} process(es)",
          flush=True)
    record = run_on_ranks(options, evaluate_all, budgets, top_p=needs_top_p(budgets))
    for path in report.write_all(flags.output, record):
        print(f"wrote {path}")
    if options.coactivation_dir:
        # With the training run's matrices there (train.npz), the train-vs-eval distances too.
        if coactivation.compare_directory(options.coactivation_dir) is not None:
            print(f"wrote {os.path.join(options.coactivation_dir, coactivation.DISTANCE_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
