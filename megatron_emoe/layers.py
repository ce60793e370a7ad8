"""Where a MoE layer sits in the model, from a `TransformerConfig` alone (no Megatron import).

Megatron numbers decoder layers from 1 and puts MTP layers after them; its MoE metrics tracker,
the co-activation files and M-MoE's per-layer budget draws all use that global slot, so that
every pipeline stage agrees on it.
"""

from __future__ import annotations


def decoder_moe_layers(config) -> list[int]:
    """1-based numbers of the decoder layers that are MoE, from `moe_layer_freq`."""
    freq = config.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(config.num_layers)]
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def num_layer_slots(config) -> int:
    """Decoder layers plus MTP layers: the slots Megatron's tracker numbers."""
    return config.num_layers + (config.mtp_num_layers or 0)


def layer_slot(config, layer_number: int, is_mtp_layer: bool) -> int:
    """1-based global slot of a layer: decoder layers first, then MTP layers."""
    return layer_number + (config.num_layers if is_mtp_layer else 0)


def router_slot(router) -> int:
    """The global slot of a router's layer (`layer_slot` of its config and layer number)."""
    return layer_slot(router.config, router.layer_number, router.is_mtp_layer)
