"""The scaling-wall figures, each a PNG's bytes drawn from the summary (`scaling_wall.json`)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = ("topk", "emoe", "mmoe-layer", "mmoe-model-global", "mmoe-model-micro", "mmoe-token",
          "mmoe-layer-capacity")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _panels(summary: dict, height: float = 4.4):
    settings = summary["results"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), height), squeeze=False)
    return fig, list(zip(axes[0], settings.items()))


def _title(setting: str, block: dict) -> str:
    return f"({setting}) {block['description']}"


def _curve(ax, row: dict, label: str, **style) -> None:
    budgets = [int(b) for b in row["per_budget"]]
    mean = [v["mean"] for v in row["per_budget"].values()]
    sd = [v["sd"] or 0.0 for v in row["per_budget"].values()]
    (line,) = ax.plot(budgets, mean, marker="o", markersize=3, label=label, **style)
    ax.fill_between(budgets, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                    color=line.get_color(), alpha=0.15)


def loss_curves(summary: dict) -> bytes:
    """Validation loss against k' per mode, mean over seeds with a ± sd band, one panel per setting."""
    k = summary["settings"]["topk"]
    fig, panels = _panels(summary)
    for ax, (setting, block) in panels:
        for mode in CURVES:
            if mode in block["modes"]:
                row = block["modes"][mode]
                _curve(ax, row, row["label"], linewidth=2.2 if mode in ("topk", "emoe") else 1.2)
        ax.axvline(k, color="0.6", linestyle=":", label=f"trained k = {k}")
        ax.set_xlabel("active experts per token k'")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(_title(setting, block), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Scaling wall: mean ± sd over seeds {summary['settings']['seeds']}", fontsize=11)
    return _png(fig)


def specialists(summary: dict) -> bytes:
    """Each M-MoE variant minus the Top-k model trained at k', per k' (paired over seeds, 95%
    interval): below 0, one elastic model beats that specialist."""
    fig, panels = _panels(summary)
    for ax, (setting, block) in panels:
        gaps = summary["mmoe_vs_specialists"].get(setting, {})
        for i, (name, row) in enumerate(gaps.items()):
            budgets = sorted(row, key=int)
            shift = (i - (len(gaps) - 1) / 2) * 0.06  # side by side, so the bars stay readable
            mean = [row[b]["mean"] for b in budgets]
            low = [row[b]["mean"] - row[b]["low"] if row[b]["low"] is not None else 0 for b in budgets]
            high = [row[b]["high"] - row[b]["mean"] if row[b]["high"] is not None else 0
                    for b in budgets]
            ax.errorbar([int(b) + shift for b in budgets], mean, yerr=[low, high], marker="o",
                        markersize=3, capsize=2, linewidth=1, label=block["modes"][name]["label"])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(sorted({int(b) for row in gaps.values() for b in row}))
        ax.set_xlabel("k' (the specialist's training k)")
        ax.set_ylabel("M-MoE − specialist at k' (nats)")
        ax.set_title(_title(setting, block), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("One elastic M-MoE model against the Top-k model trained at each k' "
                 "(paired by seed, 95% interval)", fontsize=11)
    return _png(fig)


def ablations(summary: dict) -> bytes:
    """EMoE, its ablations and the remedies: loss minus Top-k's at k, 2k and 3k (paired over
    seeds, 95% interval)."""
    k = summary["settings"]["topk"]
    fig, panels = _panels(summary, height=4.8)
    for ax, (setting, block) in panels:
        names = [m for m, row in block["modes"].items() if row["group"] in ("emoe", "remedy")]
        width = 0.8 / 3
        for i, budget in enumerate((k, 2 * k, 3 * k)):
            means, errors = [], [[], []]
            for name in names:
                diff = block["modes"][name]["minus_topk"][str(budget)]
                means.append(diff["mean"])
                errors[0].append(diff["mean"] - diff["low"] if diff["low"] is not None else 0)
                errors[1].append(diff["high"] - diff["mean"] if diff["high"] is not None else 0)
            ax.bar([j + (i - 1) * width for j in range(len(names))], means, width, yerr=errors,
                   capsize=2, label=f"k' = {budget}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([block["modes"][n]["label"] for n in names], rotation=30, ha="right",
                           fontsize=7)
        ax.set_ylabel("loss − Top-k loss at the same k' (nats)")
        ax.set_title(_title(setting, block), fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("Ablations and remedies against Top-k (paired by seed, 95% interval)", fontsize=11)
    return _png(fig)


def coactivation(summary: dict) -> bytes:
    """Per mode and k': the train-vs-eval co-activation distance against the loss change from k."""
    fig, panels = _panels(summary)
    for ax, (setting, block) in panels:
        for mode, points in summary["coactivation"].get(setting, {}).items():
            xs = [p["distance"] for p in points.values()]
            ys = [p["loss_change"] for p in points.values()]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=0.8,
                    label=block["modes"][mode]["label"])
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel("co-activation distance, training vs evaluation at k' (mean over layers)")
        ax.set_ylabel("loss(k') − loss(k) (nats)")
        ax.set_title(_title(setting, block), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("The EMoE mechanism: co-activations unseen in training against the loss change",
                 fontsize=11)
    return _png(fig)


FIGURES = {"scaling_wall.png": loss_curves, "scaling_wall_specialists.png": specialists,
           "scaling_wall_ablations.png": ablations,
           "scaling_wall_coactivation.png": coactivation}
