"""Search per-layer inference budgets (experts per token in each MoE layer) of a checkpoint under a
total routed-expert FLOPs budget, on its validation set, and write the best allocation as JSON.

    emoe-search-budget-allocation --load CKPT --valid-data-path PREFIX \\
        --tokenizer-model TOK --expert-flops-budget-ratio 1.0 --output allocation.json

Every uniform budget that fits is evaluated, then a greedy ascent (adding experts where they buy
the most loss per FLOP, from --min-active-experts or from the best uniform budget: --greedy-start)
and a refinement by single-layer moves and swaps (megatron_emoe.evaluation.allocation); one
validation pass per allocation, at most --max-evaluations, one progress line each. The result's
"allocation" list goes to `set_active_experts(model, allocation)`, to the training flag
`--moe-active-experts`, or to `emoe-elastic-eval --allocation FILE.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_emoe.budget import Budget, max_routable_experts
from megatron_emoe.errors import ArgumentParser, UsageError, exits_on_usage_error
from megatron_emoe.evaluation.allocation import (
    COST_RTOL, GREEDY_STARTS, Allocation, Evaluation, search_allocation, validate_search,
)
from megatron_emoe.evaluation.checkpoint_eval import (
    add_eval_arguments, options_from_args, run_on_ranks, saved_args,
)
from megatron_emoe.files import write_text_atomically
from megatron_emoe.runtime.saved_args import checkpoint_config
from megatron_emoe.runtime.evaluate import layer_expert_flops

PROG = "emoe-search-budget-allocation"
DEFAULT_MAX_EVALUATIONS = 100

# The search's parameter names as this tool's users know them, for its error messages.
FLAG_NAMES = {
    "k_min": "--min-active-experts",
    "k_max": "--max-active-experts",
    "max_evaluations": "--max-evaluations",
    "min_improvement": "--min-improvement",
    "greedy_start": "--greedy-start",
}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The search flags, checked; what the ranks need besides the evaluator."""

    budget_ratio: Optional[float]  # total expert FLOPs as a multiple of the training top-k's
    budget_flops: Optional[float]  # or absolute FLOPs per token
    min_active_experts: int
    max_active_experts: Optional[int]  # None: 3 x training top-k, at most num_experts
    max_evaluations: int
    min_improvement: float
    greedy_start: str = "auto"


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """The search space once the checkpoint's shape is known."""

    k_min: int
    k_max: int
    layer_cost: tuple[float, ...]
    max_cost: float
    train_cost: float  # expert FLOPs per token at the training top-k


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    search = parser.add_argument_group("budget search")
    budget = search.add_mutually_exclusive_group(required=True)
    budget.add_argument("--expert-flops-budget-ratio", type=float, default=None, metavar="R",
                        help="Total routed-expert FLOPs per token as a multiple of the training "
                             "top-k's (1.0 = the training compute)")
    budget.add_argument("--expert-flops-budget", type=float, default=None, metavar="F",
                        help="Total routed-expert forward FLOPs per token (absolute)")
    search.add_argument("--min-active-experts", type=int, default=1,
                        help="Fewest experts per token in any layer (default 1)")
    search.add_argument("--max-active-experts", type=int, default=None,
                        help="Most experts per token in any layer (default 3 x training top-k, "
                             "at most --num-experts)")
    search.add_argument("--max-evaluations", type=int, default=DEFAULT_MAX_EVALUATIONS,
                        help="Most validation passes, one per allocation (default "
                             f"{DEFAULT_MAX_EVALUATIONS}); the best found so far is written")
    search.add_argument("--min-improvement", type=float, default=0.0,
                        help="Loss decrease (nats) a search move must bring to be taken (default 0)")
    search.add_argument("--greedy-start", choices=GREEDY_STARTS, default="auto",
                        help="Where the greedy ascent starts: --min-active-experts in every layer, "
                             "the best uniform budget, or auto (the first when the whole ascent "
                             "fits in --max-evaluations; default)")
    search.add_argument("--output", required=True, metavar="FILE.json", help="Where to write the result")
    search.add_argument("--overwrite", action="store_true", help="Replace an existing --output")
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    """Check the search flags (not the checkpoint); `ValueError` names the flag and its range."""
    for flag, value in (("--expert-flops-budget-ratio", args.expert_flops_budget_ratio),
                        ("--expert-flops-budget", args.expert_flops_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a finite number > 0, got {value}")
    if args.min_active_experts < 1:
        raise UsageError(f"--min-active-experts must be >= 1, got {args.min_active_experts}")
    if args.max_active_experts is not None and args.max_active_experts < args.min_active_experts:
        raise UsageError(f"--max-active-experts must be >= --min-active-experts "
                         f"({args.min_active_experts}), got {args.max_active_experts}")
    if args.max_evaluations < 1:
        raise UsageError(f"--max-evaluations must be >= 1, got {args.max_evaluations}")
    if not (math.isfinite(args.min_improvement) and args.min_improvement >= 0):
        raise UsageError(f"--min-improvement must be a finite number >= 0, got {args.min_improvement}")
    check_output(args.output, args.overwrite)
    return SearchSettings(args.expert_flops_budget_ratio, args.expert_flops_budget,
                          args.min_active_experts, args.max_active_experts, args.max_evaluations,
                          args.min_improvement, args.greedy_start)


def check_output(path: str, overwrite: bool) -> None:
    """--output must be a file in an existing folder, and new unless --overwrite."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output must be a file, got the folder {path}")
    if not os.path.isdir(folder):
        raise UsageError(f"--output: folder {folder} does not exist")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--output {path} exists; pass --overwrite to replace it")


def plan_search(settings: SearchSettings, tc, layer_cost: Sequence[float]) -> SearchPlan:
    """The search space for a model (`tc`: its TransformerConfig, or the same fields from saved
    flags); `ValueError` names the flag that does not fit it and the allowed range."""
    k_min = settings.min_active_experts
    k_max = settings.max_active_experts or min(3 * tc.moe_router_topk, max_routable_experts(tc))
    Budget(k_min).validate(tc, flag="--min-active-experts")
    Budget(k_max).validate(tc, flag="--max-active-experts")
    if k_max < k_min:  # only with the default --max-active-experts
        raise UsageError(f"--min-active-experts must be <= --max-active-experts ({k_max} by "
                         f"default for this checkpoint), got {k_min}")
    layer_cost = tuple(float(c) for c in layer_cost)
    train_cost = math.fsum(tc.moe_router_topk * c for c in layer_cost)
    if settings.budget_flops is not None:
        max_cost, flag = settings.budget_flops, "--expert-flops-budget"
    else:
        max_cost, flag = settings.budget_ratio * train_cost, "--expert-flops-budget-ratio"
    floor = k_min * math.fsum(layer_cost)
    if max_cost < floor * (1 - COST_RTOL):
        allowed = (f"{floor:.6g} FLOPs/token" if settings.budget_flops is not None
                   else f"{floor / train_cost:.6g} (training top-k = {train_cost:.6g} FLOPs/token)")
        raise UsageError(f"{flag} is below the cost of --min-active-experts={k_min} in every "
                         f"MoE layer; allowed: >= {allowed}")
    validate_search(len(layer_cost), k_min, k_max, layer_cost, max_cost, settings.max_evaluations,
                    settings.min_improvement, settings.greedy_start,
                    names={**FLAG_NAMES, "max_cost": flag})
    return SearchPlan(k_min, k_max, layer_cost, max_cost, train_cost)


def plan_from_checkpoint(settings: SearchSettings, saved: argparse.Namespace,
                         dispatcher: Optional[str] = None) -> SearchPlan:
    """`plan_search` from the checkpoint's saved flags, before any model is built."""
    tc = checkpoint_config(saved, dispatcher)
    return plan_search(settings, tc, layer_expert_flops(tc))


def search_on_rank(evaluator, settings: SearchSettings) -> dict:
    """Body of every rank: plan, search (all ranks in step), return the report (used from rank 0)."""
    plan = plan_search(settings, evaluator.config, evaluator.layer_expert_flops())
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    results = {}

    def objective(budgets: tuple[int, ...]) -> float:
        results[budgets] = evaluator.evaluate(budgets)
        return _same_on_all_ranks(results[budgets].val_loss)

    def progress(n: int, evaluation: Evaluation) -> None:
        if rank0:
            print(progress_line(n, settings.max_evaluations, evaluation, plan), flush=True)

    allocation = search_allocation(
        objective, len(plan.layer_cost), plan.k_min, plan.k_max, plan.layer_cost, plan.max_cost,
        max_evaluations=settings.max_evaluations, min_improvement=settings.min_improvement,
        greedy_start=settings.greedy_start, on_evaluation=progress, names=FLAG_NAMES,
    )
    return report(allocation, plan, settings, {b: r.to_dict() for b, r in results.items()}, evaluator)


def _same_on_all_ranks(loss: float) -> float:
    """Rank 0's loss, so that every rank takes the same search decisions (and collectives)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss
    box = [loss]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def progress_line(n: int, limit: int, e: Evaluation, plan: SearchPlan) -> str:
    """One line per evaluation: which allocation, its loss and its share of the training FLOPs."""
    budgets = " ".join(map(str, e.budgets))
    return (f"[{n:>{len(str(limit))}}/{limit}] {e.kind:<7} k' = {budgets}  loss {e.loss:.6f}  "
            f"expert FLOPs/token {e.cost:.4g} ({e.cost / plan.train_cost:.3f} x training top-k)")


def report(allocation: Allocation, plan: SearchPlan, settings: SearchSettings, results: dict,
           evaluator) -> dict:
    """The JSON document: best allocation, the best uniform budget, and the search history."""
    best, uniform = results[allocation.budgets], results[allocation.best_uniform.budgets]
    return {
        "allocation": list(allocation.budgets),
        "moe_active_experts_flag": "--moe-active-experts " + " ".join(map(str, allocation.budgets)),
        "val_loss": _json_float(best["val_loss"]),
        "perplexity": _json_float(best["perplexity"]),
        "expert_flops": allocation.cost,
        "expert_flops_ratio": allocation.cost / plan.train_cost,
        "result": _json_clean(best),
        "best_uniform": {
            "active_experts": allocation.best_uniform.budgets[0],
            "val_loss": _json_float(uniform["val_loss"]),
            "perplexity": _json_float(uniform["perplexity"]),
            "expert_flops": allocation.best_uniform.cost,
            "expert_flops_ratio": allocation.best_uniform.cost / plan.train_cost,
        },
        "loss_gain_over_uniform": _json_float(allocation.best_uniform.loss - allocation.loss),
        "iteration": getattr(evaluator.args, "iteration", None),
        "budget": {
            "expert_flops": plan.max_cost,
            "expert_flops_ratio": plan.max_cost / plan.train_cost,
            "train_topk": evaluator.train_topk,
            "train_expert_flops": plan.train_cost,
            "num_experts": evaluator.num_experts,
            "layer_expert_flops": list(plan.layer_cost),
        },
        "search": {
            "min_active_experts": plan.k_min,
            "max_active_experts": plan.k_max,
            "max_evaluations": settings.max_evaluations,
            "min_improvement": settings.min_improvement,
            "greedy_start": settings.greedy_start,
            "evaluations": allocation.evaluations,
            "exhausted": allocation.exhausted,
            "path": [_evaluation_json(e) for e in allocation.path],
            "history": [_evaluation_json(e) for e in allocation.history],
        },
    }


def _evaluation_json(e: Evaluation) -> dict:
    return {"allocation": list(e.budgets), "val_loss": _json_float(e.loss), "expert_flops": e.cost,
            "step": e.kind}


def _json_float(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _json_clean(data):
    """Non-finite floats as null (strict JSON)."""
    if isinstance(data, float):
        return _json_float(data)
    if isinstance(data, dict):
        return {k: _json_clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_clean(v) for v in data]
    return data


@exits_on_usage_error(PROG)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    options = options_from_args(args)
    saved = saved_args(options)
    options.check_against(saved)
    plan = plan_from_checkpoint(settings, saved, options.moe_token_dispatcher_type)
    print(f"searching per-layer budgets of {options.load}: {len(plan.layer_cost)} MoE layers, "
          f"k' in [{plan.k_min}, {plan.k_max}], expert FLOPs/token <= {plan.max_cost:.4g} "
          f"({plan.max_cost / plan.train_cost:.3f} x training top-k), at most "
          f"{settings.max_evaluations} evaluations on {options.nproc} process(es)", flush=True)
    document = run_on_ranks(options, search_on_rank, settings)
    document = {"checkpoint": os.path.abspath(args.load), **document}
    write_text_atomically(args.output, json.dumps(document, indent=2) + "\n")
    uniform = document["best_uniform"]
    print(f"best allocation {' '.join(map(str, document['allocation']))}: val loss "
          f"{document['val_loss']} (best uniform k'={uniform['active_experts']}: "
          f"{uniform['val_loss']}); wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
