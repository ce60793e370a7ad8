"""emoe-elastic-eval on a tiny EMoE checkpoint trained by the real training entry (EP = 2).

The checkpoint's training run evaluates once, at its last iteration, so the training loop's
validation loss covers exactly the batches the tool evaluates by default (the first `--eval-iters`
global batches of the validation split): at the training k the two must agree.
"""

import csv
import json
import math
import re
import subprocess

import pytest

pytestmark = pytest.mark.slow  # every test here needs the session's trained checkpoint

from megatron_emoe.cli.elastic_eval import main as tool_main
from tests.conftest import CHECKPOINT_ITERS
from tests.training_runs import REPO, console_script, environment, usage_error

TOOL = console_script("emoe-elastic-eval")


@pytest.fixture(scope="module")
def checkpoint(emoe_checkpoint):
    """(the session's tiny EMoE checkpoint, the training loop's validation loss at its last step)."""
    return emoe_checkpoint.path, emoe_checkpoint.validation_loss


def _tool(*flags, timeout=300):
    return subprocess.run([TOOL, *flags], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def _results(output):
    record = json.loads((output / "elastic_eval.json").read_text())
    return record, {r["label"]: r for r in record["results"]}


def test_loss_at_training_k_equals_training_loop_validation_at_both_layouts(checkpoint, tmp_path):
    ckpt, training_val_loss = checkpoint
    # As trained: 2 processes, expert parallel 2.
    as_trained = _tool("--load", str(ckpt), "--output", str(tmp_path / "ep2"), "--nproc", "2",
                       "--expert-model-parallel-size", "2", "--budgets", "1", "2", "4",
                       "--coactivation-dir", str(tmp_path / "coactivation"))
    assert as_trained.returncode == 0, as_trained.stderr[-3000:]
    record, by_label = _results(tmp_path / "ep2")
    # The log prints 7 significant digits.
    assert by_label["2"]["val_loss"] == pytest.approx(training_val_loss, rel=2e-6)
    assert record["iteration"] == CHECKPOINT_ITERS and record["train_topk"] == 2
    assert [by_label[k]["active_experts"] for k in ("1", "2", "4")] == [1.0, 2.0, 4.0]
    assert len({by_label[k]["val_loss"] for k in ("1", "2", "4")}) == 3, "budgets had no effect"
    # Routed-expert FLOPs: SwiGLU off in TINY_MODEL, so 2 matmuls of 64 x 64 per expert per layer.
    assert by_label["4"]["expert_flops"] == pytest.approx(2 * 2 * 64 * 64 * 4 * 2)
    assert "[3/3] budget" in as_trained.stdout
    from megatron_emoe import coactivation

    stats = coactivation.load(str(tmp_path / "coactivation" / "eval_k4.npz"))
    assert [int(stats.counts[n].diagonal().sum()) for n in (1, 2)] == [4 * by_label["4"]["routed_tokens"]] * 2

    # Resharded to 1 process (dist_checkpointing), plus per-layer and top-p budgets.
    single = _tool("--load", str(ckpt), "--output", str(tmp_path / "ep1"), "--budgets", "2", "3",
                   "--layer-budgets", "2-2", "1-4", "--top-p", "1.0", "0.5",
                   "--top-p-max-experts", "3")
    assert single.returncode == 0, single.stderr[-3000:]
    record, results = _results(tmp_path / "ep1")
    assert results["2"]["val_loss"] == pytest.approx(by_label["2"]["val_loss"], rel=1e-5)
    assert results["2-2"]["val_loss"] == pytest.approx(results["2"]["val_loss"], rel=1e-6)
    assert results["1-4"]["active_experts_per_layer"] == [1.0, 4.0]
    assert results["1-4"]["val_loss"] != results["2"]["val_loss"]
    # p = 1 never reached within the cap, so top-p 1.0 capped at 3 is k' = 3 (here on allgather).
    assert record["layout"]["moe_token_dispatcher_type"] == "allgather"
    assert results["top_p1_max3"]["active_experts"] == 3.0
    assert results["top_p1_max3"]["val_loss"] == pytest.approx(results["3"]["val_loss"], rel=1e-5)
    assert 1.0 <= results["top_p0.5_max3"]["active_experts"] < 3.0
    assert math.isfinite(results["top_p0.5_max3"]["val_loss"])

    rows = list(csv.DictReader((tmp_path / "ep1" / "elastic_eval.csv").open()))
    assert [r["kind"] for r in rows] == ["global", "global", "per_layer", "per_layer", "top_p", "top_p"]
    assert float(rows[0]["val_loss"]) == pytest.approx(results["2"]["val_loss"], abs=1e-6)
    assert (tmp_path / "ep1" / "elastic_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budgets", "5"], r"--budgets must be in \[1, 4\] \(num-experts=4\), got 5"),
        (["--layer-budgets", "1-2-3"], r"--layer-budgets per-layer list must have one entry per MoE layer \(2"),
        (["--layer-budgets", "1-x"], r"--layer-budgets takes .*one per MoE layer \(1-2-4-4\)"),
        (["--top-p", "1.5"], r"--top-p top-p must be in \(0, 1\]"),
        (["--top-p", "0.5", "--top-p-max-experts", "7"], r"top-p max experts must be in \[1, 4\]"),
        (["--nproc", "3", "--expert-model-parallel-size", "2"], r"--expert-model-parallel-size 2 must divide --nproc 3"),
        (["--nproc", "3", "--expert-model-parallel-size", "3"], r"must divide the checkpoint's 4 experts"),
        (["--eval-iters", "0"], r"--eval-iters must be >= 1"),
    ],
)
def test_bad_flags_exit_2_before_building_anything(checkpoint, tmp_path, capsys, flags, message):
    ckpt, _ = checkpoint
    # in-process: the checks run before any rank
    err = usage_error(tool_main, ["--load", str(ckpt), "--output", str(tmp_path / "out"), *flags], capsys)
    assert re.search(message, err)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_existing_output_are_refused(checkpoint, tmp_path):
    result = _tool("--load", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "no Megatron checkpoint there" in result.stderr
    ckpt, _ = checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "elastic_eval.json").write_text("{}")
    result = _tool("--load", str(ckpt), "--output", str(tmp_path / "out"), "--budgets", "1")
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    assert (tmp_path / "out" / "elastic_eval.json").read_text() == "{}"


