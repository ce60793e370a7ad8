"""Expert parallelism for an elastic transformers model through DeepSpeed-MoE: each MoE block's
routed experts move into a `deepspeed.moe.layer.MoE` with `ep_size`, routed by the block's own
elastic gate (`DeepSpeedElasticGate`), and move back with `from_deepspeed_moe`.

Needs `deepspeed` (`pip install megatron-emoe[deepspeed]`, built with DS_BUILD_OPS=0 on CPU) and,
for ep_size > 1, torch.distributed initialised (DeepSpeed creates its expert groups from it).
Limits: DeepSpeed's ZeRO-3 refuses its MoE layers (use ZeRO-1/2); Mixtral's router jitter noise
is refused; the DeepSpeed layer is dropless (capacity = the busiest expert's load).
"""

from __future__ import annotations

import copy
import importlib
from unittest import mock

import torch
import torch.nn.functional as F

from megatron_emoe.errors import UsageError
from megatron_emoe.hf.deepspeed_gate import DeepSpeedElasticGate
from megatron_emoe.hf.elasticize import elastic_record


def init_distributed() -> None:
    """`deepspeed.init_distributed` (gloo without CUDA, else NCCL), without the shared-memory
    all-reduce kernel its CPU backend otherwise JIT-compiles (about 30 s on 2 cores): that kernel
    serves CPU inference all-reduces only, and training here runs on gloo or NCCL."""
    import deepspeed

    # `deepspeed.comm.torch` the module (the package's attribute `torch` is torch itself)
    deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        deepspeed.init_distributed(dist_backend=backend)
        return
    with mock.patch.object(deepspeed_torch_comm, "build_shm_op", return_value=None):
        deepspeed.init_distributed(dist_backend=backend)


class SwiGLUExpert(torch.nn.Module):
    """One routed expert as transformers computes it: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, width: int, act):
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * width, bias=False)  # [gate; up] rows
        self.down = torch.nn.Linear(width, hidden, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class DeepSpeedMoEBlock(torch.nn.Module):
    """A transformers MoE block whose routed experts run in DeepSpeed's expert-parallel MoE layer;
    `block` keeps the rest (shared experts and their gate) under their own names."""

    def __init__(self, block: torch.nn.Module, moe: torch.nn.Module, experts_class: type):
        super().__init__()
        self.block = block
        self.moe = moe
        self.experts_class = experts_class  # to rebuild the transformers experts on the way back

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, hidden]` -> routed experts + the family's shared expert(s)."""
        output = self.moe(hidden_states)[0]
        block = self.block
        if hasattr(block, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert
            shared = block.shared_expert(hidden_states)
            output = output + F.sigmoid(block.shared_expert_gate(hidden_states)) * shared
        if hasattr(block, "shared_experts"):  # DeepSeek
            output = output + block.shared_experts(hidden_states)
        return output


def to_deepspeed_moe(model: torch.nn.Module, ep_size: int = 1) -> torch.nn.Module:
    """Move the routed experts of every MoE block of the elastic `model` into
    `deepspeed.moe.layer.MoE` layers with `ep_size` (in place; this rank keeps its experts)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    record = elastic_record(model)
    config = model.config
    if getattr(config, "router_jitter_noise", 0.0):
        raise UsageError("router_jitter_noise > 0 (Mixtral) is not reproduced by the DeepSpeed-MoE layer")
    experts_total = record.style.num_experts
    if ep_size < 1 or experts_total % ep_size:
        raise UsageError(f"ep_size must divide the {experts_total} experts, got {ep_size}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if ep_size > 1 and not distributed:
        raise UsageError("ep_size > 1 needs torch.distributed initialised (deepspeed.init_distributed)")
    for gate in record.gates:
        parent, name, block = _block_of(model, gate)
        template = SwiGLUExpert(config.hidden_size, block.experts.intermediate_dim, block.experts.act_fn)
        moe = MoE(config.hidden_size, template, num_experts=experts_total, ep_size=ep_size,
                  k=record.style.topk, drop_tokens=False, use_rts=False)
        moe.deepspeed_moe.gate = DeepSpeedElasticGate(gate)
        rank = 0
        if distributed:
            moe.set_deepspeed_parallelism()
            rank = groups._get_expert_parallel_rank(moe.expert_group_name)
        local = moe.num_local_experts
        with torch.no_grad():
            for index, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                source = rank * local + index
                expert.gate_up.weight.copy_(block.experts.gate_up_proj[source])
                expert.down.weight.copy_(block.experts.down_proj[source])
        moe.deepspeed_moe.experts.to(block.experts.gate_up_proj.dtype)
        experts_class = type(block.experts)
        del block.gate, block.experts
        setattr(parent, name, DeepSpeedMoEBlock(block, moe, experts_class))
    return model


def from_deepspeed_moe(model: torch.nn.Module) -> torch.nn.Module:
    """The inverse of `to_deepspeed_moe`: every rank gets the full transformers experts back
    (gathered over the expert-parallel group), so the model saves with `save_pretrained`."""
    config = model.config
    for name, module in list(model.named_modules()):
        if not isinstance(module, DeepSpeedMoEBlock):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        layer = module.moe.deepspeed_moe
        gate_up = torch.stack([e.gate_up.weight.detach() for e in layer.experts.deepspeed_experts])
        down = torch.stack([e.down.weight.detach() for e in layer.experts.deepspeed_experts])
        if module.moe.ep_size > 1:
            gate_up, down = (_gather(t, layer.ep_group) for t in (gate_up, down))
        experts = module.experts_class(copy.deepcopy(config))
        with torch.no_grad():
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        block = module.block
        block.gate = layer.gate.router
        block.experts = experts.to(gate_up.dtype)
        setattr(parent, name.rsplit(".", 1)[1], block)
    return model


def _gather(local: torch.Tensor, group) -> torch.Tensor:
    """`[local experts, ...]` of every rank of the expert-parallel group, in rank order."""
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def _block_of(model: torch.nn.Module, gate: torch.nn.Module):
    """(parent module, attribute name, MoE block) of an elastic gate."""
    for name, module in model.named_modules():
        if getattr(module, "gate", None) is gate:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute, module
    raise UsageError("an elastic gate is no longer inside its MoE block: convert a model once")
