"""The inference budget k': how many experts each token activates, as one value.

A `Budget` is one of
- `Budget(2)`: every MoE layer routes each token to its top-2 experts;
- `Budget((1, 2, 4, 4))`: one k' per MoE decoder layer in layer order, optionally followed by one
  per MTP layer (global layer order, so every pipeline stage takes the same list);
- `Budget(TopP(0.5, 4))`: token-adaptive, each token takes the fewest of its best-ranked experts
  whose router probability reaches p, at most 4.

"No budget" (None) means the training top-k. A budget is parsed from command-line text, labelled
for tables and file names, written to and read from JSON, validated against a Megatron
`TransformerConfig` (every rule), and resolved per layer, all here. Pure Python: no Megatron import.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

from megatron_emoe.errors import UsageError
from megatron_emoe.layers import decoder_moe_layers

_TOP_P_LABEL = re.compile(r"top_p([0-9.eE+-]+)_max(\d+)")


@dataclasses.dataclass(frozen=True)
class TopP:
    """Token-adaptive inference budget: each token takes the fewest of its best-ranked experts
    whose router probability mass reaches `p`, and at most `max_experts`."""

    p: float
    max_experts: int

    @property
    def label(self) -> str:
        return f"top_p{self.p:g}_max{self.max_experts}"


BudgetLike = Union[None, int, Sequence[int], TopP, "Budget"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """k' for every MoE layer (int), one per MoE layer (tuple of ints), or token-adaptive (`TopP`)."""

    value: Union[int, tuple[int, ...], TopP]

    # ------------------------------------------------------------------ construction ---------
    @classmethod
    def of(cls, budget: BudgetLike, flag: str = "budget") -> Optional["Budget"]:
        """A `Budget` from an int, a sequence of ints (a one-element one is an int), a `TopP`, a
        `Budget`, or None (the training top-k: returns None). Raises `UsageError` naming `flag` for
        anything else; the range is checked by `validate`."""
        if budget is None or isinstance(budget, Budget):
            return budget
        if isinstance(budget, TopP):
            return cls(budget)
        if isinstance(budget, int) and not isinstance(budget, bool):
            return cls(budget)
        if isinstance(budget, Sequence) and not isinstance(budget, (str, bytes)):
            values = list(budget)
            if values and all(isinstance(k, int) and not isinstance(k, bool) for k in values):
                return cls(values[0]) if len(values) == 1 else cls(tuple(values))
        raise UsageError(f"{flag} must be an int, a list of ints (one per MoE layer) or top-p, "
                         f"got {budget!r}")

    @classmethod
    def parse(cls, text: Union[str, int, Sequence[int], None], flag: str = "budget") -> Optional["Budget"]:
        """A budget from command-line or model-argument text: "2", "1-2-4-4" or "1,2,4,4" (one per
        MoE layer), a label such as "top_p0.5_max4", "" or "default" (None). Non-text values go
        through `of`."""
        if not isinstance(text, str):
            return cls.of(text, flag)
        text = text.strip()
        if text in ("", "default"):
            return None
        if match := _TOP_P_LABEL.fullmatch(text):
            try:
                return cls(TopP(float(match[1]), int(match[2])))
            except ValueError:
                pass
        try:
            return cls.of([int(part) for part in text.replace(",", "-").split("-")], flag)
        except ValueError:
            raise UsageError(
                f"{flag} takes a number of experts (2), one per MoE layer (1-2-4-4) or a top-p "
                f"label (top_p0.5_max4), got {text!r}"
            ) from None

    @classmethod
    def from_json(cls, data: Any, flag: str = "budget") -> Optional["Budget"]:
        """The inverse of `to_json`."""
        if isinstance(data, dict):
            if set(data) != {"top_p", "max_experts"}:
                raise UsageError(f"{flag}: a top-p budget needs exactly top_p and max_experts, got {data!r}")
            return cls(TopP(data["top_p"], data["max_experts"]))
        return cls.of(data, flag)

    # ------------------------------------------------------------------ views -----------------
    @property
    def is_top_p(self) -> bool:
        return isinstance(self.value, TopP)

    @property
    def label(self) -> str:
        """Short text for tables, file names and JSON keys: "2", "1-2-3-4", "top_p0.5_max4";
        `parse` reads it back."""
        if isinstance(self.value, TopP):
            return self.value.label
        if isinstance(self.value, tuple):
            return "-".join(str(k) for k in self.value)
        return str(self.value)

    def to_json(self) -> Union[int, list[int], dict]:
        """An int, a list (one per MoE layer) or {"top_p": p, "max_experts": k}."""
        if isinstance(self.value, TopP):
            return {"top_p": self.value.p, "max_experts": self.value.max_experts}
        return list(self.value) if isinstance(self.value, tuple) else self.value

    # ------------------------------------------------------------------ against a model -------
    def validate(self, config, flag: str = "budget") -> "Budget":
        """Check against a Megatron `TransformerConfig`; return the budget (top-p normalised).

        1 <= k' <= the experts a token can reach (all, or its groups' under group-limited routing;
        the training top-k for the ncclep flex backend); a per-layer list has one entry per MoE
        decoder layer, optionally followed by one per MTP layer; top-p needs a dispatcher that
        takes a different number of experts per token.
        """
        if isinstance(self.value, TopP):
            return Budget(_validated_top_p(self.value, config, flag))
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        limit = max_routable_experts(config)
        if ncclep_dispatcher(config):  # buffers sized from the training top-k at the first dispatch
            limit = min(limit, config.moe_router_topk)
        for k in values:
            if not 1 <= k <= limit:
                reason = ("the ncclep flex backend cannot grow past the training top-k"
                          if ncclep_dispatcher(config) else limit_reason(config))
                raise UsageError(f"{flag} must be in [1, {limit}] ({reason}), got {k}")
        if isinstance(self.value, tuple):
            num_decoder = len(decoder_moe_layers(config))
            lengths = sorted({num_decoder, num_decoder + (config.mtp_num_layers or 0)})
            if len(values) not in lengths:
                raise UsageError(
                    f"{flag} per-layer list must have one entry per MoE layer "
                    f"({' or '.join(map(str, lengths))} for this model), got {len(values)}"
                )
        return self

    def for_layer(self, config, layer_number: int, is_mtp_layer: bool) -> Union[int, TopP]:
        """The k' (or `TopP`) of one MoE layer; MTP layers without an entry take the last decoder
        entry."""
        if not isinstance(self.value, tuple):
            return self.value
        decoder = decoder_moe_layers(config)
        if not is_mtp_layer:
            return self.value[decoder.index(layer_number)]
        position = len(decoder) + layer_number - 1
        return self.value[position] if position < len(self.value) else self.value[len(decoder) - 1]

    def planned_experts(self, config) -> list[int]:
        """Experts per token in each MoE decoder layer (known before running, except for top-p)."""
        if isinstance(self.value, TopP):
            raise ValueError("a top-p budget's experts per token are known only after evaluating it")
        layers = decoder_moe_layers(config)
        if isinstance(self.value, int):
            return [self.value] * len(layers)
        return list(self.value[: len(layers)])


