"""The Slurm scripts in slurm/: static checks and dry runs here, and real jobs on a real one-node
Slurm cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd on localhost, 2 CPUs).

Dry runs render the launcher and training commands with made-up SLURM_* variables (a 4-node GPU
job); the training argv (`--config` the YAML recipe, then the scripts' paths and Slurm-derived
flags) is parsed back with the training entry's own parser, which expands the YAML (so every flag
is a real Megatron-or-ours flag), and checked by Megatron's `validate_args` for a world of the
rendered size. The refusals (bad variables, files, allocation, output folders) are checked both
in dry runs and in real jobs.

On the cluster, `sbatch slurm/pretrain_emoe.sbatch` trains the tiny EMoE model of
examples/configs/tiny.yaml with torchrun (2 gloo processes, EP = 2), and
`sbatch slurm/finetune_emoe_ep.sbatch` fine-tunes a Top-k checkpoint with EMoE at EP = 2 (tiny.yaml
plus the shipped fine-tuning YAML, resized by trailing flags): once uninterrupted, and once
interrupted twice, by the signal Slurm sends before the time limit (delivered with
`scancel --batch --signal=USR1`) and by `scontrol requeue`; the requeued run resumes from its saved
iteration and logs the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_emoe.runtime import launch
from tests.slurm_cluster import slurm_cluster  # noqa: F401 (the fixture)
from tests.training_runs import scalars

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
PRETRAIN = SLURM / "pretrain_emoe.sbatch"
FINETUNE = SLURM / "finetune_emoe_ep.sbatch"
SCRIPTS = [PRETRAIN, FINETUNE]
MARKERS = ("ENV", "LAUNCHER", "TRAINING", "RESUME")
CONFIGS = ROOT / "examples" / "configs"
MODEL_YAML = CONFIGS / "olmoe_1b_7b.yaml"
SFT_YAML = CONFIGS / "olmoe_1b_7b_sft.yaml"
ENTRY_MODULE = "megatron_emoe.cli.pretrain"
# Flags that define the model's weights: fine-tuning must build what pretraining saved.
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "group_query_attention", "num_query_groups", "seq_length", "max_position_embeddings",
                "position_embedding_type", "rotary_base", "normalization", "qk_layernorm", "swiglu",
                "add_bias_linear", "untie_embeddings_and_output_weights", "num_experts",
                "moe_ffn_hidden_size", "moe_router_topk")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: fake Slurm job, data and tokenizer paths, nothing from the caller's."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "0",
        "DATA_PREFIX": str(tmp_path / "data" / "corpus_text_document"),
        "TOKENIZER": str(tmp_path / "tokenizer"),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    env.update(extra)
    return env


def finetune_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir(exist_ok=True)
    (pretrained / "latest_checkpointed_iteration.txt").write_text("1000\n")
    env = base_env(
        tmp_path,
        SLURM_JOB_NODELIST="nodeA,nodeB",
        SLURM_NNODES="2",
        PRETRAINED=str(pretrained),
        CKPT=str(tmp_path / "sft"),
    )
    env.update(extra)
    return env


def dry_run(script: Path, env: dict[str, str], *extra: str) -> dict[str, str]:
    """Run `DRY_RUN=1 bash script extra...`; return the sections printed between the markers."""
    proc = subprocess.run(
        ["bash", str(script), *extra], env={**env, "DRY_RUN": "1"}, capture_output=True,
        text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    sections: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("=== EMOE_") and line.endswith(" ==="):
            current = line[len("=== EMOE_") : -len(" ===")]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    assert set(MARKERS) <= set(sections), proc.stdout
    return {name: "\n".join(lines) for name, lines in sections.items()}


def env_section(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines())
    return {key: shlex.split(value)[0] if value else "" for key, value in pairs}


def flag_values(argv: list[str], flag: str) -> list[list[str]]:
    """The values after each occurrence of `flag` (up to the next --flag)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == flag:
            values = []
            for value in argv[i + 1 :]:
                if value.startswith("--"):
                    break
                values.append(value)
            out.append(values)
    return out


@pytest.fixture(scope="module")
def parse():
    """parse_training_args(argv, world_size) -> Megatron-validated args of that world size."""
    pytest.importorskip("megatron.training")
    import torch

    from megatron_emoe.runtime.arguments import parse_training_args

    def run(argv: list[str], world_size: int):
        saved_env = dict(os.environ)
        saved_capability = torch.cuda.get_device_capability
        os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
        # validate_args asks the GPU whether grouped GEMM can run; answer as a Hopper would.
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        try:
            args = parse_training_args(argv)
            from megatron.training.arguments import validate_args

            with contextlib.redirect_stdout(io.StringIO()):
                validate_args(args, {})
            return args
        finally:
            torch.cuda.get_device_capability = saved_capability
            os.environ.clear()
            os.environ.update(saved_env)

    return run


def training_argv(sections: dict[str, str]) -> list[str]:
    """The entry's argv; the launcher runs the entry as a module (torchrun --module, python -m)."""
    argv = shlex.split(sections["TRAINING"])
    assert argv[0] == ENTRY_MODULE
    launcher = shlex.split(sections["LAUNCHER"])
    assert launcher[-1] in ("--module", "-m"), launcher
    return argv[1:]