def test_existing_coactivation_files_are_refused_like_outputs(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    matrices = tmp_path / "coactivation"
    matrices.mkdir()
    (matrices / "eval_k1.npz").write_bytes(b"from another evaluation")
    err = usage_error(tool_main, ["--load", str(ckpt), "--output", str(tmp_path / "out"), "--budgets", "1",
                                  "--coactivation-dir", str(matrices)], capsys)
    assert "--coactivation-dir" in err and "eval_k1.npz" in err and "--overwrite" in err
    assert (matrices / "eval_k1.npz").read_bytes() == b"from another evaluation"
    # The training matrices it would compare with are read up front: a corrupt one is named.
    (matrices / "eval_k1.npz").unlink()
    (matrices / "train.npz").write_bytes(b"not an npz")
    err = usage_error(tool_main, ["--load", str(ckpt), "--output", str(tmp_path / "out"), "--budgets", "1",
                                  "--coactivation-dir", str(matrices)], capsys)
    assert "train.npz" in err
    assert not (tmp_path / "out").exists()


def test_eval_ranks_take_one_gpu_each_over_nccl_on_a_cuda_node(checkpoint, monkeypatch):
    """The backend choice, without a GPU: gloo on CPU, NCCL with GPU r for rank r on a CUDA
    node, and a refusal where ranks would have to share GPUs (they all landed on GPU 0)."""
    import torch

    from megatron_emoe.errors import UsageError
    from megatron_emoe.evaluation import checkpoint_eval
    from megatron_emoe.runtime.launch import local_backend

    assert local_backend(2, 0) == "gloo"
    assert local_backend(2, 8) == "nccl"
    with pytest.raises(UsageError, match=r"--nproc 4 needs one GPU per rank; this node has 2"):
        local_backend(4, 2)

    launched = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(checkpoint_eval, "run_ranks",
                        lambda body, **kwargs: launched.update(kwargs) or torch.save(None, kwargs["args"][-1]))
    options = checkpoint_eval.EvalOptions(load=str(checkpoint[0]), nproc=2).validate()
    checkpoint_eval.run_on_ranks(options, print)
    assert launched["backend"] == "nccl" and launched["world_size"] == 2
    with pytest.raises(UsageError, match=r"--nproc 4 needs one GPU per rank"):
        checkpoint_eval.EvalOptions(load=str(checkpoint[0]), nproc=4).validate()
