"""The flags a checkpoint was saved with, and what they make: Megatron's `TransformerConfig` (to
check budgets before anything is built) and the flags to load the checkpoint at another layout.

Reads the common state of a checkpoint that `runtime.checkpoints` has found and checked.
"""

from __future__ import annotations

import argparse
import os

import torch
from megatron.core import dist_checkpointing
from megatron.training.arguments import core_transformer_config_from_args

from megatron_emoe.runtime import cpu_loop
from megatron_emoe.runtime.arguments import parse_training_args
from megatron_emoe.runtime.checkpoints import reading_checkpoint, required_checkpoint


def checkpoint_args(checkpoint_dir: str, flag: str = "--load", name: str | None = None
                    ) -> argparse.Namespace | None:
    """The training flags saved with the latest checkpoint in `checkpoint_dir`, once it passes
    `checked_checkpoint` (or with `name`, a folder the caller has checked so, that one's);
    `UsageError` when there is none or it is corrupt."""
    name = name or required_checkpoint(checkpoint_dir, flag)
    with reading_checkpoint(checkpoint_dir, name, flag):
        common = dist_checkpointing.load_common_state_dict(os.path.join(checkpoint_dir, name))
    return common.get("args") if isinstance(common, dict) else None


def saved_over_defaults(saved: argparse.Namespace) -> argparse.Namespace:
    """Today's default flags with the saved run's values on top (no process group needed):
    flags the saving run did not know (plain Megatron-LM checkpoints have no elastic flags) take
    their default values."""
    args = parse_training_args(cpu_loop.with_cpu_flags([]))
    runtime = {"rank", "world_size", "local_rank"}
    for name, value in vars(saved).items():
        if name not in runtime:
            setattr(args, name, value)
    if args.mmoe_sample_level == "step":  # saved before the level and the frequency were split
        args.mmoe_sample_level, args.mmoe_resample_every = "model", "micro-batch"
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
