"""Markdown tables of benchmark results, in the layout of docs/performance.md.

    python -m benchmarks.tables                       # benchmarks/results/*.json
    python -m benchmarks.tables --results /tmp/gpu    # another results folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_line(record: dict) -> str:
    m = record["machine"]
    git = m.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = m.get("load_average_1min") or {}
    threads = (f", {m['torch_threads']} torch threads, load average {load.get('start')} at start, "
               f"{load.get('end')} at end" if m["device"] == "cpu" else "")
    return (f"{m['device_name']} ({m['device']}{threads}), torch {m['torch']}, "
            f"megatron-core {m['megatron_core']}, Transformer Engine {m['transformer_engine'] or 'none'}, "
            f"{m['date']}, commit {commit}  \n`{m['command']}`")


def router_overhead(record: dict) -> list[str]:
    rows = ["| scope | experts | tokens | Top-k ms | EMoE ms | EMoE / Top-k | M-MoE ms | M-MoE / Top-k |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    cells: dict = {}
    for f in record["figures"]:
        key = (f["scope"], f["experts"], f["tokens"])
        cells.setdefault(key, {"topk": f["baseline_ms"]["median_ms"]})
        cells[key][f["variant"]] = (f["variant_ms"]["median_ms"], f["ratio"])
    for scope in ("router", "layer"):
        for (s, e, t), c in cells.items():
            if s != scope:
                continue
            row = [s, str(e), str(t), f"{c['topk']:.2f}"]
            for variant in ("emoe", "mmoe"):
                ms, ratio = c.get(variant, (None, None))
                row += ["", ""] if ms is None else [f"{ms:.2f}", f"**{ratio:.3f}**"]
            rows.append("| " + " | ".join(row) + " |")
    return rows


def elastic_inference(record: dict) -> list[str]:
    rows = ["| scope | k' | elastic tokens/s | native top-k' tokens/s | elastic / native |",
            "|---|---:|---:|---:|---:|"]
    for f in record["figures"]:
        note = " (native: pre-softmax)" if f.get("native_pre_softmax") else ""
        rows.append(f"| {f['scope']} | {f['k']}{note} | {f['elastic_tokens_per_s']:,.0f} | "
                    f"{f['native_tokens_per_s']:,.0f} | **{f['ratio']:.3f}** |")
    return rows


def train_step(record: dict) -> list[str]:
    rows = ["| precision | variant | step ms | tokens/s | model TFLOP/s | MFU | throughput / Top-k |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for f in record["figures"]:
        mfu = "n/a" if f["mfu"] is None else f"{f['mfu']:.1%}"
        rows.append(f"| {f['precision']} | {f['variant']} | {f['step_ms']['median_ms']:.1f} | "
                    f"{f['tokens_per_s']:,.0f} | {f['model_tflops']:.4f} | {mfu} | "
                    f"**{f['ratio_vs_topk']:.3f}** |")
    return rows


TABLES = {"router_overhead": router_overhead, "elastic_inference": elastic_inference,
          "train_step": train_step}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for name, table in TABLES.items():
        path = args.results / f"{name}.json"
        if not path.is_file():
            print(f"### {name}\n\nnot run ({path} missing)\n")
            continue
        record = json.loads(path.read_text())
        print(f"### {name}\n\n{machine_line(record)}\n")
        print("\n".join(table(record)))
        for target in record["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not judged (CPU)"}[target["met"]]
            print(f"\n- target {target['name']}: {target['value']:.3f} "
                  f"({target['direction']} {target['limit']}): {verdict}", end="")
        print("\n")


if __name__ == "__main__":
    main()
