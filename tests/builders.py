"""The tests' tiny sizes for the shared builders (`megatron_emoe.runtime.builders`), plus a dense
per-expert reference for MoE outputs.

Everything here builds Megatron-Core's own modules; only `dense_reference` is written out, because
it is the independent answer the real layer is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_emoe import ElasticMoEConfig
from megatron_emoe.runtime import builders as runtime_builders

VOCAB = 64
SEQ = 16


def moe_config(**overrides) -> TransformerConfig:
    """A tiny fp32 MoE TransformerConfig sized for CPU tests; parallel sizes from parallel_state."""
    settings = dict(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=32,
        num_attention_heads=2,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        settings.update(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            sequence_parallel=tp > 1,
        )
    settings.update(overrides)
    return TransformerConfig(**settings)


def reseed(seed: int = 0) -> None:
    """Seed the default generator and Megatron's RNG tracker, so two builds get equal weights."""
    runtime_builders.reseed(seed)


def moe_layer(config: TransformerConfig, elastic: ElasticMoEConfig, layer_number: int = 1):
    """A real (Elastic)MoELayer built from Megatron's local GPT layer spec."""
    return runtime_builders.moe_layer(config, elastic, layer_number=layer_number)


def gpt_model(config: TransformerConfig, elastic: ElasticMoEConfig) -> GPTModel:
    """A tiny real GPTModel whose MoE layers route elastically."""
    return runtime_builders.gpt_model(config, elastic, VOCAB, SEQ)


def gpt_model_chunks(config: TransformerConfig, elastic: ElasticMoEConfig) -> list[GPTModel]:
    """This rank's chunks of `gpt_model` for Megatron's pipeline schedules."""
    return runtime_builders.gpt_model_chunks(config, elastic, VOCAB, SEQ)


def gpt_batch(batch_size: int = 2, seed: int = 0):
    """Token ids, positions, causal mask and next-token labels for `gpt_model`."""
    return runtime_builders.gpt_batch(batch_size, SEQ, VOCAB, seed=seed)


def inputs(seed: int, hidden: int, seq: int = 12, batch: int = 2) -> torch.Tensor:
    """Hidden states `[seq, batch, hidden]` for a lone MoE layer, from `seed`."""
    generator = torch.Generator().manual_seed(100 + seed)
    return torch.randn(seq, batch, hidden, generator=generator)


def record_routing(router) -> list:
    """Keep the routing map `[tokens, experts]` of every forward of `router`."""
    maps = []
    router.register_forward_hook(lambda module, args, output: maps.append(output[1].detach()))
    return maps


def record_router_calls(router) -> list:
    """Keep (grad enabled, routing map) of every forward of `router`: a checkpointed forward
    runs without grad, its recompute with."""
    calls = []
    router.register_forward_hook(
        lambda module, args, output: calls.append((torch.is_grad_enabled(), output[1].detach()))
    )
    return calls


def all_expert_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 `[experts, ffn, hidden]` and fc2 `[experts, hidden, ffn]` of every expert, over EP."""
    local = layer.experts.local_experts
    fc1 = torch.stack([e.linear_fc1.weight.detach() for e in local])
    fc2 = torch.stack([e.linear_fc2.weight.detach() for e in local])
    group = parallel_state.get_expert_model_parallel_group()
    if group.size() == 1:
        return fc1, fc2
    gathered = [[torch.empty_like(w) for _ in range(group.size())] for w in (fc1, fc2)]
    torch.distributed.all_gather(gathered[0], fc1, group=group)
    torch.distributed.all_gather(gathered[1], fc2, group=group)
    return torch.cat(gathered[0]), torch.cat(gathered[1])


def dense_reference(x, router_weight, fc1, fc2, k: int) -> torch.Tensor:
    """Every expert on every token, mixed by softmax over each token's top-k logits: `[tokens, h]`."""
    logits = x @ router_weight.t()  # [tokens, experts]
    top = logits.topk(k, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top.indices, top.values.softmax(-1))
    hidden = F.gelu(torch.einsum("efh,th->tef", fc1, x))  # [tokens, experts, ffn]
    expert_out = torch.einsum("ehf,tef->teh", fc2, hidden)  # [tokens, experts, hidden]
    return torch.einsum("te,teh->th", gates, expert_out)
