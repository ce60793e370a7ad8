"""Writing budget results: JSON (everything), CSV (one row per budget), PNG (quality vs cost)."""

from __future__ import annotations

import csv
import io
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_emoe.files import write_bytes_atomically, write_text_atomically

CSV_COLUMNS = ("kind", "label", "val_loss", "perplexity", "active_experts", "expert_gflops",
               "routed_tokens")
FILES = ("elastic_eval.json", "elastic_eval.csv", "elastic_eval.png")


def budget_kind(budget) -> str:
    """"global" (one k' for all layers), "per_layer" or "top_p", from a result's JSON budget."""
    if isinstance(budget, dict):
        return "top_p"
    return "per_layer" if isinstance(budget, list) else "global"


def csv_text(results: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([budget_kind(r["budget"]), r["label"], f"{r['val_loss']:.6f}",
                         f"{r['perplexity']:.4f}", f"{r['active_experts']:.4f}",
                         f"{r['expert_flops'] / 1e9:.6f}", r["routed_tokens"]])
    return out.getvalue()


def plot_png(results: list[dict], title: str, train_topk: int) -> bytes:
    """Validation loss against mean active experts per token and against routed-expert GFLOPs per
    token: global budgets as a line, per-layer and top-p budgets as labelled points."""
    # The Agg canvas directly, not pyplot: no global figure state, no GUI backend.
    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    styles = {"global": ("o-", "budget k' (all layers)"), "per_layer": ("s", "per-layer budget"),
              "top_p": ("^", "top-p (token-adaptive)")}
    for axis, key, xlabel in (
        (axes[0], "active_experts", "active experts per token (mean over MoE layers)"),
        (axes[1], "expert_gflops", "routed-expert forward GFLOPs per token"),
    ):
        for kind, (style, name) in styles.items():
            rows = [r for r in results if budget_kind(r["budget"]) == kind]
            if kind == "global":
                rows.sort(key=lambda r: r["active_experts"])
            if not rows:
                continue
            xs = [r["active_experts"] if key == "active_experts" else r["expert_flops"] / 1e9
                  for r in rows]
            ys = [r["val_loss"] for r in rows]
            axis.plot(xs, ys, style, label=name)
            if kind != "global":
                for x, y, r in zip(xs, ys, rows):
                    axis.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3),
                                  textcoords="offset points")
        if key == "active_experts":
            axis.axvline(train_topk, color="grey", linestyle=":", label=f"training k = {train_topk}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def existing_outputs(directory: str) -> list[str]:
    return [name for name in FILES if os.path.exists(os.path.join(directory, name))]


def write_all(directory: str, record: dict) -> list[str]:
    """Write the JSON record, its CSV table and its plot into `directory` (each atomically)."""
    os.makedirs(directory, exist_ok=True)
    results = record["results"]
    paths = [os.path.join(directory, name) for name in FILES]
    write_text_atomically(paths[0], json.dumps(record, indent=2) + "\n")
    write_text_atomically(paths[1], csv_text(results))
    title = (f"{record['checkpoint']} (iteration {record['iteration']}, "
             f"{record['router_mode']}, trained k = {record['train_topk']})")
    write_bytes_atomically(paths[2], plot_png(results, title, record["train_topk"]))
    return paths
