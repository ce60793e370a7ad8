"""Which experts a token activates and with what gates: `megatron_emoe.routing` and
`megatron_emoe.draws` applied to one transformers gate's logits, in the order Megatron's
`ElasticRouter` applies them, so the same logits and random keys give the same choice.

Shapes: logits `[tokens, experts]`; chosen experts and gates `[tokens, k]`. Where tokens take
different budgets, columns past a token's budget carry gate 0 (the expert index there is its next
ranked expert, so every transformers expert implementation accepts it).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from megatron_emoe import routing
from megatron_emoe.budget import TopP
from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.draws import TrainingDraws
from megatron_emoe.hf.gate_styles import GateStyle


class ElasticSelection:
    """One MoE layer's elastic choice: top-k, EMoE sampling or M-MoE budgets in training, top-k'
    or top-p under an eval budget; gates with the family's own score function."""

    def __init__(self, style: GateStyle, elastic: ElasticMoEConfig, layer_slot: int):
        self.style = style
        self.elastic = elastic
        self.layer_slot = layer_slot  # 1-based decoder layer: the M-MoE layer-level stream
        self.mmoe_budgets = elastic.mmoe_budgets(style.topk)
        self.mmoe_weights = elastic.mmoe_weights(style.topk)
        self.draws = TrainingDraws(elastic.mmoe_seed, elastic.mmoe_resample_every)

    def select(
        self,
        logits: torch.Tensor,
        expert_bias: Optional[torch.Tensor],
        training: bool,
        eval_budget: Union[None, int, TopP],
        data_rank: int,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Gates and experts `[tokens, k]` for `logits` `[tokens, experts]`, and the `[tokens]`
        budgets when tokens take different numbers of experts (None when all take k)."""
        with torch.no_grad():
            scores = self.ranking_scores(logits, expert_bias)
            budgets = None
            if not training:
                if isinstance(eval_budget, TopP):
                    chosen = routing.topk_indices(scores, eval_budget.max_experts)
                    budgets = self._top_p_budgets(logits, chosen, eval_budget.p)
                else:
                    chosen = routing.topk_indices(scores, eval_budget or self.style.topk)
            elif self.elastic.routes_topk_at(self.draws.step):  # top-k (phase): no random draw
                chosen = routing.topk_indices(scores, self.style.topk)
            else:
                chosen, budgets = self._training_choice(scores, data_rank)
        return self.gates(logits, chosen, budgets), chosen, budgets

    def ranking_scores(self, logits: torch.Tensor, expert_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """`[tokens, experts]` scores that rank experts (-inf outside a token's groups)."""
        style = self.style
        scores = routing.selection_scores(logits, style.score_function, style.pre_softmax, expert_bias)
        if style.num_groups and style.group_topk:
            scores = routing.group_limited_scores(
                scores, style.num_groups, style.group_topk, style.group_score_topk
            )
        return scores

    def _training_choice(self, scores: torch.Tensor, data_rank: int):
        """EMoE sampling or M-MoE budgets, with the key drawn exactly as `ElasticRouter._plan`."""
        key, microbatch = self.draws.next_key()
        generator = self.draws.generator(key, data_rank, scores.device)
        if self.elastic.mode == "emoe":
            k_ideal = self.elastic.k_ideal_at(self.draws.step, self.style.topk)
            return routing.sample_coactivation(scores, self.style.topk, k_ideal, generator), None
        if self.elastic.mmoe_sample_level == "token":
            budgets = routing.sample_token_budgets(
                self.mmoe_budgets, scores.shape[0], scores.device, generator, self.mmoe_weights
            )
            return routing.topk_indices(scores, max(self.mmoe_budgets)), budgets
        stream = 0 if self.elastic.mmoe_sample_level == "model" else self.layer_slot
        k = self.draws.budget(self.mmoe_budgets, self.mmoe_weights, stream, microbatch)
        return routing.topk_indices(scores, k), None

    def _top_p_budgets(self, logits: torch.Tensor, chosen: torch.Tensor, p: float) -> torch.Tensor:
        """`[tokens]` top-p budgets over the router's probabilities (sigmoid scores normalised)."""
        probs = routing.router_probabilities(logits, self.style.score_function)
        return routing.top_p_budgets(probs.gather(1, chosen), p)

    def gates(self, logits: torch.Tensor, chosen: torch.Tensor,
              budgets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`[tokens, k]` gates as the family's transformers router computes them for `chosen`,
        zero past each token's budget when `budgets` `[tokens]` is given."""
        style = self.style
        if style.score_function == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
        gates = scores.gather(1, chosen)
        if budgets is not None:
            within = torch.arange(chosen.shape[1], device=chosen.device) < budgets.unsqueeze(1)
            gates = gates * within
        if style.renormalize:
            total = gates.sum(dim=-1, keepdim=True)
            gates = gates / (total + 1e-20 if style.score_function == "sigmoid" else total)
        if style.scaling is not None:
            gates = gates * style.scaling
        return gates.to(logits.dtype) if style.gates_in_logits_dtype else gates

    def hierarchical_router_loss(self, logits: torch.Tensor,
                                 padding: Optional[torch.Tensor]) -> torch.Tensor:
        """L_HR over the softmax of all experts, padding tokens (`[tokens]`, True) left out."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if padding is not None:
            probs = probs[~padding]
        return routing.hierarchical_router_loss(probs)
