"""The Megatron side of a conversion: Megatron's own args, elastic GPTModel and checkpointing.

Runs inside ranks set up by `megatron_emoe.launch.run_gloo` (CPU, gloo). The model is the
training entry's (`elastic_gpt_config`), so a converted checkpoint loads there unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator

import torch

from megatron_emoe.conversion import tensors
from megatron_emoe.conversion.families import ConversionError, Rule

_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")


def build_args(argv: list[str]) -> argparse.Namespace:
    """Megatron's flags for this rank from `argv`, validated by Megatron (world from gloo)."""
    from megatron.training.arguments import validate_args

    from megatron_emoe.training import cpu_loop
    from megatron_emoe.training.arguments import parse_training_args

    cpu_loop.enable()  # CPU views of torch in megatron.training (no-op with CUDA)
    args = parse_training_args(cpu_loop.with_cpu_flags(argv))
    args.world_size = torch.distributed.get_world_size()
    args.rank = torch.distributed.get_rank()
    validate_args(args, {})
    return args


def args_from_checkpoint(
    saved: argparse.Namespace, load_dir: str, tp: int = 1, ep: int = 1
) -> argparse.Namespace:
    """The saved run's flags, re-targeted at loading its weights at TP = `tp`, EP = `ep` on the
    ranks of the current gloo world (no pipeline or context parallelism, no optimizer), on top
    of `saved_over_defaults`.
    """
    from megatron_emoe.training import cpu_loop

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


def saved_over_defaults(saved: argparse.Namespace) -> argparse.Namespace:
    """Today's default flags with the saved run's values on top (no process group needed):
    flags the saving run did not know (plain Megatron-LM checkpoints have no elastic flags) take
    their default values."""
    from megatron_emoe.training import cpu_loop
    from megatron_emoe.training.arguments import parse_training_args

    args = parse_training_args(cpu_loop.with_cpu_flags([]))
    runtime = {"rank", "world_size", "local_rank"}
    for name, value in vars(saved).items():
        if name not in runtime:
            setattr(args, name, value)
    return args


@contextlib.contextmanager
def megatron_globals(args: argparse.Namespace, build_tokenizer: bool = False) -> Iterator[None]:
    """Megatron's global args/timers (and tokenizer if asked) for the body, then unset."""
    from megatron.training.global_vars import (
        set_global_variables,
        unset_global_variables,
    )

    from megatron_emoe.training import cpu_loop

    cpu_loop.enable()  # CPU views of torch in megatron.training (no-op with CUDA)
    set_global_variables(args, build_tokenizer=build_tokenizer)
    try:
        yield
    finally:
        unset_global_variables()


def build_model(args: argparse.Namespace) -> list[torch.nn.Module]:
    """The training entry's GPTModel (elastic routers, default layer spec) for these flags."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_emoe.arguments import elastic_config_from_args
    from megatron_emoe.training.model import elastic_gpt_config

    model_config = elastic_gpt_config(args, elastic_config_from_args(args))
    builder = model_config.get_builder_cls()(model_config)
    return builder.build_distributed_models(
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False
    )


def weights(model: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of the (single-chunk) model, without `_extra_state`."""
    (chunk,) = model
    return {
        name: value
        for name, value in chunk.state_dict(keep_vars=True).items()
        if not name.endswith("_extra_state")
    }


def global_name(local_name: str, first_local_expert: int) -> str:
    """A local parameter's name at TP = EP = 1 (expert indices made global)."""
    return _LOCAL_EXPERT.sub(
        lambda m: f"{m.group(1)}{int(m.group(2)) + first_local_expert}{m.group(3)}", local_name
    )


def local_shard(full: torch.Tensor, param: torch.Tensor, name: str, swiglu: bool) -> torch.Tensor:
    """This rank's piece of a full Megatron tensor, from the parameter's TP attributes."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    is_expert = not getattr(param, "allreduce", True)
    rank = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()
    size = (ps.get_expert_tensor_parallel_world_size() if is_expert
            else ps.get_tensor_model_parallel_world_size())
    gated = swiglu and name.endswith("linear_fc1.weight")
    return tensors.tensor_parallel_shard(full, param.partition_dim, rank, size, gated=gated)


def fill_from_hf(model, rules: dict[str, Rule], reader, swiglu: bool, progress=None) -> None:
    """Copy every local parameter of `model` from the HF tensors its rule names."""
    from megatron.core import parallel_state as ps

    local = weights(model)
    experts_per_rank = _local_experts(local)
    first_expert = ps.get_expert_model_parallel_rank() * experts_per_rank
    with torch.no_grad():
        for name, param in local.items():
            rule = rules.get(global_name(name, first_expert))
            if rule is None:
                raise ConversionError(f"Megatron parameter {name} has no Hugging Face source")
            full = rule.to_megatron(*(reader.get(hf) for hf in rule.hf))
            shard = local_shard(full, param, name, swiglu)
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(
                    f"{', '.join(rule.hf)} give {rule.megatron} the shape {tuple(shard.shape)}, "
                    f"but the config builds {tuple(param.shape)} here: config.json and weights disagree"
                )
            param.copy_(shard)
            if progress is not None:
                progress.update(1)


def _local_experts(local: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(2)) for name in local for m in [_LOCAL_EXPERT.search(name)] if m}
    return len(indices)


def save_release(model) -> None:
    """Save `model` as Megatron's `release` checkpoint in `--save` (no optimizer, no RNG)."""
    from megatron.training.checkpointing import save_checkpoint

    save_checkpoint(0, model, None, None, 0, release=True)


def load(model) -> int:
    """Load the checkpoint in `--load` into `model` (any saved TP/EP layout); its iteration."""
    from megatron.training.checkpointing import load_checkpoint

    iteration, _ = load_checkpoint(model, None, None, strict=True)
    return iteration


@contextlib.contextmanager
def loaded_model(load_dir: str, tp: int = 1, ep: int = 1) -> Iterator[list[torch.nn.Module]]:
    """The checkpoint in `load_dir` as a model at TP = `tp`, EP = `ep` (on the current gloo ranks)."""
    from megatron_emoe.training.checkpoints import checkpoint_args

    args = args_from_checkpoint(checkpoint_args(load_dir), load_dir, tp=tp, ep=ep)
    with megatron_globals(args):
        model = build_model(args)
        load(model)
        yield model
