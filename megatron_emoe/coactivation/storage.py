"""Co-activation files: `<directory>/<tag>.npz` (+ its heatmaps), written atomically on rank 0."""

from __future__ import annotations

import io
import json
import math
import os
import zipfile

import numpy as np
import torch

from megatron_emoe.coactivation.counts import DEFAULT_NORMALIZATION
from megatron_emoe.coactivation.plots import save_heatmaps
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.errors import UsageError
from megatron_emoe.files import write_bytes_atomically

# Tag (file name without `.npz`) of the whole run's training matrices.
TRAIN_TAG = "train"


def save(stats: Coactivation, directory: str, tag: str, *, heatmaps: bool = True,
         mode: str = DEFAULT_NORMALIZATION) -> str:
    """Write `<directory>/<tag>.npz` (and `<directory>/<tag>/layer_LL.png`); returns the npz path.

    Arrays: `layers` [L], `counts` [L, experts, experts] int64, `tokens` [L], `entropy` [L]
    (NaN when not recorded), and `meta` (a JSON string: phase, budget, iterations).
    """
    os.makedirs(directory, exist_ok=True)
    layers = stats.layers
    experts = stats.counts[layers[0]].shape[0] if layers else 0
    buffer = io.BytesIO()
    np.savez(
        buffer,
        layers=np.asarray(layers, dtype=np.int64),
        counts=np.stack([stats.counts[n].numpy() for n in layers]).astype(np.int64)
        if layers else np.zeros((0, experts, experts), dtype=np.int64),
        tokens=np.asarray([stats.tokens[n] for n in layers], dtype=np.int64),
        entropy=np.asarray([stats.entropy.get(n, math.nan) for n in layers], dtype=np.float64),
        meta=np.asarray(json.dumps(stats.meta, sort_keys=True)),
    )
    path = os.path.join(directory, f"{tag}.npz")
    write_bytes_atomically(path, buffer.getvalue())
    if heatmaps:
        save_heatmaps(stats, os.path.join(directory, tag), mode=mode)
    return path


def load(path: str) -> Coactivation:
    """Read a file written by `save`; a truncated, garbled or foreign file is a `UsageError`
    naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            layers = [int(n) for n in data["layers"]]
            counts = {n: torch.from_numpy(data["counts"][i].copy()) for i, n in enumerate(layers)}
            tokens = {n: int(data["tokens"][i]) for i, n in enumerate(layers)}
            entropy = {n: float(data["entropy"][i]) for i, n in enumerate(layers)}
            meta = json.loads(str(data["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("its 'meta' is not a JSON object")
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as error:
        message = " ".join(str(error).split())
        raise UsageError(
            f"co-activation file {path} is truncated, corrupt or not written by this package "
            f"({type(error).__name__}: {message}): delete or replace it"
        ) from None
    return Coactivation(counts, tokens, entropy, meta)


def write_reduced(
    stats: Coactivation, directory: str, tag: str, *, heatmaps: bool = True, **meta
) -> None:
    """Tag `stats` (already reduced over ranks) and save them as `<directory>/<tag>.npz` (+ heatmaps)
    on rank 0; every rank may call it."""
    stats.meta.update(tag=tag, **meta)
    if _rank() == 0:
        save(stats, directory, tag, heatmaps=heatmaps)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
