"""The scaling-wall summary as Markdown tables (`scaling_wall.md`), the figures the README quotes."""

from __future__ import annotations


def _ci(d: dict) -> str:
    if d is None:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _mean_sd(v: dict) -> str:
    return f"{v['mean']:.4f}" + ("" if v["sd"] is None else f" ± {v['sd']:.4f}")


def loss_table(block: dict, k: int) -> list[str]:
    """Mode | k' = 1 ... (mean ± sd) | best k' | effective range."""
    budgets = list(next(iter(block["modes"].values()))["per_budget"])
    head = " | ".join(f"k'={b}" + (" (k)" if int(b) == k else "") for b in budgets)
    rows = [f"| mode | {head} | best k' | range |", "|---|" + "---:|" * (len(budgets) + 2)]
    for row in block["modes"].values():
        cells = []
        for b, v in row["per_budget"].items():
            cell = _mean_sd(v)
            cells.append(f"**{cell}**" if int(b) == row["best_k"] else cell)
        rows.append(f"| {row['label']} | " + " | ".join(cells)
                    + f" | {row['best_k']} | {row['effective_range']} |")
    return rows


def compact_table(block: dict, k: int) -> list[str]:
    """Mode | loss at 1, k, 2k, 3k (mean ± sd) | best k' | range | Δ vs Top-k at k and 3k."""
    rows = [f"| mode | k'=1 | k={k} | 2k={2 * k} | 3k={3 * k} | best k' | range | "
            f"Δ Top-k at k [95%] | Δ Top-k at 3k [95%] |", "|---|" + "---:|" * 8]
    for name, row in block["modes"].items():
        at = row["per_budget"]
        diffs = row.get("minus_topk", {}) if name != "topk" else {}
        rows.append(f"| {row['label']} | " + " | ".join(
            _mean_sd(at[str(b)]) for b in (1, k, 2 * k, 3 * k))
            + f" | {row['best_k']} | {row['effective_range']} | "
            + f"{_ci(diffs.get(str(k)))} | {_ci(diffs.get(str(3 * k)))} |")
    return rows


def difference_table(block: dict, k: int) -> list[str]:
    """Mode | loss - Top-k's at k, 2k, 3k with 95% intervals."""
    rows = [f"| mode | Δ at k = {k} | Δ at 2k = {2 * k} | Δ at 3k = {3 * k} |",
            "|---|---:|---:|---:|"]
    for name, row in block["modes"].items():
        if "minus_topk" not in row or name == "topk":
            continue
        diffs = row["minus_topk"]
        rows.append(f"| {row['label']} | " + " | ".join(
            _ci(diffs.get(str(b))) for b in (k, 2 * k, 3 * k)) + " |")
    return rows


def specialist_table(gaps: dict, labels: dict) -> list[str]:
    """M-MoE variant | its loss - the specialist's at each k'."""
    if not gaps:
        return []
    budgets = sorted({b for row in gaps.values() for b in row}, key=int)
    rows = ["| M-MoE variant | " + " | ".join(f"k'={b}" for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets)]
    for name, row in gaps.items():
        rows.append(f"| {labels[name]} | " + " | ".join(_ci(row.get(b)) for b in budgets) + " |")
    return rows


def compute_table(compute: dict, labels: dict) -> list[str]:
    rows = ["| setting | M-MoE variant | E[k] | suite / model FLOPs | suite / model training time |",
            "|---|---|---:|---:|---:|"]
    for setting, block in compute.items():
        for name, row in block["elastic_models"].items():
            time = row["suite_over_model_time"]
            rows.append(f"| ({setting}) | {labels[name]} | {row['expected_k']:.2f} | "
                        f"{row['suite_over_model_flops']:.2f} | "
                        + ("–" if time is None else f"{time:.2f}") + " |")
    return rows


def remedy_table(remedies: dict) -> list[str]:
    noise = next(iter(remedies.values()))["seed_noise"]
    rows = [f"| (a) | loss at k − Top-k [95%] | within seed noise (≤ {noise:.3f}) | "
            "significantly worse | range | works |", "|---|---:|:---:|:---:|---:|:---:|"]
    for row in remedies.values():
        label = row["label"] + (" (no remedy)" if row["baseline"] else "")
        rows.append(f"| {label} | {_ci(row['loss_at_k_minus_topk'])} | "
                    f"{'yes' if row['within_noise_at_k'] else 'no'} | "
                    f"{'yes' if row['significantly_worse_at_k'] else 'no'} | "
                    f"{row['effective_range']} | {'yes' if row['works'] else 'no'} |")
    return rows


def markdown(summary: dict) -> str:
    """Every table of the summary, per setting."""
    k = summary["settings"]["topk"]
    out = [f"# Scaling wall: {summary['settings']['profile']} profile, seeds "
           f"{summary['settings']['seeds']}", ""]
    for setting, block in summary["results"].items():
        if not block["modes"]:
            continue
        labels = {name: row["label"] for name, row in block["modes"].items()}
        out += [f"## ({setting}) {block['description']}", "",
                "Loss at 1, k, 2k and 3k (mean ± sd over seeds), best k', effective range, and "
                "the paired difference to Top-k at k and 3k (mean [95% interval]).", "",
                *compact_table(block, k), "",
                "Validation loss, mean ± sd over seeds (bold: best k'; range: effective range).", "",
                *loss_table(block, k), "",
                "Loss − Top-k's at the same k', paired by seed, mean [95% interval].", "",
                *difference_table(block, k), ""]
        gaps = summary["mmoe_vs_specialists"].get(setting) or {}
        if gaps:
            out += ["M-MoE − the Top-k model trained at k' (paired, [95%]).", "",
                    *specialist_table(gaps, labels), ""]
        correlation = summary.get("coactivation_correlation", {}).get(setting)
        if correlation:
            out += [f"Co-activation distance against loss(k') − loss(k), k' > 1, every mode: "
                    f"Spearman ρ = {correlation['spearman']:.3f} over {correlation['points']} "
                    f"points (p = {correlation['p_value']:.2g}).", ""]
    labels = {name: row["label"] for block in summary["results"].values()
              for name, row in block["modes"].items()}
    out += ["## Training compute: the specialists' suite against one elastic model", "",
            *compute_table(summary["training_compute"], labels), ""]
    if summary.get("remedies"):
        out += ["## Elastic pretraining (a)", "", *remedy_table(summary["remedies"]), ""]
    return "\n".join(out)