def planned_experts(config, budget: Optional[Budget]) -> list[int]:
    """Experts per token in each MoE decoder layer for a fixed budget (None: the training top-k)."""
    return (budget or Budget(config.moe_router_topk)).planned_experts(config)


def label(budget: Optional[Budget]) -> str:
    """`Budget.label`, or "default" for None (the training top-k)."""
    return "default" if budget is None else budget.label


def to_json(budget: Optional[Budget]):
    """`Budget.to_json`, or None for no budget (the training top-k)."""
    return None if budget is None else budget.to_json()


# ---------------------------------------------------------------------- model reach ----------
def max_routable_experts(config) -> int:
    """The most experts a token can reach: all of them, or those in its groups if group-limited."""
    if config.moe_router_num_groups and config.moe_router_group_topk:
        return config.moe_router_group_topk * (config.num_moe_experts // config.moe_router_num_groups)
    return config.num_moe_experts


def takes_per_token_budgets(config) -> bool:
    """Whether the token dispatcher accepts a different number of experts for each token: the
    dropless alltoall and flex dispatchers need exactly moe-router-topk per token."""
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher == "flex":
        return False
    if dispatcher == "alltoall":
        return config.moe_expert_capacity_factor is not None or config.moe_router_padding_for_quantization
    return True


def limit_reason(config) -> str:
    """Why `max_routable_experts` is what it is, for error messages."""
    if config.moe_router_num_groups and config.moe_router_group_topk:
        return (
            f"moe-router-group-topk={config.moe_router_group_topk} groups of "
            f"{config.num_moe_experts // config.moe_router_num_groups} experts"
        )
    return f"num-experts={config.num_moe_experts}"


def ncclep_dispatcher(config) -> bool:
    """Whether the flex dispatcher's ncclep backend runs (its buffers are sized once)."""
    return (config.moe_token_dispatcher_type == "flex"
            and getattr(config, "moe_flex_dispatcher_backend", None) == "ncclep")


def _validated_top_p(budget: TopP, config, flag: str) -> TopP:
    limit = max_routable_experts(config)
    if isinstance(budget.p, bool) or not isinstance(budget.p, (int, float)) or not 0 < budget.p <= 1:
        raise UsageError(f"{flag} top-p must be in (0, 1], got {budget.p!r}")
    k_max = budget.max_experts
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= limit:
        raise UsageError(
            f"{flag} top-p max experts must be in [1, {limit}] ({limit_reason(config)}), got {k_max!r}"
        )
    if not takes_per_token_budgets(config):
        raise UsageError(
            f"{flag} top-p gives each token its own number of experts, which "
            f"--moe-token-dispatcher-type {config.moe_token_dispatcher_type} cannot take in dropless "
            f"mode: build the model with --moe-token-dispatcher-type allgather for top-p budgets"
        )
    return TopP(float(budget.p), k_max)
