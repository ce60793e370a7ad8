"""Validation loss of a built model at one inference budget, with the experts it really used.

Shared by the training entry's end-of-run sweep (`--elastic-eval-budgets`) and the evaluation
apps: Megatron's own `evaluate` runs the validation batches, and a `CoactivationRecorder` counts
the experts each token activated (its diagonal), which gives the realised experts per token (for
top-p budgets too) and the routed-expert FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_model_config
from megatron.training.training import evaluate

from megatron_emoe import budget as budgets
from megatron_emoe import coactivation
from megatron_emoe.budget import Budget, BudgetLike
from megatron_emoe.cpu import device
from megatron_emoe.layers import decoder_moe_layers
from megatron_emoe.routers import active_experts
from megatron_emoe.runtime.step import forward_step as default_forward_step


@dataclasses.dataclass
class BudgetResult:
    """Quality and cost of one budget on the validation batches."""

    label: str  # "2", "1-2-3-4" (per layer), "top_p0.5_max4"
    budget: object  # int, list of ints, or {"top_p": p, "max_experts": k}
    val_loss: float  # nats per loss token
    perplexity: float
    routed_tokens: int  # tokens through each MoE layer (all ranks)
    active_experts: float  # mean experts per token, over tokens and MoE decoder layers
    active_experts_per_layer: list[float]
    expert_flops: float  # routed-expert forward FLOPs per token, summed over MoE layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layer_expert_flops(config) -> list[float]:
    """Forward FLOPs per token of one active routed expert, for each MoE decoder layer: two
    (three when gated, e.g. SwiGLU) matmuls of hidden x moe-ffn-hidden, at 2 FLOPs per MAC."""
    ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
    matmuls = 3 if config.gated_linear_unit else 2
    per_expert = 2.0 * matmuls * config.hidden_size * ffn
    return [per_expert] * len(decoder_moe_layers(config))


def expert_flops(config, experts_per_layer: Sequence[float]) -> float:
    """Routed-expert forward FLOPs per token for given (mean) experts per MoE decoder layer."""
    costs = layer_expert_flops(config)
    if len(experts_per_layer) != len(costs):
        raise ValueError(f"need one value per MoE layer ({len(costs)}), got {len(experts_per_layer)}")
    return float(sum(k * c for k, c in zip(experts_per_layer, costs)))


def _last_stage_loss(loss_dict: dict) -> float:
    """The LM loss Megatron's `evaluate` returns on the last pipeline stage, on every stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return float(loss_dict["lm loss"])
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    loss = torch.tensor([float(loss_dict["lm loss"]) if last else 0.0], dtype=torch.float64,
                        device=device())
    torch.distributed.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return float(loss)


def evaluate_at_budget(
    model: list,
    budget: BudgetLike,
    make_iterator: Callable[[], Iterator],
    forward_step: Callable = default_forward_step,
    coactivation_dir: Optional[str] = None,
) -> BudgetResult:
    """Megatron's `evaluate` over the batches of `make_iterator()` with `budget` set on every
    elastic router (restored after); optionally saves that budget's co-activation matrices.
    With virtual pipeline stages every model chunk reads its own iterator, as in training."""
    budget = Budget.of(budget)
    config = get_model_config(model[0])
    with active_experts(model, budget), coactivation.CoactivationRecorder(
        model, phase="eval", entropy=coactivation_dir is not None
    ) as recorder:
        batches = make_iterator() if len(model) == 1 else [make_iterator() for _ in model]
        loss_dict, _, _ = evaluate(forward_step, batches, model, None, config)
    stats = recorder.reduce()
    if coactivation_dir is not None:  # no budget (None) is the training top-k
        named = budget or Budget(config.moe_router_topk)
        coactivation.write_reduced(
            stats, coactivation_dir, coactivation.eval_tag(named), budget=named.to_json()
        )
    decoder = [n for n in decoder_moe_layers(config) if n in stats.counts]
    per_layer = [
        float(stats.counts[n].diagonal().sum()) / max(stats.tokens[n], 1) for n in decoder
    ]
    loss = _last_stage_loss(loss_dict)
    return BudgetResult(
        label=budgets.label(budget),
        budget=budgets.to_json(budget),
        val_loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        routed_tokens=int(stats.tokens[decoder[0]]) if decoder else 0,
        active_experts=sum(per_layer) / len(per_layer) if per_layer else float("nan"),
        active_experts_per_layer=per_layer,
        expert_flops=expert_flops(config, per_layer) if per_layer else float("nan"),
    )
