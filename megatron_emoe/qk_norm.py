"""Query/key RMSNorm over a whole projection (all heads at once), as OLMoE does.

Megatron's `qk_layernorm` normalises each head `[.., head_dim]` on its own; OLMoE normalises the
full query `[heads * head_dim]` and key `[groups * head_dim]` projections. `with_projection_qk_norm`
puts this norm into the attention slots of a layer spec. Tensor parallelism would split the heads
(and the norm's statistics) over ranks, so it is refused there.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.attention import SelfAttentionSubmodules

from megatron_emoe.spec import map_spec


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over the last two dims of `[sq, b, heads, head_dim]`, weight `[heads * head_dim]`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, heads_field: str):
        super().__init__()
        if config.tensor_model_parallel_size > 1:
            raise ValueError(
                "--qk-layernorm-across-heads (OLMoE's q/k norm) needs --tensor-model-parallel-size 1, "
                f"got {config.tensor_model_parallel_size}"
            )
        heads = getattr(config, heads_field) or config.num_attention_heads
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(heads * hidden_size, dtype=config.params_dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(-2).float()
        normed = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.to(x.dtype)).view_as(x)


def with_projection_qk_norm(spec):
    """`spec` with every self-attention's q/k layernorm replaced by `ProjectionRMSNorm`."""

    def visit(node):
        if isinstance(node, SelfAttentionSubmodules):
            return dataclasses.replace(
                node,
                q_layernorm=functools.partial(ProjectionRMSNorm, heads_field="num_attention_heads"),
                k_layernorm=functools.partial(ProjectionRMSNorm, heads_field="num_query_groups"),
            )
        return None

    return map_spec(spec, visit)
