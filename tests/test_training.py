"""The training entry end to end on CPU: Megatron's own loop in 2 gloo processes with expert
parallelism 2, on the embedded default data (built small for tests)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import data_flags
from tests.training_runs import (
    REPO, TINY_MODEL, environment, run_training, scalars, tags, training_command,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


ROUTER_MODES = {
    "topk": ["--moe-router-mode", "topk"],
    "emoe": ["--moe-router-mode", "emoe", "--emoe-k-ideal", "4", "--emoe-hr-loss-coeff", "1e-3"],
    "mmoe": ["--moe-router-mode", "mmoe", "--mmoe-k-min", "1", "--mmoe-k-max", "3",
             "--mmoe-sample-level", "layer"],
}


def check_training_metrics(tb, mode: str, steps: list[int]) -> None:
    """What a training run logs to TensorBoard: finite LM losses at every step, Megatron's
    balancing loss and ours (router entropy, load imbalance, per-expert load), L_HR with EMoE."""
    losses = scalars(tb, "lm loss")
    assert sorted(losses) == steps and all(math.isfinite(v) for v in losses.values())
    logged = tags(tb)
    for name in ("router_entropy", "expert_load_imbalance", "load_balancing_loss",
                 "expert_load/layer_01/expert_000", "expert_load/layer_02/expert_003"):
        assert name in logged, name
    assert ("hierarchical_router_loss" in logged) == (mode == "emoe")
    # Entropy of a softmax over 4 experts lies in [0, log 4].
    assert all(0 <= v <= math.log(4) + 1e-6 for v in scalars(tb, "router_entropy").values())


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, data):
    """3 steps of Top-k pretraining with EP = 2, saved at the end (the SFT test fine-tunes it)."""
    root = tmp_path_factory.mktemp("topk")
    code, out = run_training(
        [*TINY_MODEL, *data_flags(data), *ROUTER_MODES["topk"], "--train-iters", "3",
         "--save", str(root / "ckpt"), "--save-interval", "1000", "--tensorboard-dir", str(root / "tb")],
        root / "log")
    assert code == 0, out[-3000:]
    return root


def test_topk_trains_with_ep2(topk_run):
    check_training_metrics(topk_run / "tb", "topk", [1, 2, 3])


def _train_then_resume(tmp_path, data, flags):
    """Losses of steps 4..6 of an uninterrupted run, and of a run resumed from its step-3 save;
    the uninterrupted run's TensorBoard folder."""
    common = [*TINY_MODEL, *data_flags(data), *flags, "--train-iters", "6", "--save-interval", "3",
              "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    code, out = run_training([*common, "--save", str(full / "ckpt"),
                              "--tensorboard-dir", str(full / "tb")], tmp_path / "full.log")
    assert code == 0, out[-3000:]
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "iter_0000003", resumed / "ckpt" / "iter_0000003")
    (resumed / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    code, out = run_training([*common, "--save", str(resumed / "ckpt"), "--load", str(resumed / "ckpt"),
                              "--tensorboard-dir", str(resumed / "tb")], tmp_path / "resumed.log")
    assert code == 0, out[-3000:]
    curves = {name: ({s: v for s, v in scalars(run / "tb", name).items() if s > 3} for run in (full, resumed))
              for name in ("lm loss", "grad-norm")}
    return curves, full / "tb"


# EMoE with both schedules: Top-k at step 0, then k_ideal 2, 3, 3, 4, 4 over steps 1 ... 5 (ramp
# of 4 steps from 2 to 4, halves up), so the resume at step 3 lands mid-ramp.
EMOE_SCHEDULED = ["--emoe-start-iter", "1", "--emoe-k-ideal-start", "2",
                  "--emoe-k-ideal-ramp-iters", "4"]


@pytest.mark.parametrize("mode", ["emoe", "mmoe"])
def test_mode_trains_with_ep2_and_resumes_bitwise(tmp_path, data, mode):
    """EMoE and M-MoE train with EP = 2 and log their metrics; stopped at step 3 and resumed, the
    run logs exactly the losses of the run never stopped: EMoE sampling and its schedules
    (Top-k first, a k_ideal ramp), M-MoE budget draws and dropout included (tolerance 0)."""
    flags = ROUTER_MODES[mode] + (EMOE_SCHEDULED if mode == "emoe" else [])
    curves, tb = _train_then_resume(tmp_path, data, flags)
    check_training_metrics(tb, mode, [1, 2, 3, 4, 5, 6])
    for name, (full, resumed) in curves.items():
        full, resumed = dict(full), dict(resumed)
        assert sorted(full) == [4, 5, 6]
        assert resumed == full, name


def _worker_pids(launcher: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    flags = [*TINY_MODEL, *data_flags(data), *ROUTER_MODES["emoe"], "--train-iters", "500",
             "--save", str(ckpt), "--save-interval", "1000", "--exit-signal-handler"]
    log = open(tmp_path / "log", "w")
    launcher = subprocess.Popen(training_command(flags), cwd=REPO, env=environment(),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "iteration        2/" not in (tmp_path / "log").read_text():
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.5)
        for pid in _worker_pids(launcher):  # what srun does to every task on preemption
            psutil.Process(pid).send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=200) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 500
    assert (ckpt / f"iter_{saved:07d}" / "metadata.json").is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_%07d" % saved, "latest_checkpointed_iteration.txt"]
    assert "exiting program after receiving SIGTERM" in (tmp_path / "log").read_text()


def test_emoe_instruction_tuning_from_a_topk_checkpoint(tmp_path, data, topk_run):
    """The papers' setting: a Top-k pretrained checkpoint fine-tuned with EMoE on packed SFT data."""
    pretrained = topk_run / "ckpt"
    tb = tmp_path / "tb"
    code, out = run_training(
        [*TINY_MODEL, *data_flags(data, "sft"), *ROUTER_MODES["emoe"], "--sft-packed",
         "--finetune", "--load", str(pretrained), "--save", str(tmp_path / "sft"), "--save-interval", "1000",
         "--train-iters", "3", "--tensorboard-dir", str(tb),
         "--elastic-eval-budgets", "1", "2", "4"], tmp_path / "sft.log")
    assert code == 0, out[-3000:]
    assert f"loading checkpoint from {pretrained}" in out or "successfully loaded checkpoint" in out
    assert sorted(scalars(tb, "lm loss")) == [1, 2, 3]  # --finetune starts at iteration 0
    result = json.loads((tmp_path / "sft" / "elastic_eval.json").read_text())
    assert result["router_mode"] == "emoe" and sorted(result["val_loss"]) == ["1", "2", "4"]
