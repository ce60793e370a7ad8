"""The read side of Megatron checkpoints: the tracker, the latest iteration, the flags a checkpoint
was saved with (and the `TransformerConfig` they make), and the `hf/` folder of converted models.

Nothing here builds a model; `runtime.model` does, from the flags read here.
"""

from __future__ import annotations

import argparse
import os

import torch
from megatron.core import dist_checkpointing
from megatron.training.arguments import core_transformer_config_from_args

from megatron_emoe.runtime import cpu_loop
from megatron_emoe.runtime.arguments import parse_training_args

TRACKER = "latest_checkpointed_iteration.txt"
HF_SUBDIR = "hf"  # config + tokenizer of a converted model's Hugging Face source


def iteration_dir(iteration: int) -> str:
    """Megatron's folder name for a global checkpoint at `iteration`."""
    return f"iter_{iteration:07d}"


def _tracked(checkpoint_dir: str | None) -> str | None:
    """What Megatron's tracker in `checkpoint_dir` names ("release" or an iteration), or None."""
    tracker = os.path.join(checkpoint_dir, TRACKER) if checkpoint_dir else None
    if tracker is None or not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return f.read().strip()


def latest_iteration(checkpoint_dir: str | None) -> int | None:
    """The iteration Megatron's tracker in `checkpoint_dir` names, or None when there is none."""
    tracked = _tracked(checkpoint_dir)
    if tracked is None:
        return None
    return 0 if tracked == "release" else int(tracked)


def latest_checkpoint_name(checkpoint_dir: str | None) -> str | None:
    """The folder (`release` or `iter_N`) Megatron's tracker in `checkpoint_dir` names, or None."""
    tracked = _tracked(checkpoint_dir)
    if tracked is None:
        return None
    return "release" if tracked == "release" else iteration_dir(int(tracked))


def checkpoint_args(checkpoint_dir: str) -> argparse.Namespace | None:
    """The training flags saved with the latest checkpoint in `checkpoint_dir`."""
    name = latest_checkpoint_name(checkpoint_dir)
    return dist_checkpointing.load_common_state_dict(os.path.join(checkpoint_dir, name)).get("args")


def saved_over_defaults(saved: argparse.Namespace) -> argparse.Namespace:
    """Today's default flags with the saved run's values on top (no process group needed):
    flags the saving run did not know (plain Megatron-LM checkpoints have no elastic flags) take
    their default values."""
    args = parse_training_args(cpu_loop.with_cpu_flags([]))
    runtime = {"rank", "world_size", "local_rank"}
    for name, value in vars(saved).items():
        if name not in runtime:
            setattr(args, name, value)
    return args


def checkpoint_config(saved: argparse.Namespace, dispatcher: str | None = None):
    """The saved run's `TransformerConfig`, by Megatron's own translation of its flags (no model,
    no process group), to check budgets and count expert FLOPs before anything is built;
    `dispatcher` overrides the token dispatcher the budgets are checked against."""
    config = core_transformer_config_from_args(saved_over_defaults(saved))
    if dispatcher:
        config.moe_token_dispatcher_type = dispatcher
    return config


def args_from_checkpoint(
    saved: argparse.Namespace, load_dir: str, tp: int = 1, ep: int = 1
) -> argparse.Namespace:
    """The saved run's flags, re-targeted at loading its weights at TP = `tp`, EP = `ep` on the
    ranks of the current gloo world (no pipeline or context parallelism, no optimizer), on top
    of `saved_over_defaults`.
    """
    args = saved_over_defaults(saved)
    world = torch.distributed.get_world_size()
    layout = {
        "tensor_model_parallel_size": tp, "expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
        "context_parallel_size": 1, "sequence_parallel": False, "data_parallel_size": world // tp,
        "world_size": world, "rank": torch.distributed.get_rank(), "use_distributed_optimizer": False,
        "moe_grouped_gemm": False,
        "load": load_dir, "pretrained_checkpoint": None, "save": None, "finetune": False,
        "no_load_optim": True, "no_load_rng": True, "use_checkpoint_args": False,
        "exit_on_missing_checkpoint": True, "perform_initialization": False, "ckpt_format": "torch_dist",
        "global_batch_size": args.micro_batch_size * (world // tp), "rampup_batch_size": None,
        "tensorboard_dir": None, "wandb_project": None, "distributed_backend": "gloo",
    }
    for name, value in layout.items():
        setattr(args, name, value)
    if cpu_loop.on_cpu():
        args.transformer_impl = "local"
        args.use_cpu_initialization = True
    return args
