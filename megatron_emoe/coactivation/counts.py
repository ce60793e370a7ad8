"""Co-activation maths on plain tensors: counts from a routing map, normalisation, distance.

Pure torch (no Megatron import), so it can be read and tested alone.
"""

from __future__ import annotations

from typing import Optional

import torch

NORMALIZATIONS = ("pairs", "tokens", "total")
# Default normalisation: the distribution over co-activated expert pairs (see `normalize`).
DEFAULT_NORMALIZATION = "pairs"

# Rows per matmul in `coactivation_counts`: float32 sums of 0/1 values are exact below 2**24.
_EXACT_ROWS = 1 << 24


def coactivation_counts(
    routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Co-activation counts `[experts, experts]` (int64) of a boolean map `[tokens, experts]`.

    M[i, j] = number of tokens routed to both i and j, so M is symmetric and its diagonal is each
    expert's load. `padding_mask` (`[tokens]`, True = padding, Megatron's convention) drops rows.
    """
    if routing_map.dim() != 2:
        raise ValueError(
            f"routing_map must be [tokens, experts], got shape {tuple(routing_map.shape)}"
        )
    if padding_mask is not None:
        routing_map = routing_map[~padding_mask.reshape(-1).bool()]
    experts = routing_map.shape[1]
    counts = torch.zeros(experts, experts, dtype=torch.int64, device=routing_map.device)
    for start in range(0, routing_map.shape[0], _EXACT_ROWS):
        rows = routing_map[start : start + _EXACT_ROWS].to(torch.float32)
        counts += (rows.t() @ rows).round().to(torch.int64)
    return counts


def has_pairs(counts: torch.Tensor) -> bool:
    """True when some token was routed to two experts or more (an off-diagonal count > 0)."""
    return bool((counts.sum() - torch.diagonal(counts).sum()) > 0)


def normalize(
    counts: torch.Tensor, mode: str = DEFAULT_NORMALIZATION, num_tokens: Optional[int] = None
) -> torch.Tensor:
    """Co-occurrence frequencies `[experts, experts]` (float64) from counts, comparable across k.

    - "pairs" (default): the diagonal is dropped and the off-diagonal entries sum to 1, i.e. the
      probability that a co-activated pair (token, i, j) is (i, j). Scale-free in tokens and in k,
      so a matrix collected at the training k compares with one at k' on *which* experts work
      together; EMoE sampling of k of the top-k_ideal matches top-k_ideal inference exactly in
      expectation under it. A map with no pairs (k = 1) gives zeros.
    - "tokens": counts / tokens, i.e. P(a token activates both i and j); the diagonal is the load
      fraction and the total is about k^2, so it also changes with k. Needs `num_tokens`.
    - "total": counts / their sum.
    """
    counts = counts.to(torch.float64)
    if mode == "pairs":
        pairs = counts - torch.diag(torch.diagonal(counts))
        total = pairs.sum()
        return pairs / total if total > 0 else pairs
    if mode == "tokens":
        if not num_tokens:
            raise ValueError("normalize(mode='tokens') needs num_tokens > 0")
        return counts / num_tokens
    if mode == "total":
        total = counts.sum()
        return counts / total if total > 0 else counts
    raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


def frobenius_distance(train_matrix: torch.Tensor, eval_matrix: torch.Tensor) -> float:
    """||train - eval||_F of two normalised `[experts, experts]` matrices (see `normalize`)."""
    if train_matrix.shape != eval_matrix.shape:
        raise ValueError(
            f"matrices differ in shape: {tuple(train_matrix.shape)} vs {tuple(eval_matrix.shape)}"
        )
    diff = train_matrix.to(torch.float64) - eval_matrix.to(torch.float64)
    return float(torch.linalg.matrix_norm(diff, ord="fro"))
