"""`Coactivation`: the summed co-activation matrices of one phase (training, or eval at k')."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from megatron_emoe import routing
from megatron_emoe.coactivation.counts import DEFAULT_NORMALIZATION, normalize


@dataclasses.dataclass
class Coactivation:
    """Summed co-activation of one phase (training, or eval at one budget), per global MoE layer.

    `counts[layer]` is `[experts, experts]` int64 on the CPU; `tokens[layer]` the (non-padding)
    tokens routed; `entropy[layer]` the token-mean router entropy in nats (NaN if not recorded).
    Layers are numbered as Megatron's metrics tracker numbers them: 1-based, MTP layers last.
    """

    counts: dict[int, torch.Tensor]
    tokens: dict[int, int]
    entropy: dict[int, float]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    def load(self, layer: int) -> torch.Tensor:
        """Tokens each expert received in `layer`: the diagonal, `[experts]`."""
        return torch.diagonal(self.counts[layer]).clone()

    def load_imbalance(self, layer: int) -> float:
        """Busiest expert's load over the mean (`routing.load_imbalance`)."""
        return float(routing.load_imbalance(self.load(layer)))

    def normalized(self, layer: int, mode: str = DEFAULT_NORMALIZATION) -> torch.Tensor:
        return normalize(self.counts[layer], mode, self.tokens.get(layer))

    def merged(self, other: "Coactivation") -> "Coactivation":
        """The sum of two collections (token-weighted entropy); meta spans both."""
        counts, tokens, entropy = dict(self.counts), dict(self.tokens), dict(self.entropy)
        for layer in other.layers:
            if layer not in counts:
                counts[layer], tokens[layer] = other.counts[layer], other.tokens[layer]
                entropy[layer] = other.entropy.get(layer, math.nan)
                continue
            mine, theirs = tokens[layer], other.tokens[layer]
            a, b = entropy.get(layer, math.nan), other.entropy.get(layer, math.nan)
            counts[layer] = counts[layer] + other.counts[layer]
            tokens[layer] = mine + theirs
            entropy[layer] = (a * mine + b * theirs) / max(mine + theirs, 1)
        meta = {**other.meta, **self.meta}
        if "iteration_end" in other.meta:
            meta["iteration_end"] = other.meta["iteration_end"]
        return Coactivation(counts, tokens, entropy, meta)
