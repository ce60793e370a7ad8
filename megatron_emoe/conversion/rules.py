"""What a conversion rule is, and the config facts every family reads (no Megatron import)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from megatron_emoe.errors import UsageError


class ConversionError(UsageError):
    """Input the converter refuses: unsupported architecture, bad layout, missing tensors."""


def _one(*hf: torch.Tensor) -> torch.Tensor:
    (tensor,) = hf
    return tensor


def _as_tuple(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it is built from (and split back into)."""

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[..., torch.Tensor] = _one
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _as_tuple



def rope_parameters(config) -> dict:
    """RoPE settings from a transformers 5 `rope_parameters` dict or the older fields."""
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": getattr(config, "rope_theta", 10000.0)}
