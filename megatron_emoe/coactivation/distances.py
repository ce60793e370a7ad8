"""Train vs eval: the per-layer Frobenius distance between normalised co-activation matrices,
as a JSON table (`<directory>/coactivation_distance.json`)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

from megatron_emoe.coactivation.counts import (
    DEFAULT_NORMALIZATION,
    frobenius_distance,
    has_pairs,
)
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.coactivation.storage import TRAIN_TAG, load
from megatron_emoe.files import write_text_atomically

DISTANCE_FILE = "coactivation_distance.json"


def distance_table(
    train: Coactivation, evals: Mapping[Any, Coactivation], mode: str = DEFAULT_NORMALIZATION
) -> dict:
    """Per-layer Frobenius distance between the training matrices and the eval ones at each
    budget k', both normalised with `mode` (None where a "pairs" matrix has no pairs, as at
    k' = 1); plus each side's tokens, load imbalance and entropy. JSON-ready: string keys."""
    def summary(stats: Coactivation, layers: Sequence[int]) -> dict:
        return {
            "meta": stats.meta,
            "tokens": {str(n): stats.tokens[n] for n in layers},
            "load_imbalance": {str(n): stats.load_imbalance(n) for n in layers},
            "router_entropy": {str(n): _json_float(stats.entropy.get(n, math.nan)) for n in layers},
        }

    table: dict[str, Any] = {
        "normalization": mode,
        "definition": "||normalize(train) - normalize(eval at k')||_F per MoE layer; "
        "M[i][j] = tokens routed to both experts i and j",
        "train": summary(train, train.layers),
        "frobenius": {},
        "mean_over_layers": {},
        "eval": {},
    }
    for budget, stats in evals.items():
        key = _budget_key(budget)
        distances = {
            str(n): _distance(train, stats, n, mode) for n in stats.layers if n in train.counts
        }
        defined = [d for d in distances.values() if d is not None]
        table["frobenius"][key] = distances
        table["mean_over_layers"][key] = sum(defined) / len(defined) if defined else None
        table["eval"][key] = summary(stats, stats.layers)
    return table


def write_distance_table(path: str, table: dict) -> None:
    """Write the table as JSON, atomically."""
    write_text_atomically(path, json.dumps(table, indent=2, sort_keys=False) + "\n")


def compare_directory(
    directory: str, mode: str = DEFAULT_NORMALIZATION, output: Optional[str] = None
) -> Optional[dict]:
    """Distance table between `<directory>/train.npz` and every `<directory>/eval_k*.npz`, written
    to `output` (default `<directory>/coactivation_distance.json`); None without both kinds."""
    train_path = os.path.join(directory, f"{TRAIN_TAG}.npz")
    if not os.path.isfile(train_path):
        return None
    evals = {}
    for path in glob.glob(os.path.join(directory, "eval_k*.npz")):
        stats = load(path)
        match = re.fullmatch(r"eval_k([\d-]+)\.npz", os.path.basename(path))
        budget = stats.meta.get("budget", match.group(1) if match else path)
        evals[_budget_key(budget)] = stats
    if not evals:
        return None
    ordered = dict(sorted(evals.items(), key=lambda item: [int(x) for x in item[0].split("-")]))
    table = distance_table(load(train_path), ordered, mode)
    write_distance_table(output or os.path.join(directory, DISTANCE_FILE), table)
    return table


def _distance(train: Coactivation, other: Coactivation, layer: int, mode: str) -> Optional[float]:
    """Frobenius distance of one layer; None under "pairs" when a side has no pairs (k' = 1)."""
    if mode == "pairs" and not all(has_pairs(s.counts[layer]) for s in (train, other)):
        return None
    return frobenius_distance(train.normalized(layer, mode), other.normalized(layer, mode))


def _budget_key(budget) -> str:
    """A budget's JSON key: its label ("2", "1-2-4", "top_p0.5_max4")."""
    if hasattr(budget, "label"):
        return budget.label
    if isinstance(budget, (list, tuple)):
        return "-".join(str(int(k)) for k in budget)
    return str(budget)


def _json_float(value: float) -> Optional[float]:
    return None if math.isnan(value) else value
