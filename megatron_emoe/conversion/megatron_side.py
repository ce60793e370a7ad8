"""The Megatron side of a conversion: a built model's weights by global name, filled from Hugging
Face tensors (this rank's TP/EP shard) and saved as a release checkpoint.

Runs inside ranks set up by `megatron_emoe.runtime.launch.run_gloo` (CPU, gloo) on the model of
`megatron_emoe.runtime.model`, so a converted checkpoint loads in training unchanged.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state as ps
from megatron.training.checkpointing import save_checkpoint

from megatron_emoe.conversion import tensors
from megatron_emoe.conversion.families import ConversionError, Rule

_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")


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
    save_checkpoint(0, model, None, None, 0, release=True)
