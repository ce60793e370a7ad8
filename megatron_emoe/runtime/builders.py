"""Small real Megatron models straight from a `TransformerConfig`, for tests and benchmarks.

Megatron's own GPT layer specs (local, or Transformer Engine with grouped GEMM), made elastic by
`with_elastic_router` when an `ElasticMoEConfig` is given and left as Megatron's `MoELayer` /
`TopKRouter` otherwise. Built on the current device (`megatron_emoe.cpu.device`), inside a world
set up by `megatron_emoe.runtime.launch`. The apps build their models from flags (`runtime.model`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.cpu import device
from megatron_emoe.spec import rewrite_moe_layers, with_elastic_router


def reseed(seed: int) -> None:
    """Seed torch and Megatron's RNG tracker, so that two builds draw the same weights."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def layer_spec(config: TransformerConfig, te: bool = False):
    """Megatron's GPT layer spec for `config`'s MoE: Transformer Engine (grouped GEMM) or local."""
    if te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=True)
    return get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)


def moe_layer(config: TransformerConfig, elastic: Optional[ElasticMoEConfig] = None, te: bool = False,
              layer_number: int = 1):
    """Megatron's `MoELayer` with its `TopKRouter` (elastic=None), or the `ElasticMoELayer` with an
    `ElasticRouter` that `with_elastic_router` puts in the same spec."""
    spec = layer_spec(config, te)
    if elastic is not None:
        spec = with_elastic_router(spec, elastic)
    mlp = spec.submodules.mlp
    layer = mlp(config=config) if isinstance(mlp, functools.partial) else build_module(mlp, config=config)
    layer.set_layer_number(layer_number)
    return layer.to(device())  # as Megatron's get_model does with .cuda(): norms start on CPU


def gpt_model(config: TransformerConfig, elastic: Optional[ElasticMoEConfig], vocab_size: int,
              seq_length: int, te: bool = False, vp_stage: Optional[int] = None) -> GPTModel:
    """A real Megatron `GPTModel` (RoPE), plain Top-k (elastic=None) or with elastic routers:
    the layers of this rank's pipeline stage (virtual stage `vp_stage` when interleaved)."""
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=te, vp_stage=vp_stage)
    if elastic is not None:
        block = rewrite_moe_layers(block, elastic)[0]  # a stage may hold dense layers only
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=vocab_size,
        max_sequence_length=seq_length, position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    return model.to(device())


def gpt_model_chunks(config: TransformerConfig, elastic: Optional[ElasticMoEConfig],
                     vocab_size: int, seq_length: int) -> list[GPTModel]:
    """This rank's model chunks for Megatron's pipeline schedules: one per virtual stage."""
    stages = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if stages is None:
        return [gpt_model(config, elastic, vocab_size, seq_length)]
    return [gpt_model(config, elastic, vocab_size, seq_length, vp_stage=v) for v in range(stages)]


def gpt_batch(batch_size: int, seq_length: int, vocab_size: int, te: bool = False, seed: int = 0):
    """Random token ids `[batch, seq]`, positions, causal mask (None with TE: its attention is
    causal itself) and next-token labels, on the current device."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab_size, (batch_size, seq_length + 1), generator=generator)
    positions = torch.arange(seq_length).expand(batch_size, seq_length)
    mask = None if te else torch.triu(
        torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]
    to = functools.partial(torch.Tensor.to, device=device())
    return (to(tokens[:, :-1].contiguous()), to(positions.contiguous()),
            None if mask is None else to(mask), to(tokens[:, 1:].contiguous()))
