"""Budgets from the command line, checked against a checkpoint's saved flags before any model is
built: global k', per-layer lists ("1-2-4-4"), allocation files and top-p."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from megatron_emoe.budget import Budget, TopP
from megatron_emoe.errors import UsageError
from megatron_emoe.runtime.saved_args import checkpoint_config


def read_allocation(path: str) -> Budget:
    """The per-layer allocation written by emoe-search-budget-allocation (its "allocation" list)."""
    if not os.path.isfile(path):
        raise UsageError(f"--allocation {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--allocation {path} is not valid JSON ({error})") from None
    allocation = record.get("allocation") if isinstance(record, dict) else None
    if not isinstance(allocation, list):
        raise UsageError(f"--allocation {path} has no 'allocation' list")
    return Budget.of(allocation, flag=f"--allocation {path}")


def default_budgets(saved: argparse.Namespace) -> list[int]:
    """k' = 1 ... 3k, capped at the number of experts."""
    return list(range(1, min(3 * saved.moe_router_topk, saved.num_experts) + 1))


def collect(
    saved: argparse.Namespace,
    budgets: Optional[Sequence[int]] = None,
    layer_budgets: Sequence[str] = (),
    allocation: Optional[str] = None,
    top_p: Sequence[float] = (),
    top_p_max_experts: Optional[int] = None,
    dispatcher: Optional[str] = None,
) -> list[Budget]:
    """Every budget to evaluate, validated (UsageError naming the flag and the allowed range)."""
    config = checkpoint_config(saved, dispatcher)
    result: list[Budget] = []
    for k in (default_budgets(saved) if budgets is None else budgets):
        result.append(Budget(int(k)).validate(config, flag="--budgets"))
    for text in layer_budgets:
        result.append(Budget.parse(text, flag="--layer-budgets").validate(config, flag="--layer-budgets"))
    if allocation:
        result.append(read_allocation(allocation).validate(config, flag="--allocation"))
    if top_p:
        cap = top_p_max_experts or min(3 * saved.moe_router_topk, saved.num_experts)
        # Top-p needs a dispatcher that takes per-token budgets; the evaluator switches dropless
        # alltoall to allgather unless --moe-token-dispatcher-type was given.
        top_p_config = checkpoint_config(saved, dispatcher or "allgather")
        for p in top_p:
            result.append(Budget(TopP(float(p), cap)).validate(top_p_config, flag="--top-p"))
    if not result:
        raise UsageError("nothing to evaluate: give --budgets, --layer-budgets, --allocation or --top-p")
    return result
