"""Heatmap PNGs of co-activation matrices, one per MoE layer.

Drawn on matplotlib's Agg canvas directly, not pyplot: no global figure state, no GUI backend.
"""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from megatron_emoe.coactivation.counts import DEFAULT_NORMALIZATION, has_pairs
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.files import write_bytes_atomically

NO_PAIRS_TITLE = "no co-activated pairs (one expert per token); expert load shown"


def layer_figure(stats: Coactivation, layer: int, mode: str = DEFAULT_NORMALIZATION) -> Figure:
    """The figure of one layer: the heatmap of the normalised matrix or, when "pairs" has no pair
    to show (each token went to one expert, as at k' = 1), each expert's fraction of the tokens."""
    figure = Figure(figsize=(5.2, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    title = f"{stats.meta.get('tag', '')} layer {layer} ({stats.tokens[layer]} tokens)"
    if mode == "pairs" and not has_pairs(stats.counts[layer]):
        load = stats.load(layer).double() / max(stats.tokens[layer], 1)
        axes.bar(np.arange(load.numel()), load.numpy(), color=colormaps["viridis"](0.35))
        axes.set_ylabel("fraction of tokens")
        title = f"{title}\n{NO_PAIRS_TITLE}"
    else:
        matrix = stats.normalized(layer, mode).numpy()
        if mode == "pairs":  # the diagonal is not a pair: grey, outside the colour scale
            matrix = np.ma.masked_array(matrix, mask=np.eye(matrix.shape[0], dtype=bool))
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
        image = axes.imshow(matrix, cmap=cmap, interpolation="nearest")
        figure.colorbar(image, ax=axes, label=f"co-activation ({mode})")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("expert")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_heatmaps(
    stats: Coactivation, directory: str, *, mode: str = DEFAULT_NORMALIZATION
) -> list[str]:
    """One PNG per layer (see `layer_figure`): `<directory>/layer_LL.png`; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for layer in stats.layers:
        buffer = io.BytesIO()
        layer_figure(stats, layer, mode).savefig(buffer, format="png", dpi=100)
        path = os.path.join(directory, f"layer_{layer:02d}.png")
        write_bytes_atomically(path, buffer.getvalue())
        paths.append(path)
    return paths
