"""What the routers did in training, reported through Megatron's MoE metrics tracker: router
entropy, expert-load imbalance and per-expert load per layer, next to Megatron's aux losses.

Megatron's training loop reports only a fixed list of metric names; `ElasticMetricsTracker`
adds ours to that list, so they reach the console, TensorBoard and W&B like the aux losses.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe import moe_logging

from megatron_emoe import routing
from megatron_emoe.cpu import device
from megatron_emoe.layers import num_layer_slots, router_slot

ENTROPY = "router_entropy"
IMBALANCE = "expert_load_imbalance"
HR_LOSS = "hierarchical_router_loss"


def record(router, logits: torch.Tensor, routing_map: torch.Tensor, entropy=None) -> None:
    """Record one training micro-batch of `router`: logits and map are `[tokens, experts]`;
    `entropy` is the mean router entropy when the router already has it."""
    if router.layer_number is None:
        return
    layer, num_layers = router_slot(router), num_layer_slots(router.config)
    tracker = moe_logging.get_moe_metrics_tracker()
    with torch.no_grad():
        tokens_per_expert = routing_map.sum(dim=0)
        if entropy is None:
            entropy = routing.router_entropy(logits)
        tracker.record(ENTROPY, entropy, layer, num_layers,
                       avg_group=router.tp_cp_group)
        tracker.record(IMBALANCE, routing.load_imbalance(tokens_per_expert), layer, num_layers,
                       avg_group=router.tp_cp_group)
        if isinstance(tracker, ElasticMetricsTracker):
            tracker.record_expert_load(layer, num_layers, tokens_per_expert)


class ElasticMetricsTracker(moe_logging.MoEMetricsTracker):
    """Megatron's tracker, reporting the elastic-routing metrics too, and each layer's load per
    expert (fraction of routed tokens, summed over all ranks) as `expert_load/layer_L/expert_E`.

    The load table is `[layer slots, experts]` on every rank, so a pipeline stage without MoE
    layers joins the all-reduce with zeros (as Megatron's `force_initialize` does for its own)."""

    def __init__(self, extra_names: tuple[str, ...], num_layer_slots: int, num_experts: int):
        super().__init__()
        self.extra_names = tuple(extra_names)
        self.load_shape = (num_layer_slots, num_experts)
        self.expert_load: Optional[torch.Tensor] = None  # [layer slots, experts] token counts

    def record_expert_load(self, layer: int, num_layers: int, tokens_per_expert: torch.Tensor):
        self._load_table(tokens_per_expert.device)[layer - 1] += tokens_per_expert.float()

    def _load_table(self, device) -> torch.Tensor:
        if self.expert_load is None:
            self.expert_load = torch.zeros(self.load_shape, device=device)
        return self.expert_load

    def report(self, loss_scale, iteration, writer=None, wandb_writer=None, *args,
               track_names=None, **kwargs) -> str:
        if track_names is not None:
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [n for n in self.extra_names if n not in names]
        self._report_expert_load(iteration, writer, wandb_writer)
        return super().report(loss_scale, iteration, writer, wandb_writer, *args,
                              track_names=track_names, **kwargs)

    def _report_expert_load(self, iteration, writer, wandb_writer) -> None:
        load = self._load_table(device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # tokens of every TP/CP/DP shard, layers of every PP stage
        fractions = load / load.sum(dim=-1, keepdim=True).clamp_min(1)
        scalars = {
            f"expert_load/layer_{layer + 1:02d}/expert_{expert:03d}": fractions[layer, expert].item()
            for layer in range(fractions.shape[0]) if load[layer].sum() > 0
            for expert in range(fractions.shape[1])
        }
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)
        load.zero_()


def install_tracker(hr_loss: bool, num_layer_slots: int, num_experts: int) -> ElasticMetricsTracker:
    """Make Megatron's global MoE metrics tracker an `ElasticMetricsTracker` (call before training)."""
    names = (ENTROPY, IMBALANCE) + ((HR_LOSS,) if hr_loss else ())
    tracker = ElasticMetricsTracker(names, num_layer_slots, num_experts)
    moe_logging.set_moe_metrics_tracker(tracker)
    return tracker
