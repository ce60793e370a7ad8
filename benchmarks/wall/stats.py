"""Seed statistics of the scaling-wall grid: pure functions of per-seed losses.

Losses are `{seed: {k': loss}}`. Differences between modes are paired by seed (the same seed
means the same initialisation, data order and validation batches), so a 95% interval is
mean ± t(0.975, n - 1) · sd / √n over the n per-seed differences.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Optional

from scipy.stats import spearmanr
from scipy.stats import t as student_t

Losses = Mapping[int, Mapping[int, float]]  # seed -> k' -> loss
CONFIDENCE = 0.95


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value)."""
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def interval(values: list[float]) -> dict:
    """Mean of paired differences with its two-sided 95% t interval (None bounds for n = 1)."""
    out = mean_sd(values)
    if out["sd"] is None:
        return {**out, "low": None, "high": None}
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * out["sd"] / math.sqrt(len(values))
    return {**out, "low": out["mean"] - half, "high": out["mean"] + half}


def common_seeds(*losses: Losses) -> list[int]:
    """The seeds every one of `losses` has."""
    seeds = set(losses[0])
    for other in losses[1:]:
        seeds &= set(other)
    return sorted(seeds)


def per_budget(losses: Losses) -> dict[int, dict]:
    """k' -> mean and sd over seeds."""
    budgets = sorted(next(iter(losses.values())))
    return {b: mean_sd([losses[s][b] for s in sorted(losses)]) for b in budgets}


def paired(losses: Losses, reference: Losses, budgets=None) -> dict[int, dict]:
    """k' -> the interval of loss - reference loss over the seeds both have."""
    seeds = common_seeds(losses, reference)
    budgets = budgets or sorted(next(iter(losses.values())))
    return {b: interval([losses[s][b] - reference[s][b] for s in seeds]) for b in budgets}


def significantly_above(values: list[float]) -> bool:
    """True when the 95% interval of `values` lies above 0 (False when undefined)."""
    low = interval(values)["low"]
    return low is not None and low > 0


def effective_range(losses: Losses, k: int) -> int:
    """The largest k' >= k up to which the loss never rises significantly above the loss at k:
    for every k <= j <= k', the 95% interval of loss(j) - loss(k) over seeds reaches 0 or below."""
    budgets = sorted(next(iter(losses.values())))
    reach = k
    for j in [b for b in budgets if b > k]:
        if significantly_above([losses[s][j] - losses[s][k] for s in sorted(losses)]):
            break
        reach = j
    return reach


def summarize(losses: Losses, k: int, reference: Optional[Losses] = None) -> dict:
    """Everything the report needs of one mode: per-k' mean ± sd, losses at k, 2k, 3k, the best
    k' (lowest mean), the effective range, and paired differences against `reference`."""
    means = per_budget(losses)
    best = min(means, key=lambda b: (means[b]["mean"], b))
    out = {
        "seeds": sorted(losses),
        "per_budget": {str(b): v for b, v in means.items()},
        "at_k": means[k], "at_2k": means.get(2 * k), "at_3k": means.get(3 * k),
        "best_k": best, "best": means[best],
        "effective_range": effective_range(losses, k),
    }
    if reference is not None:
        out["minus_topk"] = {str(b): v for b, v in paired(losses, reference).items()}
    return out


def training_flops_per_token(sizes: Mapping[str, int], k: float, vocab: int) -> float:
    """Forward + backward FLOPs per token (3 x forward, matmuls only): per layer attention
    projections 8h² and scores 4sh, router 2hE and k SwiGLU experts 6hf; the output layer 2hV."""
    h, s = sizes["hidden_size"], sizes["seq_length"]
    per_layer = 8 * h * h + 4 * s * h + 2 * h * sizes["num_experts"] \
        + k * 6 * h * sizes["moe_ffn_hidden_size"]
    return 3 * (sizes["num_layers"] * per_layer + 2 * h * vocab)


def rank_correlation(xs: list[float], ys: list[float]) -> Optional[dict]:
    """Spearman's rank correlation of paired points with its two-sided p-value (None below 3)."""
    if len(xs) < 3:
        return None
    result = spearmanr(xs, ys)
    return {"spearman": float(result.statistic), "p_value": float(result.pvalue), "points": len(xs)}
