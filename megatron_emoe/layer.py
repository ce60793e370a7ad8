"""`ElasticMoELayer`: Megatron's `MoELayer` whose dispatcher follows the router's k per forward.

Megatron's dispatchers size their buffers from `config.moe_router_topk`, and that config object is
shared by every layer. Each elastic layer therefore gives its dispatcher a private copy of the
config and sets its top-k to what the router chose, so layers can run different budgets.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_emoe.router import ElasticRouter


def set_dispatcher_topk(dispatcher, k: int) -> None:
    """Tell a Megatron token dispatcher how many experts each token is routed to."""
    dispatcher.config.moe_router_topk = k
    if hasattr(dispatcher, "router_topk"):  # allgather keeps its own copy
        dispatcher.router_topk = k
    manager = getattr(dispatcher, "_comm_manager", None)  # flex (DeepEP / HybridEP)
    if manager is not None and hasattr(manager, "router_topk"):
        manager.router_topk = dispatcher.tp_size * k


class ElasticMoELayer(MoELayer):
    """An `MoELayer` with an `ElasticRouter`; only the dispatcher's top-k handling differs."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        if not isinstance(self.router, ElasticRouter):
            raise TypeError(
                f"ElasticMoELayer needs an ElasticRouter, got {type(self.router).__name__}; "
                "build the spec with megatron_emoe.with_elastic_router"
            )
        private = copy.copy(self.token_dispatcher.config)
        self.token_dispatcher.config = private
        # The flex dispatcher's communication manager (DeepEP / HybridEP) keeps its own reference
        # to the config and reads moe_router_topk from it (HybridEP sizes its rank-capacity budget
        # and drop-and-pad capacity with it): it must see the private copy too.
        manager = getattr(self.token_dispatcher, "_comm_manager", None)
        if manager is not None and getattr(manager, "config", None) is not None:
            manager.config = private

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        set_dispatcher_topk(self.token_dispatcher, self.router.dispatch_topk)
        return probs, routing_map
