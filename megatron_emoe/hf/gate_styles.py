"""How each transformers MoE family scores, ranks and weights its experts, read from its config.

One `GateStyle` per model type; it mirrors the family's own router module in transformers 5
(`block.gate`) and the Megatron flags `megatron_emoe.conversion` gives the same model, so the
elastic gate reproduces both.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_emoe.errors import UsageError

SUPPORTED = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class GateStyle:
    """One family's routing rules: score function, ranking, renormalisation, scaling, groups."""

    model_type: str
    num_experts: int
    topk: int
    score_function: str  # "softmax" or "sigmoid"
    pre_softmax: bool  # Megatron's flag: rank softmax scores (True) or raw logits (False)
    renormalize: bool  # divide the chosen gates by their sum
    scaling: Optional[float]  # routed_scaling_factor (DeepSeek), None elsewhere
    num_groups: Optional[int] = None  # group-limited routing (DeepSeek), None when off
    group_topk: Optional[int] = None
    group_score_topk: int = 1  # a group's score: the sum of its best this-many experts
    fp32_logits: bool = False  # DeepSeek computes router logits in fp32
    expert_bias: bool = False  # DeepSeek-V3's e_score_correction_bias (selection only)
    gates_in_logits_dtype: bool = True  # cast gates to the logits' dtype (Mixtral keeps fp32)

    @property
    def reachable_experts(self) -> int:
        """Experts one token can reach (those of its groups under group-limited routing)."""
        if self.num_groups and self.group_topk:
            return self.group_topk * (self.num_experts // self.num_groups)
        return self.num_experts


def style_of(config) -> GateStyle:
    """The `GateStyle` of a transformers config, or a `UsageError` naming the model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UsageError(
            f"megatron_emoe.hf supports MoE model types {', '.join(SUPPORTED)}; got {model_type!r}"
        )
    topk = config.num_experts_per_tok
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral"):
        experts = config.num_local_experts if model_type == "mixtral" else config.num_experts
        renormalize = model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))
        return GateStyle(model_type, experts, topk, "softmax", pre_softmax=not renormalize,
                         renormalize=renormalize, scaling=None,
                         gates_in_logits_dtype=model_type != "mixtral")
    experts = config.n_routed_experts
    scaling = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
    groups, chosen = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
    if model_type == "deepseek_v2":
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy" and chosen < groups
        return GateStyle(model_type, experts, topk, "softmax", pre_softmax=True, renormalize=False,
                         scaling=scaling, num_groups=groups if grouped else None,
                         group_topk=chosen if grouped else None, group_score_topk=1,
                         fp32_logits=True)
    grouped = chosen < groups
    return GateStyle(model_type, experts, topk, "sigmoid", pre_softmax=False,
                     renormalize=bool(getattr(config, "norm_topk_prob", True)), scaling=scaling,
                     num_groups=groups if grouped else None, group_topk=chosen if grouped else None,
                     group_score_topk=2, fp32_logits=True, expert_bias=True)
