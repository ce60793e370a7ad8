"""The elastic routers of a built model, and its inference budget set on them without rebuilding.

A budget is anything `megatron_emoe.budget.Budget.of` takes: an int (every MoE layer), one per MoE
layer, a `TopP`, a `Budget`, or None for the training behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Union

import torch

from megatron_emoe.budget import Budget, BudgetLike
from megatron_emoe.router import ElasticRouter


def elastic_routers(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> list[ElasticRouter]:
    """The elastic routers of a model or of a list of model chunks: decoder first, by layer."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ElasticRouter)]
    return sorted(routers, key=lambda r: (r.is_mtp_layer, r.layer_number or 0))


def set_active_experts(model, k: BudgetLike) -> None:
    """Route every MoE layer of ``model`` to its top-k' experts in eval mode (None: training k).

    Raises `ValueError` naming the allowed range for k' < 1, k' > num_experts, or a per-layer list
    of the wrong length. Training-mode forwards keep their configured routing.
    """
    routers = _routers_or_raise(model)
    budget = Budget.of(k, flag="set_active_experts k")
    if budget is not None:
        budget = budget.validate(routers[0].config, flag="set_active_experts k")
    for router in routers:
        router.budget = budget


@contextlib.contextmanager
def active_experts(model, k: BudgetLike):
    """`set_active_experts(model, k)` inside the block; afterwards every router gets back the
    budget it had before (even if the block raised)."""
    routers = _routers_or_raise(model)
    previous = [router.budget for router in routers]
    try:
        set_active_experts(model, k)
        yield
    finally:
        for router, budget in zip(routers, previous, strict=True):
            router.budget = budget


def set_training_step(model, step: int) -> None:
    """Tell every elastic router of `model` (a chunk or a list) which optimizer step the next
    training micro-batches belong to: M-MoE model/layer budgets are drawn per step
    (`--mmoe-resample-every global-batch`) or per (step, micro-batch). Call it before each
    micro-batch's forward; repeating the same step is a no-op."""
    for router in elastic_routers(model):
        router.begin_step(step)


def get_active_experts(model) -> list:
    """The eval-time k' of each local MoE layer (None where the training top-k applies)."""
    return [router.active_topk for router in _routers_or_raise(model)]


def _routers_or_raise(model) -> list[ElasticRouter]:
    routers = elastic_routers(model)
    if not routers:
        raise ValueError(
            "the model has no ElasticRouter: build its layer spec with "
            "megatron_emoe.with_elastic_router(spec, elastic_config)"
        )
    return routers
