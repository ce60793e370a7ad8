"""A transformers model's MoE settings under Megatron's `TransformerConfig` names, so that
`ElasticMoEConfig.validate` and `Budget.validate` apply every one of their rules unchanged."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_emoe.hf.gate_styles import GateStyle


@dataclasses.dataclass(frozen=True)
class MoEView:
    """The fields the elastic config and budget checks read, for one transformers model.

    The elastic gate pads per-token budgets itself, so it takes any number of experts per token
    (Megatron's allgather dispatcher, without capacity)."""

    num_moe_experts: int
    moe_router_topk: int
    num_layers: int
    moe_layer_freq: list  # 1 for each decoder layer that is MoE, 0 for dense ones
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    mtp_num_layers: Optional[int] = None
    moe_token_dispatcher_type: str = "allgather"
    moe_expert_capacity_factor: Optional[float] = None
    moe_router_padding_for_quantization: bool = False
    moe_pad_expert_input_to_capacity: bool = False
    moe_router_load_balancing_type: str = "aux_loss"
    moe_apply_probs_on_input: bool = False
    cuda_graph_impl: str = "none"


def moe_view(style: GateStyle, num_layers: int, moe_layers: list[int]) -> MoEView:
    """The view of a model with `num_layers` decoder layers, MoE at the 1-based `moe_layers`."""
    return MoEView(
        num_moe_experts=style.num_experts,
        moe_router_topk=style.topk,
        num_layers=num_layers,
        moe_layer_freq=[int(i + 1 in moe_layers) for i in range(num_layers)],
        moe_router_num_groups=style.num_groups,
        moe_router_group_topk=style.group_topk,
    )


def moe_layer_pattern(config) -> list[bool]:
    """For each decoder layer, whether it is an MoE layer (Qwen-style sparse-step / dense list,
    DeepSeek's first dense layers)."""
    first_moe = getattr(config, "first_k_dense_replace", None) or 0
    if first_moe:
        return [i >= first_moe for i in range(config.num_hidden_layers)]
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", None) or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]
