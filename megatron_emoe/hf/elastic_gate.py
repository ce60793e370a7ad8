"""The elastic gate: a transformers router module (`block.gate`) whose forward routes through an
`ElasticSelection`, with the same parameters, buffers, state-dict names and output tuple.

The gate keeps its own class as a base (transformers records `router_logits` for the aux loss by
`isinstance` on the family's router class), and holds its elastic state by composition.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron_emoe.budget import TopP
from megatron_emoe.hf.selection import ElasticSelection


@dataclasses.dataclass
class ModelRouting:
    """What the gates of one model share during a forward: its padding and their L_HR values."""

    padding: Optional[torch.Tensor] = None  # [tokens] True at padding, from the attention mask
    hr_losses: list = dataclasses.field(default_factory=list)  # this forward's L_HR per layer
    hr_total: Optional[torch.Tensor] = None  # their sum when the forward ended (detached)


@dataclasses.dataclass
class GateState:
    """One gate's elastic settings: its selection rules, eval budget and the model it serves."""

    selection: ElasticSelection
    layer_number: int  # 1-based decoder layer
    shared: ModelRouting
    eval_budget: Union[None, int, TopP] = None
    budgets: Optional[torch.Tensor] = None  # [tokens] per-token budgets of the last forward


class ElasticGateForward:
    """The forward of every elastic gate; put before the family's router class in the bases."""

    elastic_state: GateState

    def forward(self, hidden_states: torch.Tensor):
        """(router_logits `[tokens, experts]`, gates `[tokens, k]`, experts `[tokens, k]`)."""
        state = self.elastic_state
        selection = state.selection
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if selection.style.fp32_logits:
            logits = F.linear(hidden_states.float(), self.weight.float())
        else:
            logits = F.linear(hidden_states, self.weight)
        bias = getattr(self, "e_score_correction_bias", None) if selection.style.expert_bias else None
        gates, chosen, state.budgets = selection.select(
            logits, bias, self.training, state.eval_budget, data_rank()
        )
        if self.training and torch.is_grad_enabled() and selection.elastic.hr_loss_coeff:
            padding = state.shared.padding
            if padding is not None and padding.shape[0] != logits.shape[0]:
                padding = None
            state.shared.hr_losses.append(selection.hierarchical_router_loss(logits, padding))
        return logits, gates, chosen


def make_elastic(gate: torch.nn.Module, state: GateState) -> torch.nn.Module:
    """Turn the transformers router module `gate` into an elastic gate in place (same parameters
    and buffers, so optimizers and hooks that hold them keep working) and return it."""
    base = type(gate)
    gate.__class__ = type(f"Elastic{base.__name__}", (ElasticGateForward, base), {})
    gate.elastic_state = state
    return gate


def is_elastic(module: torch.nn.Module) -> bool:
    return isinstance(module, ElasticGateForward)


def data_rank() -> int:
    """This process's global rank: every data-parallel (and DeepSpeed expert-parallel) rank holds
    its own tokens, so each seeds its draws with its own rank, as Megatron's DP/EP ranks do."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
