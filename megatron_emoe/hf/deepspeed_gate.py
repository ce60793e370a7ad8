"""An elastic gate for `deepspeed.moe`: the transformers model's own elastic gate, answering in
the sparse 7-tuple that DeepSpeed 0.19's `MOELayer` expects from a gate, dropless.

    (l_aux, capacity, num_experts, indices [k, tokens], locations [k, tokens], gates [k, tokens],
     tokens per expert [experts])

Routes past a token's budget (M-MoE per-token budgets, top-p) get index -1: DeepSpeed parks them
on its scratch slot and they cost nothing. Capacity is the busiest expert's load, agreed over the
expert-parallel group so the all-to-all buffers match, so no token is ever dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_emoe.hf.elastic_gate import is_elastic


class DeepSpeedElasticGate(torch.nn.Module):
    """Wraps an elastic transformers gate (`router`, its weight and hooks unchanged) for
    `deepspeed.moe.sharded_moe.MOELayer`."""

    def __init__(self, router: torch.nn.Module):
        super().__init__()
        if not is_elastic(router):
            raise TypeError("DeepSpeedElasticGate wraps a gate made elastic by megatron_emoe.hf.elasticize")
        self.router = router
        self.ep_group: Optional[torch.distributed.ProcessGroup] = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, hidden: torch.Tensor, used_token=None, sparse_routes: bool = True,
                use_tutel: bool = False):
        """The 7-tuple for `hidden` `[tokens, hidden]`; l_aux is 0 (the transformers model's
        own aux loss reads the router logits its recorder collects from `router`)."""
        if used_token is not None or use_tutel or not sparse_routes:
            raise ValueError("the elastic DeepSpeed gate supports sparse routes only "
                             "(no used_token mask, no Tutel)")
        _, gates, chosen = self.router(hidden)
        state = self.router.elastic_state
        num_experts = state.selection.style.num_experts
        routed = torch.ones_like(chosen, dtype=torch.bool)
        if state.budgets is not None:  # columns past a token's budget are not routed
            routed = torch.arange(chosen.shape[1], device=chosen.device) < state.budgets.unsqueeze(1)
        mask = torch.zeros(hidden.shape[0], num_experts, dtype=torch.long, device=hidden.device)
        mask.scatter_add_(1, chosen, routed.long())  # [tokens, experts] 1 where routed
        counts = mask.sum(dim=0)
        capacity = counts.max().reshape(1)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        locations = (mask.cumsum(dim=0) - 1).gather(1, chosen) * routed
        indices = torch.where(routed, chosen, torch.full_like(chosen, -1))
        l_aux = hidden.new_zeros((), dtype=torch.float32)
        return (l_aux, capacity.squeeze(0).clamp(min=1), num_experts,
                indices.t().contiguous().to(torch.int32), locations.t().contiguous().to(torch.int32),
                gates.float().t().contiguous(), counts.detach())
