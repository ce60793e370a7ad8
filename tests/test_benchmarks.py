"""The benchmarks under benchmarks/ run end to end (--quick) and write well-formed JSON results.

Each script runs in its own subprocess, as a user would run it, with --output in a temporary folder;
the figures themselves are not judged (CPU timings on a shared machine), only that every ratio and
throughput is a positive finite number and the machine record is complete. About 6 s each on
2 idle CPU cores (most of it importing Megatron), so not marked slow.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MACHINE_KEYS = {"device", "device_name", "cpu", "torch", "megatron_core", "date", "command", "git"}


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--quick",
         "--output", str(tmp_path), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    path = tmp_path / f"{script}.json"
    assert path.is_file(), result.stdout
    assert f"wrote {path}" in result.stdout
    record = json.loads(path.read_text())
    assert record["benchmark"] == script and record["schema"] == 1
    assert MACHINE_KEYS <= set(record["machine"]), record["machine"]
    assert "--quick" in record["machine"]["command"]
    assert record["settings"]["quick"] is True
    assert record["figures"], "no figures"
    for target in record["targets"]:
        assert {"name", "value", "limit", "direction", "met"} <= set(target)
    return record


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_router_overhead_quick(tmp_path):
    record = _run("router_overhead", tmp_path)
    settings = record["settings"]
    expected = {(scope, e, t, v) for scope in ("router", "layer") for e in settings["experts"]
                for t in settings["tokens"] for v in ("emoe", "mmoe")}
    got = {(f["scope"], f["experts"], f["tokens"], f["variant"]) for f in record["figures"]}
    assert got == expected
    for figure in record["figures"]:
        assert _positive(figure["ratio"]), figure
        assert _positive(figure["variant_ms"]["median_ms"]) and _positive(figure["baseline_ms"]["median_ms"])
        assert figure["variant_ms"]["samples"] == settings["repeats"]


def test_elastic_inference_quick(tmp_path):
    record = _run("elastic_inference", tmp_path)
    budgets = record["settings"]["budgets"]
    got = {(f["scope"], f["k"]) for f in record["figures"]}
    assert got == {(scope, k) for scope in ("layer", "model") for k in budgets}
    for figure in record["figures"]:
        for key in ("ratio", "elastic_tokens_per_s", "native_tokens_per_s"):
            assert _positive(figure[key]), (key, figure)
    assert len(record["targets"]) == len(record["figures"])


def test_train_step_quick(tmp_path):
    record = _run("train_step", tmp_path, "--peak-tflops", "1.0")
    figures = {f["variant"]: f for f in record["figures"]}
    assert set(figures) == {"topk", "emoe"}
    assert figures["topk"]["ratio_vs_topk"] == 1.0
    for figure in figures.values():
        for key in ("tokens_per_s", "model_tflops", "mfu", "ratio_vs_topk", "final_loss"):
            assert _positive(figure[key]), (key, figure)
        # MFU is the model FLOP rate over the stated peak.
        assert math.isclose(figure["mfu"], figure["model_tflops"] / 1.0)
    count = record["settings"]["flop_accounting"][figures["topk"]["precision"]]
    assert 0 < count["active_matmul_params"] < count["total_params"]
    assert count["flops_per_token"] > 6 * count["active_matmul_params"]

    # The docs' tables come from tables.py; the other two results are missing in this folder.
    report = subprocess.run([sys.executable, "-m", "benchmarks.tables",
                             "--results", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| fp32 | emoe |" in report.stdout and "router_overhead.json missing" in report.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scaling_wall_quick(tmp_path):
    """python -m benchmarks.scaling_wall --quick end to end: a bad flag is refused before anything
    runs; then the grid (three modes x 2 seeds, both settings: 14 runs of the real entry, two at a
    time) writes one result per run, the summary and four plots, keeping only (a)'s Top-k
    checkpoints (the bases of (b)); a rerun skips every finished run. About 100 s on 2 idle
    CPU cores."""
    script = [sys.executable, "-m", "benchmarks.scaling_wall"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", GLOO_SOCKET_IFNAME="lo")
    out, work = tmp_path / "out", tmp_path / "work"
    common_flags = ["--quick", "--output", str(out), "--work-dir", str(work)]
    bad = subprocess.run([*script, *common_flags, "--modes", "topk", "emoe-k9"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--modes" in bad.stderr and "emoe-k9" in bad.stderr, bad.stderr
    assert not work.exists()

    result = subprocess.run([*script, *common_flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=800)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    path = out / "scaling_wall.json"
    assert f"wrote {path}" in result.stdout
    for png in ("scaling_wall", "scaling_wall_specialists", "scaling_wall_ablations",
                "scaling_wall_coactivation"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    record = json.loads(path.read_text())
    assert record["benchmark"] == "scaling_wall" and record["schema"] == 2
    assert MACHINE_KEYS <= set(record["machine"]) and "--quick" in record["machine"]["command"]
    settings = record["settings"]
    k, seeds = settings["topk"], settings["seeds"]
    budgets = [str(b) for b in range(1, 3 * k + 1)]
    modes = settings["modes"]
    assert seeds == [1, 2] and {"topk", "topk-k1", "mmoe-layer"} == set(modes)
    assert record["missing_runs"] == []
    runs = {(r["setting"], r["mode"], r["seed"]): r for r in record["runs"]}
    assert len(runs) == 2 * (2 * len(modes) + 1)  # per seed: (a), (b)'s base, (b)
    step_tokens = settings["global_batch_size"] * settings["model"]["seq_length"]
    for (setting, mode, seed), run in runs.items():
        iters = 0 if mode == "base" else settings["pretrain_iters" if setting == "a" else "finetune_iters"]
        assert run["tokens_trained"] == iters * step_tokens, (setting, mode, seed)
        result_file = work / setting / mode / f"seed{seed}" / "result.json"
        stored = json.loads(result_file.read_text())
        assert list(stored["val_loss"]) == budgets
        assert all(math.isfinite(v) and v > 0 for v in stored["val_loss"].values())
        assert f"--seed {seed}" in stored["command"]
        if mode != "base":
            assert stored["coactivation_distance"], (setting, mode, seed)
    for setting in ("a", "b"):
        table = record["results"][setting]["modes"]
        assert set(table) == set(modes) | ({"base"} if setting == "b" else set())
        for mode, row in table.items():
            assert row["seeds"] == seeds
            losses = [[row["per_seed"][str(s)][b] for s in seeds] for b in budgets]
            for b, values in zip(budgets, losses):
                assert row["per_budget"][b]["mean"] == pytest.approx(sum(values) / 2)
            means = {int(b): v["mean"] for b, v in row["per_budget"].items()}
            assert row["best_k"] == min(means, key=lambda b: (means[b], b))
            assert row["train_k"] <= row["effective_range"] <= 3 * k
            diff = row["minus_topk"][str(k)]
            topk = table["topk"]["per_seed"]
            assert diff["mean"] == pytest.approx(
                sum(row["per_seed"][str(s)][str(k)] - topk[str(s)][str(k)] for s in seeds) / 2)
            assert diff["low"] <= diff["mean"] <= diff["high"]
        assert set(record["mmoe_vs_specialists"][setting]["mmoe-layer"]) == {"1", str(k)}
        compute = record["training_compute"][setting]
        assert set(compute["suite"]) == {"topk", "topk-k1"}
        elastic = compute["elastic_models"]["mmoe-layer"]
        assert elastic["expected_k"] == pytest.approx((2 * k + 1) / 2)
        assert elastic["suite_over_model_flops"] > 1
        assert record["coactivation"][setting]["mmoe-layer"]
    assert "mmoe-layer" in record["remedies"]
    split = settings["sft_split"]
    assert split["sft_valid"]["loss_tokens"] >= 65536 and split["sft_train"]["loss_tokens"] > 0
    sources = [{json.loads(line)["source"] for line in (work / "sft_data" / f"{name}.jsonl").open()}
               for name in ("sft_train", "sft_valid")]
    assert sources[0] and sources[1] and not sources[0] & sources[1]
    kept = {p.relative_to(work).parts[:3] for p in work.rglob("latest_checkpointed_iteration.txt")}
    assert kept == {("a", "topk", f"seed{s}") for s in seeds}, kept

    again = subprocess.run([*script, *common_flags, "--seeds", "1"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 to run" in again.stdout and json.loads(path.read_text())["results"] == record["results"]