def config_value(key: str, path: Path) -> str:
    """common.sh's emoe_config_value KEY FILE."""
    return subprocess.run(
        ["bash", "-c", f'source {shlex.quote(str(SLURM / "common.sh"))}; emoe_config_value "$1" "$2"',
         "_", key, str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.rstrip("\n")


def refused(script: Path, env: dict[str, str], message: str, *args: str) -> str:
    """Run the script, which must refuse: exit status 2, one line on stderr starting with
    `ERROR: message`, nothing on stdout. Returns the line."""
    proc = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stderr, proc.stdout[-2000:])
    assert proc.stderr.startswith(f"ERROR: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    return proc.stderr


# ---------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [*SCRIPTS, SLURM / "common.sh"], ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    proc = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS), str(SLURM / "common.sh")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Dry runs
# ---------------------------------------------------------------------------------------------
def test_pretrain_dry_run(tmp_path, parse):
    sections = dry_run(PRETRAIN, base_env(tmp_path), "--log-interval", "1")
    env = env_section(sections["ENV"])
    assert env["MASTER_ADDR"] == "gpu07"  # first host of gpu[07-10], computed without scontrol
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"

    launcher = shlex.split(sections["LAUNCHER"])
    assert launcher[0] == "srun" and "--nodes=4" in launcher and "--ntasks-per-node=1" in launcher
    torchrun = launcher[launcher.index("torchrun") + 1 :]
    assert flag_values(torchrun, "--nnodes") == [["4"]]
    assert flag_values(torchrun, "--nproc-per-node") == [["8"]]
    assert flag_values(torchrun, "--rdzv-backend") == [["c10d"]]
    assert flag_values(torchrun, "--rdzv-endpoint") == [[f"gpu07:{env['MASTER_PORT']}"]]
    assert flag_values(torchrun, "--rdzv-id") == [["4242"]]
    assert torchrun[-1] == "--module"

    argv = training_argv(sections)
    # The recipe is the default YAML, first; the script adds only paths and Slurm-derived flags.
    assert argv[:2] == ["--config", str(MODEL_YAML)] and flag_values(argv, "--config") == [[str(MODEL_YAML)]]
    assert not {"--num-layers", "--num-experts", "--lr", "--train-iters", "--expert-model-parallel-size",
                "--micro-batch-size"} & set(argv)
    args = parse(argv, world_size=32)
    ckpt = str(tmp_path / "out" / "checkpoints")
    assert args.save == ckpt and args.load == ckpt and not args.finetune
    assert args.exit_signal_handler
    assert args.expert_model_parallel_size == 8 and args.data_parallel_size == 32
    assert (args.num_layers, args.hidden_size, args.num_experts, args.moe_router_topk) == (16, 2048, 64, 8)
    assert (args.moe_router_mode, args.emoe_k_ideal, args.emoe_hr_loss_coeff) == ("emoe", 16, 1e-8)
    assert args.moe_grouped_gemm and args.moe_token_dispatcher_type == "alltoall"
    assert args.transformer_impl == "transformer_engine" and args.bf16
    assert args.use_distributed_optimizer and args.ckpt_format == "torch_dist"
    assert (args.train_iters, args.global_batch_size, args.micro_batch_size) == (100000, 512, 2)
    assert (args.lr, args.min_lr, args.save_interval, args.split) == (4e-4, 4e-5, 1000, "99,1,0")
    assert args.data_path == [str(tmp_path / "data" / "corpus_text_document")]
    assert args.tokenizer_model == str(tmp_path / "tokenizer")
    assert args.log_interval == 1  # trailing flags come last and win
    assert args.fp8 is None and not args.moe_router_padding_for_quantization
    assert "--fp8-format" not in argv and "--fp8-recipe" not in argv
    assert args.tensorboard_dir == str(tmp_path / "out" / "tensorboard")
    assert args.exit_duration_in_mins is None  # no time limit known here
    assert "start from scratch" in sections["RESUME"]

    # The model config the entry will build accepts the elastic-routing flags.
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_emoe.config import elastic_config_from_args

    for name, value in dict(
        transformer_impl="local", apply_rope_fusion=False, moe_permute_fusion=False
    ).items():  # no Transformer Engine on a CPU machine
        setattr(args, name, value)
    elastic = elastic_config_from_args(args, core_transformer_config_from_args(args))
    assert (elastic.mode, elastic.resolved_k_ideal(8)) == ("emoe", 16)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_pretrain_fp8_flags(tmp_path, parse, recipe):
    """FP8 is part of the recipe: YAML keys or trailing flags (as the YAML's comment says)."""
    sections = dry_run(PRETRAIN, base_env(tmp_path), "--fp8-format", "hybrid", "--fp8-recipe", recipe,
                       "--moe-router-padding-for-quantization")
    args = parse(training_argv(sections), world_size=32)
    assert (args.fp8, args.fp8_recipe) == ("hybrid", recipe)
    assert args.moe_router_padding_for_quantization


def test_pretrain_overrides_resume_and_exit_duration(tmp_path, parse):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3000\n")
    env = base_env(
        tmp_path,
        CKPT=str(ckpt),
        MASTER_ADDR="10.0.0.5",
        MASTER_PORT="29555",
        GPUS_PER_NODE="4",
        SLURM_NNODES="2",
        SLURM_JOB_END_TIME=str(int(time.time()) + 2 * 3600),
        EXIT_MARGIN_MINS="15",
        NCCL_SOCKET_IFNAME="ib0",
        NCCL_IB_HCA="mlx5_0,mlx5_1",
    )
    overrides = ("--expert-model-parallel-size", "4", "--moe-router-mode", "topk")
    sections = dry_run(PRETRAIN, env, *overrides)
    env_vars = env_section(sections["ENV"])
    assert env_vars["MASTER_ADDR"] == "10.0.0.5" and env_vars["MASTER_PORT"] == "29555"
    assert env_vars["NCCL_SOCKET_IFNAME"] == "ib0" and env_vars["GLOO_SOCKET_IFNAME"] == "ib0"
    assert env_vars["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    torchrun = shlex.split(sections["LAUNCHER"])
    assert flag_values(torchrun, "--rdzv-endpoint") == [["10.0.0.5:29555"]]
    assert flag_values(torchrun, "--nnodes") == [["2"]]
    assert flag_values(torchrun, "--nproc-per-node") == [["4"]]

    args = parse(training_argv(sections), world_size=8)
    assert args.load == str(ckpt) and args.save == str(ckpt)
    assert args.moe_router_mode == "topk" and args.expert_model_parallel_size == 4
    assert 120 - 15 - 1 <= args.exit_duration_in_mins <= 120 - 15
    assert "resume from" in sections["RESUME"] and "3000" in sections["RESUME"]

    sections = dry_run(PRETRAIN, {**env, "EXIT_DURATION_MINS": "0"}, *overrides)
    assert "--exit-duration-in-mins" not in training_argv(sections)
    sections = dry_run(PRETRAIN, {**env, "EXIT_DURATION_MINS": "77"}, *overrides)
    assert flag_values(training_argv(sections), "--exit-duration-in-mins") == [["77"]]


def test_config_relative_to_the_repository_and_custom(tmp_path, parse):
    """CONFIG: a relative path is taken from the repository (whatever the current folder), an
    absolute one as it is; the file's model is what the entry builds."""
    env = base_env(tmp_path, CONFIG="examples/configs/tiny.yaml")
    proc = subprocess.run(["bash", str(PRETRAIN)], env={**env, "DRY_RUN": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"--config {CONFIGS / 'tiny.yaml'} " in proc.stdout

    custom = tmp_path / "my model.yaml"
    custom.write_text(MODEL_YAML.read_text().replace("num-layers: 16", "num-layers: 4"))
    argv = training_argv(dry_run(PRETRAIN, base_env(tmp_path, CONFIG=str(custom))))
    assert flag_values(argv, "--config") == [[str(custom)]]
    args = parse(argv, world_size=32)
    assert (args.num_layers, args.hidden_size, args.num_experts) == (4, 2048, 64)


@pytest.mark.parametrize(
    "script, name",
    [(PRETRAIN, "CONFIG"), (FINETUNE, "CONFIG"), (FINETUNE, "SFT_CONFIG")],
)
@pytest.mark.parametrize("given", ["examples/configs/nope.yaml", "/nonexistent/recipe.yaml", "examples/configs"])
def test_missing_config_is_refused_before_anything_starts(tmp_path, script, name, given):
    env = finetune_env(tmp_path) if script == FINETUNE else base_env(tmp_path)
    env.update({name: given, "CHECK_PATHS": "0"})
    for dry in ("1", "0"):
        refused(script, {**env, "DRY_RUN": dry}, f"{name}={given}: no such file ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, value",
    [
        ("train-iters: 1000\n", "1000"),
        ("train_iters: 1000  # steps\n", "1000"),
        ("'train-iters': \"1000\"\n", "1000"),
        ("--train-iters: 7\r\n", "7"),
        ("train-iters: 5\ntrain-iters: 6", "6"),  # the last one, no final newline
        ("lr: 1.0e-3\n  train-iters: 9\n", ""),  # not top-level
        ("train-iters-x: 1\n# train-iters: 2\n", ""),
        ("train-iters: # none\n", ""),
    ],
)
def test_config_value(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert config_value("train-iters", path) == value


def test_config_value_reads_the_shipped_configs():
    yaml = pytest.importorskip("yaml")
    for path in sorted(CONFIGS.glob("*.yaml")):
        mapping = yaml.safe_load(path.read_text())
        for key in ("train-iters", "micro-batch-size", "num-experts", "split"):
            expected = mapping.get(key)
            assert config_value(key, path) == ("" if expected is None else str(expected)), (path, key)


def test_srun_launcher(tmp_path, parse):
    sections = dry_run(PRETRAIN, base_env(tmp_path, LAUNCHER="srun", SLURM_CPUS_ON_NODE="128"))
    launcher = shlex.split(sections["LAUNCHER"])
    assert "torchrun" not in launcher
    assert "--ntasks=32" in launcher and "--ntasks-per-node=8" in launcher
    assert "--cpus-per-task=16" in launcher
    assert "RANK=$SLURM_PROCID" in launcher[launcher.index("-c") + 1]
    assert launcher[-2:] == ["python", "-m"]
    parse(training_argv(sections), world_size=32)


def test_finetune_switches_to_resume(tmp_path, parse):
    env = finetune_env(tmp_path)
    first = dry_run(FINETUNE, env, "--emoe-hr-loss-coeff", "5e-4")
    launcher = shlex.split(first["LAUNCHER"])
    assert flag_values(launcher, "--nnodes") == [["2"]]
    assert flag_values(launcher, "--rdzv-endpoint")[0][0].startswith("nodeA:")
    assert flag_values(launcher, "--rdzv-id") == [["4242"]]

    argv = training_argv(first)
    # The model YAML, then the fine-tuning one (later, so it wins).
    assert argv[:4] == ["--config", str(MODEL_YAML), "--config", str(SFT_YAML)]
    args = parse(argv, world_size=16)
    assert args.finetune and args.load == env["PRETRAINED"] and args.save == env["CKPT"]
    assert args.sft_packed and args.exit_signal_handler and args.exit_on_missing_checkpoint
    assert (args.moe_router_mode, args.emoe_hr_loss_coeff) == ("emoe", 5e-4)
    # Experts are spread over both nodes: EP 16 over 2 x 8 GPUs.
    assert args.expert_model_parallel_size == 16 and args.num_experts % 16 == 0
    assert (args.train_iters, args.global_batch_size, args.lr, args.split) == (2000, 128, 1e-5, "98,2,0")
    assert "start fine-tuning" in first["RESUME"]

    # A requeued job finds its own checkpoint and resumes it, without --finetune.
    Path(env["CKPT"]).mkdir()
    (Path(env["CKPT"]) / "latest_checkpointed_iteration.txt").write_text("400\n")
    again = dry_run(FINETUNE, env)
    argv = training_argv(again)
    assert "--finetune" not in argv
    args = parse(argv, world_size=16)
    assert not args.finetune and args.load == env["CKPT"] and args.save == env["CKPT"]
    assert "resume fine-tuning" in again["RESUME"] and "400" in again["RESUME"]


def test_finetune_shares_the_pretraining_model(tmp_path, parse):
    """The fine-tuning run builds the model pretraining saved: the same model YAML (also a custom
    CONFIG), and a fine-tuning YAML that changes no architecture flag."""
    yaml = pytest.importorskip("yaml")
    sft_keys = {key.replace("-", "_") for key in yaml.safe_load(SFT_YAML.read_text())}
    assert not sft_keys & {*ARCHITECTURE, "disable_bias_linear"}
    for config in (None, CONFIGS / "tiny.yaml"):
        extra = {} if config is None else {"CONFIG": str(config)}
        pre = training_argv(dry_run(PRETRAIN, base_env(tmp_path, **extra)))
        sft = training_argv(dry_run(FINETUNE, finetune_env(tmp_path, **extra)))
        assert flag_values(pre, "--config")[0] == flag_values(sft, "--config")[0]
        if config is None:
            pre_args, sft_args = parse(pre, world_size=32), parse(sft, world_size=16)
            for name in ARCHITECTURE:
                assert getattr(pre_args, name) == getattr(sft_args, name), name


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, drop, message",
    [
        (PRETRAIN, "DATA_PREFIX", "DATA_PREFIX is not set"),
        (PRETRAIN, "TOKENIZER", "TOKENIZER is not set"),
        (PRETRAIN, "SLURM_JOB_ID", "SLURM_JOB_ID is not set"),
        (FINETUNE, "PRETRAINED", "PRETRAINED is not set"),
        (FINETUNE, "DATA_PREFIX", "DATA_PREFIX is not set"),
    ],
)
def test_missing_variable_is_a_clear_error(tmp_path, script, drop, message):
    env = finetune_env(tmp_path) if script == FINETUNE else base_env(tmp_path)
    del env[drop]
    for dry in ("1", "0"):
        refused(script, {**env, "DRY_RUN": dry}, message)


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(GPUS_PER_NODE="eight"), "GPUS_PER_NODE must be a non-negative integer"),
        (dict(SLURM_NNODES="0"), "NNODES and GPUS_PER_NODE must be at least 1"),
        (dict(LAUNCHER="mpirun"), "LAUNCHER must be torchrun or srun"),
        (dict(EXIT_DURATION_MINS="1h"), "EXIT_DURATION_MINS must be whole minutes"),
        (dict(SLURM_JOB_NODELIST=""), "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, extra, message):
    refused(PRETRAIN, {**base_env(tmp_path, **extra), "DRY_RUN": "1"}, message)


def test_finetune_refuses_bad_pretrained(tmp_path):
    env = finetune_env(tmp_path)
    (Path(env["PRETRAINED"]) / "latest_checkpointed_iteration.txt").unlink()
    refused(FINETUNE, {**env, "DRY_RUN": "1"}, f"PRETRAINED={env['PRETRAINED']} has no latest_checkpointed_iteration.txt")

    env = finetune_env(tmp_path, CKPT=finetune_env(tmp_path)["PRETRAINED"] + "/")
    refused(FINETUNE, {**env, "DRY_RUN": "1"}, "CKPT must differ from PRETRAINED")


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node07", "node07"),
        ("node[01-04]", "node01"),
        ("node[001-002,010],gpu[1-2]", "node001"),
        ("a,b", "a"),
        ("rack[3-4]-n[05-06]", "rack3-n05"),
        ("gpu-[12,14]-ib", "gpu-12-ib"),
    ],
)
def test_first_host_of_nodelist(nodelist, first):
    out = subprocess.run(
        ["bash", "-c", f'source {shlex.quote(str(SLURM / "common.sh"))}; emoe_first_host "$1"', "_",
         nodelist],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert out.strip() == first




# ---------------------------------------------------------------------------------------------
# Refused before anything starts: the allocation against the parallel sizes, output folders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, extra, args, message",
    [
        # the YAML's EP 8 on one node of 4 GPUs
        (PRETRAIN, dict(SLURM_NNODES="1", GPUS_PER_NODE="4"), (),
         "NNODES=1 x GPUS_PER_NODE=4 = 4 processes is not a multiple of --expert-tensor-parallel-size 1 "
         "x --expert-model-parallel-size 8 x --pipeline-model-parallel-size 1 = 8"),
        # the fine-tuning YAML's EP 16 on one node of 8 GPUs
        (FINETUNE, dict(SLURM_NNODES="1", SLURM_JOB_NODELIST="nodeA"), (),
         "NNODES=1 x GPUS_PER_NODE=8 = 8 processes is not a multiple of --expert-tensor-parallel-size 1 "
         "x --expert-model-parallel-size 16"),
        (PRETRAIN, {}, ("--expert-model-parallel-size", "4", "--tensor-model-parallel-size", "3"),
         "NNODES=4 x GPUS_PER_NODE=8 = 32 processes is not a multiple of --tensor-model-parallel-size 3 "
         "x --pipeline-model-parallel-size 1 x --context-parallel-size 1 = 3"),
        (PRETRAIN, {}, ("--pipeline-model-parallel-size=4", "--expert-tensor-parallel-size", "2"),
         "NNODES=4 x GPUS_PER_NODE=8 = 32 processes is not a multiple of --expert-tensor-parallel-size 2 "
         "x --expert-model-parallel-size 8 x --pipeline-model-parallel-size 4 = 64"),
        (PRETRAIN, {}, ("--context-parallel-size", "0"), "--context-parallel-size must be a whole number >= 1"),
        (PRETRAIN, dict(NNODES="2"), (), "NNODES=2 does not match the job's 4 node(s)"),
        (PRETRAIN, dict(SLURM_GPUS_ON_NODE="4", GPUS_PER_NODE="8"), (),
         "GPUS_PER_NODE=8 is more than the job's 4 GPU(s) per node"),
        (PRETRAIN, dict(SLURM_NTASKS_PER_NODE="8"), (),
         "--ntasks-per-node=8 does not fit LAUNCHER=torchrun: submit with --ntasks-per-node=1"),
        (PRETRAIN, dict(SLURM_NTASKS="8"), (), "--ntasks=8 does not fit LAUNCHER=torchrun on 4 node(s)"),
        (PRETRAIN, dict(LAUNCHER="srun", SLURM_NTASKS_PER_NODE="1"), (),
         "--ntasks-per-node=1 does not fit LAUNCHER=srun: submit with --ntasks-per-node=8"),
        (PRETRAIN, dict(LAUNCHER="srun", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8"), (),
         "--ntasks=16 does not fit LAUNCHER=srun on 4 node(s): submit with --ntasks=32"),
    ],
)
def test_allocation_must_fit_the_parallel_sizes(tmp_path, script, extra, args, message):
    env = (finetune_env if script == FINETUNE else base_env)(tmp_path, CHECK_PATHS="0", **extra)
    for dry in ("1", "0"):
        refused(script, {**env, "DRY_RUN": dry}, message, *args)
    assert not (tmp_path / "out").exists()


def test_fitting_allocations_pass(tmp_path):
    """The same checks accept what fits: the srun launcher's one task per GPU, EP spread over the
    data-parallel ranks of TP x PP, the job's own node and task counts."""
    env = base_env(tmp_path, SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8",
                   NNODES="4")
    dry_run(PRETRAIN, env, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "8")
    dry_run(PRETRAIN, {**env, "LAUNCHER": "srun", "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8"})


def _read_only_folder(tmp_path: Path) -> Path | None:
    """A read-only tmpfs mount (root may write anywhere else); None where mounting is not allowed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "emoe-ro", str(folder)], capture_output=True).returncode:
        return None
    return folder


@pytest.mark.parametrize("where", ["CKPT", "--save", "OUTPUT_DIR", "TENSORBOARD_DIR", "read-only"])
def test_unwritable_outputs_are_refused(tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    env = base_env(tmp_path, CHECK_PATHS="0")
    args: tuple[str, ...] = ()
    mounted = None
    if where == "--save":
        args, flag, given = ("--save", str(a_file / "ckpt")), "--save", str(a_file / "ckpt")
    elif where == "read-only":
        mounted = _read_only_folder(tmp_path)
        if mounted is None:
            pytest.skip("cannot mount a read-only folder here")
        flag, given = "--save", str(mounted / "ckpt")
        env["CKPT"] = given
    else:
        given = str(a_file / "sub" / "dir")
        env[where] = given
        flag = {"CKPT": "--save", "TENSORBOARD_DIR": "--tensorboard-dir"}.get(where, where)
    try:
        for dry in ("1", "0"):
            line = refused(PRETRAIN, {**env, "DRY_RUN": dry}, f"{flag} {given}: not writable (", *args)
            assert ("read-only" in line) if mounted else (f"{a_file} is not a folder" in line), line
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# When the batch script requeues its job (common.sh's decision, called as the script calls it)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rc, saved, args, extra, requeued",
    [
        (0, 500, (), {}, "stopped cleanly before --train-iters"),  # exit duration reached: go on
        (0, 1000, (), {}, ""),  # finished (train-iters 1000 in the YAML)
        (0, None, (), {}, ""),  # nothing saved: nothing to resume
        (0, 500, ("--train-iters", "500"), {}, ""),  # a trailing flag beats the YAML
        (0, 1000, ("--train-iters=2000",), {}, "stopped cleanly"),
        (0, 500, (), dict(SLURM_RESTART_COUNT="5", MAX_REQUEUES="5"), ""),
        (0, 500, (), dict(REQUEUE="0"), ""),
        (3, 500, (), {}, ""),  # a crash is not requeued in a loop
        (1, 500, (), dict(EMOE_REQUEUE="1"), "time limit or preemption signal (USR1)"),
        (0, 500, (), dict(EMOE_REQUEUE="1", EMOE_TERMINATING="1"), ""),  # cancelled: Slurm decides
    ],
)
def test_requeue_decision(tmp_path, rc, saved, args, extra, requeued):
    config = tmp_path / "recipe.yaml"
    config.write_text("num-layers: 2\ntrain-iters: 1000\n")
    ckpt = tmp_path / "ckpt"
    if saved is not None:
        ckpt.mkdir()
        (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{saved}\n")
    # The traps' flags (EMOE_*) are set after sourcing, which resets them; the rest is environment.
    flags = " ".join(f"{key}={value}" for key, value in extra.items() if key.startswith("EMOE_"))
    script = (f'source {shlex.quote(str(SLURM / "common.sh"))}; {flags} '
              'EMOE_TRAIN_CMD=(entry --config "$1" --save "$2" "${@:4}"); emoe_requeue_reason "$3"')
    env = {key: value for key, value in extra.items() if not key.startswith("EMOE_")}
    proc = subprocess.run(["bash", "-c", script, "_", str(config), str(ckpt), str(rc), *args],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (requeued in proc.stdout) if requeued else proc.stdout == "", proc.stdout
    assert ("not requeueing" in proc.stderr) == ("MAX_REQUEUES" in extra)


# ---------------------------------------------------------------------------------------------
# Real jobs on a real one-node Slurm cluster (tests/slurm_cluster.py)
# ---------------------------------------------------------------------------------------------
TINY_YAML = "examples/configs/tiny.yaml"  # relative: the scripts take it from the repository
# The scripts ask for 8 GPUs per node; the test node has 2 CPUs and no GPU.
SBATCH_ARGS = ("--nodes=1", "--gpus-per-node=0")
BUDGETS = ("1", "2", "3", "4")
EMOE = ("--moe-router-mode", "emoe", "--emoe-k-ideal", "3")
# tiny.yaml has no split, and Megatron's default (969,30,1) gives the small test corpus an empty
# test split (index building never ends); the fine-tuning YAML has its own.
SPLIT = ("--split", "98,2,0")
# tiny.yaml has no save interval either (Megatron wants one with --save): save at the end only.
PRETRAIN_TINY = (*SPLIT, "--save-interval", "1000")
FINETUNE_ITERS = 24  # ~80 ms a step: room for two interruptions between logged steps
# The shipped fine-tuning YAML (64 experts on 16 GPUs) at the tiny model's size, on 2 processes.
SFT_TINY = ("--expert-model-parallel-size", "2", "--emoe-k-ideal", "3", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr-warmup-iters", "0", "--save-interval", "1000",
            "--train-iters", str(FINETUNE_ITERS), "--elastic-eval-budgets", *BUDGETS)
TABLE_ROW = re.compile(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)(\s+<- trained k)?\s*$", re.M)


def job_env(out: Path, data: dict, kind: str = "pretrain", **extra: str) -> dict[str, str]:
    """What a user exports before sbatch: the venv on PATH, the data, the outputs, 2 processes on
    the (GPU-less) node; plus the project's local launch environment (gloo on loopback, one OpenMP
    thread per rank, no torch.compile)."""
    env = launch.launch_environment()
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", REPO_DIR=str(ROOT),
               GPUS_PER_NODE="2", CONFIG=TINY_YAML, DATA_PREFIX=data[f"{kind}_train"],
               TOKENIZER=data["tokenizer_model"], OUTPUT_DIR=str(out))
    env.update(extra)
    return env


def job_log(info: dict[str, str]) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.exists() else ""


def steps(log: str) -> list[tuple[int, str]]:
    """(iteration, logged LM loss) of every training step the log shows, in order."""
    return [(int(m[1]), m[3]) for m in launch.ITERATION.finditer(log)]


def logged_command(log: str, what: str) -> list[str]:
    """The script's `launcher: ...` or `training: ...` line, split back into its words."""
    return shlex.split(re.search(rf"\] {what}: (.*)$", log, re.M)[1])


def finished_ok(info: dict[str, str], restarts: int = 0) -> None:
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), (
        info, job_log(info)[-4000:])


def wait_for_log(cluster, job: int, pattern: str, start: int = 0, timeout: float = 240) -> re.Match:
    """Wait until the job's output, from character `start` on, matches `pattern` (a line)."""
    regex = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    info = cluster.job(job)
    checked = time.monotonic()
    while True:
        match = regex.search(job_log(info), start)
        if match:
            return match
        if time.monotonic() - checked > 1:
            info, checked = cluster.job(job), time.monotonic()
            assert info["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
                f"job {job} ended ({info['JobState']}) before {pattern!r}", job_log(info)[-4000:])
        assert time.monotonic() < deadline, (f"no {pattern!r} after {timeout}s", job_log(info)[-4000:])
        time.sleep(0.05)


def elastic_table(log: str) -> dict[int, tuple[float, bool]]:
    """The elastic evaluation's console table: k' -> (validation loss, is the trained k)."""
    table = log[log.rindex("validation loss by number of active experts"):]
    return {int(m[1]): (float(m[2]), bool(m[4])) for m in TABLE_ROW.finditer(table)}


def check_elastic_eval(log: str, save: Path, iteration: int) -> dict:
    """The table on the console and elastic_eval.json in --save agree, cover every budget, and at
    the trained k reproduce the training loop's last validation loss."""
    result = json.loads((save / "elastic_eval.json").read_text())
    assert (result["iteration"], result["router_mode"], result["train_topk"]) == (iteration, "emoe", 2)
    assert sorted(result["val_loss"]) == list(BUDGETS)
    table = elastic_table(log)
    assert sorted(table) == [1, 2, 3, 4] and [k for k, (_, trained) in table.items() if trained] == [2]
    for k, (loss, _) in table.items():
        assert loss == pytest.approx(result["val_loss"][str(k)], abs=5e-5)
    final = re.findall(rf"validation loss at iteration {iteration} on validation set \| lm loss value: ([0-9.E+-]+)", log)
    assert final and result["val_loss"]["2"] == pytest.approx(float(final[-1]), rel=1e-6)
    return result


@pytest.mark.slow
def test_bad_use_is_refused_by_the_job_before_anything_starts(slurm_cluster, tmp_path):
    """Real jobs that must not start training: each fails at once with exit status 2 and one line
    (its whole output), and creates nothing."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "latest_checkpointed_iteration.txt").write_text("2\n")
    data = {"pretrain_train": "/nonexistent/corpus", "sft_train": "/nonexistent/sft", "tokenizer_model": "/t"}
    cases = {
        "missing-config": (PRETRAIN, dict(CONFIG="examples/configs/nope.yaml"), (),
                           "CONFIG=examples/configs/nope.yaml: no such file"),
        # the shipped fine-tuning YAML's EP 16 on 1 node x 2 processes
        "nodes-vs-ep": (FINETUNE, dict(PRETRAINED=str(pretrained)), (),
                        "NNODES=1 x GPUS_PER_NODE=2 = 2 processes is not a multiple of "
                        "--expert-tensor-parallel-size 1 x --expert-model-parallel-size 16"),
        "tasks": (PRETRAIN, {}, ("--ntasks-per-node=2",),
                  "--ntasks-per-node=2 does not fit LAUNCHER=torchrun: submit with --ntasks-per-node=1"),
        "unwritable-save": (PRETRAIN, dict(CKPT=str(a_file / "ckpt")), (),
                            f"--save {a_file / 'ckpt'}: not writable ({a_file} is not a folder)"),
    }
    jobs = {}
    for name, (script, extra, sbatch_extra, _) in cases.items():
        (tmp_path / name).mkdir()
        env = job_env(tmp_path / name / "out", data, "sft" if script == FINETUNE else "pretrain",
                      CHECK_PATHS="0", **extra)
        jobs[name] = slurm_cluster.sbatch(script, sbatch_args=(*SBATCH_ARGS, *sbatch_extra), env=env,
                                          cwd=tmp_path / name)
    for name, job in jobs.items():
        info = slurm_cluster.wait(job, timeout=120)
        log = job_log(info)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), (name, info, log)
        assert log.startswith(f"ERROR: {cases[name][3]}") and log.count("\n") == 1, (name, log)
        assert not (tmp_path / name / "out").exists(), name


@pytest.mark.slow
def test_pretrain_job_trains_emoe(slurm_cluster, small_data, tmp_path):
    """`sbatch slurm/pretrain_emoe.sbatch` from the repository, CONFIG=tiny.yaml with EMoE routing:
    the rendezvous from Slurm (scontrol), the exit duration from the time limit (squeue), 4 steps,
    a checkpoint, and the elastic evaluation table."""
    out = tmp_path / "run"
    env = job_env(out, small_data)
    del env["REPO_DIR"]  # found from the submission folder
    job = slurm_cluster.sbatch(PRETRAIN, *EMOE, *PRETRAIN_TINY, "--train-iters", "4", "--elastic-eval-budgets", *BUDGETS,
                               sbatch_args=(*SBATCH_ARGS, f"--output={tmp_path}/%x-%j.out"), env=env, cwd=ROOT)
    info = slurm_cluster.wait(job)
    log = job_log(info)
    finished_ok(info)
    assert info["StdOut"] == f"{tmp_path}/emoe-pretrain-{job}.out"
    port = 20000 + job % 20000
    assert f"job {job} (restart 0) on 1 node(s) x 2 GPU(s), master localhost:{port}" in log
    assert "start from scratch" in log

    launcher = logged_command(log, "launcher")
    assert launcher[:6] == ["srun", "--nodes=1", "--kill-on-bad-exit=1", "--ntasks=1", "--ntasks-per-node=1",
                            "--cpus-per-task=2"]
    assert flag_values(launcher, "--nproc-per-node") == [["2"]]
    assert flag_values(launcher, "--rdzv-endpoint") == [[f"localhost:{port}"]]
    argv = logged_command(log, "training")
    assert argv[:3] == [ENTRY_MODULE, "--config", str(ROOT / TINY_YAML)]
    ckpt = out / "checkpoints"
    assert flag_values(argv, "--save") == [[str(ckpt)]] and flag_values(argv, "--load") == [[str(ckpt)]]
    # 12 h (the script's --time) less the 10 min margin, read from squeue at the start
    (minutes,), = flag_values(argv, "--exit-duration-in-mins")
    assert 700 <= int(minutes) <= 710

    logged = steps(log)
    assert [step for step, _ in logged] == [1, 2, 3, 4] and all(math.isfinite(float(v)) for _, v in logged)
    assert "training step exited with status 0" in log and "requeueing" not in log
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000004" / "metadata.json").is_file()
    assert check_elastic_eval(log, ckpt, 4)["num_experts"] == 4
    assert scalars(out / "tensorboard", "lm loss").keys() == {1, 2, 3, 4}


def finetune(cluster, data: dict, pretrained: Path, root: Path) -> int:
    """Submit the EP = 2 EMoE fine-tuning of `pretrained` into root/run (log in root)."""
    env = job_env(root / "run", data, "sft", PRETRAINED=str(pretrained))
    return cluster.sbatch(FINETUNE, *SFT_TINY, sbatch_args=SBATCH_ARGS, env=env, cwd=root)


@pytest.fixture(scope="module")
def topk_checkpoint(slurm_cluster, small_data, tmp_path_factory) -> Path:
    """A Top-k pretraining checkpoint (2 steps), made by the pretraining script."""
    root = tmp_path_factory.mktemp("slurm_topk")
    job = slurm_cluster.sbatch(PRETRAIN, "--moe-router-mode", "topk", *PRETRAIN_TINY, "--train-iters", "2",
                               sbatch_args=SBATCH_ARGS, env=job_env(root / "run", small_data), cwd=root)
    info = slurm_cluster.wait(job)
    finished_ok(info)
    ckpt = root / "run" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return ckpt


@pytest.fixture(scope="module")
def finetune_reference(slurm_cluster, small_data, topk_checkpoint, tmp_path_factory):
    """The fine-tuning job run uninterrupted: (job fields, log, output folder)."""
    root = tmp_path_factory.mktemp("slurm_sft")
    info = slurm_cluster.wait(finetune(slurm_cluster, small_data, topk_checkpoint, root))
    return info, job_log(info), root / "run"


@pytest.mark.slow
def test_finetune_job_ep2_from_topk(finetune_reference, topk_checkpoint):
    """`sbatch slurm/finetune_emoe_ep.sbatch`: EMoE fine-tuning at EP = 2 from the Top-k checkpoint,
    the model from tiny.yaml, the recipe from the shipped fine-tuning YAML."""
    info, log, out = finetune_reference
    finished_ok(info)
    assert f"start fine-tuning from {topk_checkpoint} (weights only)" in log
    argv = logged_command(log, "training")
    assert flag_values(argv, "--config") == [[str(ROOT / TINY_YAML)], [str(SFT_YAML)]]
    assert "--finetune" in argv and flag_values(argv, "--load") == [[str(topk_checkpoint)]]
    assert flag_values(argv, "--expert-model-parallel-size")[-1] == ["2"]
    assert re.search(rf"loading distributed checkpoint from {re.escape(str(topk_checkpoint))} ", log), log[-3000:]
    assert [step for step, _ in steps(log)] == list(range(1, FINETUNE_ITERS + 1))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(FINETUNE_ITERS)
    check_elastic_eval(log, ckpt, FINETUNE_ITERS)


@pytest.mark.slow
def test_finetune_requeued_twice_resumes_bitwise(slurm_cluster, small_data, topk_checkpoint, finetune_reference,
                                                  tmp_path):
    """Preemption and requeue, for real: the fine-tuning job is interrupted
    1. by the signal the script asks Slurm for before the time limit (`--signal=B:USR1@300`),
       delivered now with `scancel --batch --signal=USR1`: the batch script has the training step
       save and exit, then requeues the job itself;
    2. by `scontrol requeue`: Slurm sends SIGTERM to the job, the step saves, Slurm requeues.
    Each time the job resumes from the saved iteration, and in the end it has logged every step
    once, with the uninterrupted run's losses bit for bit, and evaluates the same final weights."""
    job = finetune(slurm_cluster, small_data, topk_checkpoint, tmp_path)
    wait_for_log(slurm_cluster, job, r"iteration\s+1/")
    assert slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)]).returncode == 0
    resumed = wait_for_log(slurm_cluster, job, r"resume fine-tuning from \S+ \(iteration (\d+)\)")
    wait_for_log(slurm_cluster, job, rf"iteration\s+{int(resumed[1]) + 1}/", start=resumed.end())
    assert slurm_cluster.scontrol("requeue", str(job)).returncode == 0
    info = slurm_cluster.wait(job)
    log = job_log(info)
    finished_ok(info, restarts=2)

    ckpt = tmp_path / "run" / "checkpoints"
    assert log.count("start fine-tuning from") == 1
    saved = [int(i) for i in re.findall(rf"resume fine-tuning from {re.escape(str(ckpt))} \(iteration (\d+)\)", log)]
    assert len(saved) == 2 and 1 <= saved[0] < saved[1] < FINETUNE_ITERS, saved
    assert "got SIGUSR1" in log and f"requeueing job {job}: time limit or preemption signal (USR1)" in log
    assert "got SIGTERM" in log and f"JOB {job} ON localhost CANCELLED" in log and "DUE TO JOB REQUEUE" in log
    assert "--finetune" not in logged_command(log[log.index("resume fine-tuning"):], "training")

    reference_info, reference_log, reference_out = finetune_reference
    finished_ok(reference_info)
    # Every step's losses as logged to TensorBoard (float32, one value per step): bit for bit.
    losses = scalars(tmp_path / "run" / "tensorboard", "lm loss")
    assert losses == scalars(reference_out / "tensorboard", "lm loss")
    assert scalars(tmp_path / "run" / "tensorboard", "grad-norm") == scalars(reference_out / "tensorboard", "grad-norm")
    # The console: every step once, in order, with the same losses, except that Megatron (0.19,
    # training_log: should_reset = not is_first_iteration) prints at the second step of every
    # start the mean of its first two steps.
    logged, expected = steps(log), steps(reference_log)
    assert [step for step, _ in logged] == [step for step, _ in expected] == list(range(1, FINETUNE_ITERS + 1))
    for (step, loss), (_, reference) in zip(logged, expected):
        if step - 2 in saved:
            assert loss == f"{float(np.float32(losses[step - 1]) + np.float32(losses[step])) / 2:.6E}", step
        else:
            assert loss == reference, step
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(FINETUNE_ITERS)
    assert check_elastic_eval(log, ckpt, FINETUNE_ITERS) == json.loads(
        (reference_out / "checkpoints" / "elastic_eval.json").read_text())
