"""Pipeline parallelism through the training entry on CPU: PP = 2 with and without virtual
stages, a stage without MoE layers, recompute, PP = 2 x EP = 2 on 4 processes, and bitwise resume
at PP = 2 (Megatron's own 1F1B and interleaved schedules over gloo)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import data_flags
from tests.test_training import check_training_metrics
from tests.training_runs import (
    REPO, TINY_MODEL, console_script, environment, run_training, scalars, tags,
)

pytestmark = pytest.mark.slow

PP2 = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1"]
FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1"]

RUNS = {
    # Stage 0 holds only a dense layer: its metric reductions must still meet stage 1's.
    "topk-hr-dense-stage": [*PP2, "--moe-layer-freq", "[0,1]", "--moe-router-mode", "topk",
                            "--emoe-hr-loss-coeff", "1e-3", *FULL_RECOMPUTE],
    # EMoE on the plain 1F1B schedule (stage 0 runs a warm-up forward ahead of its backward).
    "emoe-1f1b": [*PP2, "--moe-router-mode", "emoe", "--emoe-k-ideal", "3",
                  "--emoe-hr-loss-coeff", "1e-3"],
    # Interleaved 1F1B over 4 layers in 2 x 2 virtual stages, MoE recomputed selectively, and
    # the end-of-run budget sweep on the pipelined model.
    "emoe-interleaved": [*PP2, "--num-layers", "4", "--num-virtual-stages-per-pipeline-rank", "2",
                         "--moe-router-mode", "emoe", "--emoe-k-ideal", "3",
                         "--recompute-granularity", "selective", "--recompute-modules", "moe",
                         "--elastic-eval-budgets", "1", "3"],
    # M-MoE with per-token budgets (allgather dispatcher) on the interleaved schedule.
    "mmoe-token-interleaved": [*PP2, "--num-layers", "4", "--num-virtual-stages-per-pipeline-rank",
                               "2", "--moe-router-mode", "mmoe", "--mmoe-sample-level", "token",
                               "--moe-token-dispatcher-type", "allgather", *FULL_RECOMPUTE],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_pipeline_parallel_training(tmp_path, small_data, name):
    flags = [*TINY_MODEL, *data_flags(small_data), *RUNS[name], "--train-iters", "3",
             "--save", str(tmp_path / "ckpt"), "--save-interval", "3",
             "--tensorboard-dir", str(tmp_path / "tb")]
    code, out = run_training(flags, tmp_path / "log")
    assert code == 0, out[-3000:]
    losses = scalars(tmp_path / "tb", "lm loss")
    assert sorted(losses) == [1, 2, 3]
    logged = tags(tmp_path / "tb")
    if name == "topk-hr-dense-stage":
        assert "hierarchical_router_loss" in logged and "router_entropy" in logged
        assert "expert_load/layer_02/expert_000" in logged
        assert not any(t.startswith("expert_load/layer_01/") for t in logged), "layer 1 is dense"
    elif name == "emoe-1f1b":
        check_training_metrics(tmp_path / "tb", "emoe", [1, 2, 3])
    else:
        layers = {t.split("/")[1] for t in logged if t.startswith("expert_load/")}
        assert layers == {"layer_01", "layer_02", "layer_03", "layer_04"}
    if name == "emoe-interleaved":
        sweep = json.loads((tmp_path / "ckpt" / "elastic_eval.json").read_text())
        assert sorted(sweep["val_loss"]) == ["1", "3"] and sweep["iteration"] == 3
        # The pipelined checkpoint (2 stages x 2 virtual stages) loads in one process, no
        # pipeline: the same validation batches give the sweep's losses.
        proc = subprocess.run([console_script("emoe-elastic-eval"), "--load", str(tmp_path / "ckpt"),
                               "--output", str(tmp_path / "eval"), "--budgets", "1", "3"],
                              cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((tmp_path / "eval" / "elastic_eval.json").read_text())["results"]
        resharded = {r["label"]: r["val_loss"] for r in results}
        assert resharded == pytest.approx(sweep["val_loss"], rel=1e-5)


def test_pipeline_and_expert_parallel_mmoe_resumes_bitwise(tmp_path, small_data):
    """PP = 2 x EP = 2 on 4 processes, M-MoE with one k per optimizer step for the whole model,
    capacity-weighted, with full recompute: stopped at step 2 and resumed, the run logs exactly
    the losses of the run never stopped (tolerance 0)."""
    common = [*TINY_MODEL, *data_flags(small_data), "--pipeline-model-parallel-size", "2",
              "--moe-router-mode", "mmoe", "--mmoe-sample-level", "model",
              "--mmoe-resample-every", "global-batch", "--mmoe-k-weighting", "capacity",
              *FULL_RECOMPUTE, "--train-iters", "4", "--save-interval", "2",
              "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    code, out = run_training([*common, "--save", str(full / "ckpt"),
                              "--tensorboard-dir", str(full / "tb")], tmp_path / "full.log", nproc=4)
    assert code == 0, out[-3000:]
    check_training_metrics(full / "tb", "mmoe", [1, 2, 3, 4])
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "iter_0000002", resumed / "ckpt" / "iter_0000002")
    (resumed / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    code, out = run_training([*common, "--save", str(resumed / "ckpt"), "--load", str(resumed / "ckpt"),
                              "--tensorboard-dir", str(resumed / "tb")], tmp_path / "resumed.log",
                             nproc=4)
    assert code == 0, out[-3000:]
    for name in ("lm loss", "grad-norm", "load_balancing_loss"):
        after = [{s: v for s, v in scalars(run / "tb", name).items() if s > 2} for run in (full, resumed)]
        assert sorted(after[0]) == [3, 4] and after[1] == after[0], name
