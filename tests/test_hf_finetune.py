"""`emoe-finetune-hf` (examples/finetune_hf_emoe.py) for real: torchrun, 2 gloo processes,
DeepSpeed ZeRO-2 with DeepSpeed-MoE experts at EP = 2, a tiny random Qwen3-MoE on the small
default SFT data; a run resumed from its step-2 checkpoint matches the uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_emoe.cli.finetune_hf import main
from megatron_emoe.runtime.launch import launch_environment
from tests.conversion_models import save_hf_model
from tests.training_runs import REPO, usage_error

# found, not imported: importing deepspeed here would set it up in every test's process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (make install adds it)")

ZERO2 = REPO / "examples" / "configs" / "ds_zero2.json"
ZERO3 = REPO / "examples" / "configs" / "ds_zero3.json"


def finetune(flags: list[str], log, nproc: int = 2) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "examples" / "finetune_hf_emoe.py"), *flags]
    proc = subprocess.run(command, cwd=REPO, env=launch_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=400)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def steps(folder) -> dict[int, float]:
    lines = (folder / "finetune_log.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # the small data's tokenizer has 512 entries
    return save_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("qwen3") / "hf"), vocab_size=512)


def flags_for(model, data, save, iters, *extra):
    return ["--model", model, "--data-dir", data["output_dir"], "--save", str(save),
            "--train-iters", str(iters), "--seq-length", "64", "--lr", "1e-3",
            "--moe-router-mode", "emoe", "--emoe-k-ideal", "4", "--emoe-hr-loss-coeff", "1e-3",
            "--moe-active-experts", "3", *extra]


@pytest.mark.slow
def test_expert_parallel_finetune_resumes_from_its_checkpoint(tiny_model, small_data, tmp_path):
    full = tmp_path / "full"
    finetune(flags_for(tiny_model, small_data, full, 4, "--deepspeed-config", str(ZERO2),
                       "--save-interval", "2", "--expert-parallel-size", "2"), tmp_path / "full.log")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "step2", resumed / "step2")
    (resumed / "latest").write_text("step2")
    finetune(flags_for(tiny_model, small_data, resumed, 4, "--deepspeed-config", str(ZERO2),
                       "--expert-parallel-size", "2"), tmp_path / "resumed.log")
    uninterrupted, continued = steps(full), steps(resumed)
    assert sorted(uninterrupted) == [1, 2, 3, 4] and sorted(continued) == [3, 4]
    assert all(uninterrupted[s] == continued[s] for s in (3, 4)), (uninterrupted, continued)

    from transformers import AutoModelForCausalLM

    from megatron_emoe.hf import from_pretrained, get_active_experts

    plain = AutoModelForCausalLM.from_pretrained(full / "hf")
    assert plain.config.num_experts_per_tok == 3  # --moe-active-experts, for plain transformers
    again = from_pretrained(str(full / "hf"))
    assert get_active_experts(again) == [3, 3]
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, again.eval()(input_ids=ids).logits)


@pytest.mark.slow
def test_zero3_finetunes_transformers_experts(tiny_model, small_data, tmp_path):
    """ZeRO-3 (parameters partitioned over the 2 ranks) with the transformers experts."""
    finetune(flags_for(tiny_model, small_data, tmp_path / "z3", 2, "--deepspeed-config", str(ZERO3)),
             tmp_path / "z3.log")
    assert sorted(steps(tmp_path / "z3")) == [1, 2]
    assert (tmp_path / "z3" / "hf" / "config.json").is_file()


def test_bad_input_is_refused_before_any_model_is_built(tiny_model, small_data, tmp_path, capsys):
    base = flags_for(tiny_model, small_data, tmp_path / "x", 2)
    assert "--deepspeed-config" in usage_error(main, base, capsys)
    assert "ZeRO-3 refuses" in usage_error(
        main, [*base, "--deepspeed-config", str(ZERO3), "--expert-parallel-size", "2"], capsys)
    assert "must divide the 8 experts" in usage_error(
        main, [*base, "--deepspeed-config", str(ZERO2), "--expert-parallel-size", "3"], capsys)
    assert "emoe-k-ideal" in usage_error(
        main, [*base, "--deepspeed-config", str(ZERO2), "--emoe-k-ideal", "9"], capsys)
    assert "--model" in usage_error(
        main, [*base[2:], "--model", str(tmp_path / "none"), "--deepspeed-config", str(ZERO2)], capsys)
