"""Pure routing maths for elastic MoE: no Megatron imports, so it can be read and tested alone.

Shapes follow Megatron's router: scores and logits are ``[tokens, experts]``, chosen experts are
``[tokens, k]`` index tensors.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "budget_draw",
    "budget_weights",
    "group_limited_scores",
    "hierarchical_router_loss",
    "mix_seed",
    "router_probabilities",
    "sample_coactivation",
    "sample_token_budgets",
    "scheduled_k_ideal",
    "selection_scores",
    "top_p_budgets",
    "topk_indices",
]


def selection_scores(
    logits: torch.Tensor,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    expert_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores that rank experts, exactly as Megatron's top-k ranks them: ``[tokens, experts]``.

    Softmax without pre-softmax ranks raw logits; sigmoid and sqrt-softplus rank the activated
    scores plus the aux-loss-free expert bias. Only the ranking matters here, not the gates.
    """
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32) if use_pre_softmax else logits
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    elif score_function == "sqrtsoftplus":
        scores = torch.nn.functional.softplus(logits.float()).sqrt()
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    return scores + expert_bias.float() if expert_bias is not None else scores


def group_limited_scores(
    scores: torch.Tensor, num_groups: int, group_topk: int, group_score_topk: int
) -> torch.Tensor:
    """Mask ``scores`` ``[tokens, experts]`` to -inf outside each token's ``group_topk`` groups.

    Groups are ranked by the sum of their ``group_score_topk`` best scores, as in DeepSeek-V2/V3
    device- and node-limited routing (Megatron uses ``topk // group_topk`` for that count).
    """
    tokens, experts = scores.shape
    grouped = scores.view(tokens, num_groups, experts // num_groups)
    group_scores = grouped.topk(max(group_score_topk, 1), dim=-1).values.sum(dim=-1)
    chosen = group_scores.topk(group_topk, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    return scores.masked_fill(~keep, float("-inf"))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring experts per token, best first: ``[tokens, k]``."""
    return scores.topk(k, dim=-1, sorted=True).indices


def sample_coactivation(
    scores: torch.Tensor, k: int, k_ideal: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """EMoE co-activation sampling: per token, a uniform random k-subset of its top-``k_ideal``.

    Returns ``[tokens, k]`` expert indices without repeats, ordered by score (best first). With
    ``k_ideal == k`` it is plain top-k and draws no random numbers. Random keys come from torch's
    RNG (``generator`` or the default one), so activation recompute replays the same choice.
    """
    if not 1 <= k <= k_ideal <= scores.shape[-1]:
        raise ValueError(
            f"need 1 <= k <= k_ideal <= num_experts, got k={k}, k_ideal={k_ideal}, "
            f"num_experts={scores.shape[-1]}"
        )
    pool = topk_indices(scores, k_ideal)  # [tokens, k_ideal], best first
    if k == k_ideal:
        return pool
    keys = torch.rand(pool.shape, generator=generator, device=scores.device)
    # The k smallest of k_ideal i.i.d. uniform keys pick a uniformly random k-subset of positions.
    positions = keys.topk(k, dim=-1, largest=False, sorted=False).indices.sort(dim=-1).values
    return pool.gather(1, positions)


def scheduled_k_ideal(step: int, start: int, final: int, ramp_iters: int, begin: int = 0) -> int:
    """k_ideal at ``step``: ``start`` until ``begin``, linear to ``final`` over ``ramp_iters``
    steps, then ``final``; rounded to the nearest integer, halves up (exact integer maths)."""
    if ramp_iters < 1:
        raise ValueError(f"ramp_iters must be >= 1, got {ramp_iters}")
    done = min(max(step - begin, 0), ramp_iters)
    # floor(start + (final - start) * done / ramp_iters + 1/2), without floats
    return (2 * start * ramp_iters + 2 * (final - start) * done + ramp_iters) // (2 * ramp_iters)


def router_probabilities(logits: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The router's probability of every expert `[tokens, experts]`: the softmax of the logits,
    or sigmoid-type scores normalised to sum to 1 (what top-p budgets are measured against)."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores = selection_scores(logits, score_function)
    return scores / scores.sum(dim=-1, keepdim=True)


def top_p_budgets(ranked_probs: torch.Tensor, p: float) -> torch.Tensor:
    """Token-adaptive budgets ``[tokens]``: the fewest leading experts whose probability mass
    reaches ``p``. ``ranked_probs`` is ``[tokens, k_max]``, each token's best k_max experts in rank
    order, so budgets lie in 1..k_max (k_max where the mass never reaches p)."""
    reached_before = ranked_probs.float().cumsum(dim=-1) - ranked_probs.float() >= p
    return (~reached_before).sum(dim=-1).clamp(min=1)


def hierarchical_router_loss(probs: torch.Tensor) -> torch.Tensor:
    """EMoE's hierarchical router loss: mean over tokens of -KL(h || U).

    ``probs`` is ``[tokens, experts]`` with rows summing to 1. -KL(h||U) = H(h) - log N, so the loss
    is 0 for uniform rows and falls as the router sharpens, down to -log N for one-hot rows.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [tokens, experts], got shape {tuple(probs.shape)}")
    probs = probs.float()
    # p * log p with 0 * log 0 = 0; a clamped log is about twice as fast as xlogy (fwd + bwd)
    neg_entropy = (probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)
    return -(neg_entropy + math.log(probs.shape[-1])).mean()


def budget_weights(
    choices: Sequence[int],
    weighting: str = "uniform",
    temperature: float = 1.0,
    weights: Optional[Sequence[float]] = None,
) -> tuple[float, ...]:
    """The probability of each M-MoE budget in ``choices``, summing to 1.

    ``weights`` (one non-negative number per choice) wins when given; else "uniform" gives each
    choice 1/len, and "capacity" gives P(k) ∝ exp(log k / temperature) = k^(1/temperature), the
    M-MoE paper's capacity-aware sampling (τ = 2 there): larger budgets drawn more often.
    """
    if weights is not None:
        raw = [float(w) for w in weights]
        if len(raw) != len(choices) or min(raw) < 0 or sum(raw) <= 0:
            raise ValueError(
                f"weights must be {len(choices)} non-negative numbers with a positive sum, got {raw}"
            )
    elif weighting == "uniform":
        raw = [1.0] * len(choices)
    elif weighting == "capacity":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logs = [math.log(k) / temperature for k in choices]
        raw = [math.exp(v - max(logs)) for v in logs]  # shifted: no overflow for small τ
    else:
        raise ValueError(f"weighting must be 'uniform' or 'capacity', got {weighting!r}")
    total = math.fsum(raw)
    return tuple(w / total for w in raw)


def sample_token_budgets(
    choices: Sequence[int],
    num_tokens: int,
    device=None,
    generator: Optional[torch.Generator] = None,
    weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """M-MoE per-token budgets: ``[tokens]`` values of ``choices``, uniform or with ``weights``
    (probabilities, e.g. from `budget_weights`)."""
    table = torch.as_tensor(list(choices), dtype=torch.long, device=device)
    if weights is None:
        picks = torch.randint(len(table), (num_tokens,), generator=generator, device=device)
    else:
        probs = torch.as_tensor(list(weights), dtype=torch.float64, device=device)
        picks = torch.multinomial(probs, num_tokens, replacement=True, generator=generator)
    return table[picks]


def budget_draw(
    choices: Sequence[int],
    seed: int,
    stream: int,
    counter: int,
    weights: Optional[Sequence[float]] = None,
) -> int:
    """M-MoE model- or layer-level budget: one value of ``choices`` (uniform, or with
    ``weights``), a pure function of its inputs.

    Every rank that passes the same (seed, stream, counter) gets the same k, with no
    communication and no use of the global RNG, so TP/EP/DP/PP ranks agree and recompute replays.
    """
    generator = torch.Generator().manual_seed(mix_seed(seed, stream, counter))
    if weights is None:
        return int(choices[int(torch.randint(len(choices), (1,), generator=generator))])
    probs = torch.as_tensor(list(weights), dtype=torch.float64)
    return int(choices[int(torch.multinomial(probs, 1, generator=generator))])


def mix_seed(*values: int) -> int:
    """Hash ints into one 63-bit seed (splitmix64 steps): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9
        state &= 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router's softmax over all experts; `logits` is `[tokens, experts]`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def load_imbalance(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Busiest expert's load over the mean load (1 = perfectly balanced); input is `[experts]`."""
    load = tokens_per_expert.float()
    return load.max() / load.mean().clamp_min(1e-9)
