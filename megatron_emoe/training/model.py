"""The GPT model of the training entry: Megatron's default layer spec with elastic routers."""

from __future__ import annotations

import functools

from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.spec import with_elastic_router


def _elastic_default_spec(model_config, vp_stage=None, *, elastic: ElasticMoEConfig, adapt):
    from megatron.training.models.gpt import default_layer_spec

    return adapt(with_elastic_router(default_layer_spec(model_config, vp_stage), elastic))


def _architecture_options(args):
    """Spec changes the flags ask for beyond Megatron's default spec (identity when none)."""
    changes = []
    if getattr(args, "qk_layernorm_across_heads", False):
        if not args.qk_layernorm:
            raise ValueError("--qk-layernorm-across-heads needs --qk-layernorm")
        from megatron_emoe.qk_norm import with_projection_qk_norm

        changes.append(with_projection_qk_norm)
    if getattr(args, "multi_latent_attention", False) and args.transformer_impl == "local":
        from megatron_emoe.mla import with_local_mla

        changes.append(functools.partial(with_local_mla, q_lora_rank=args.q_lora_rank))

    def adapt(spec):
        for change in changes:
            spec = change(spec)
        return spec

    return adapt


def elastic_gpt_config(args, elastic: ElasticMoEConfig):
    """Megatron's `GPTModelConfig` from the flags, its layer spec wrapped by `with_elastic_router`."""
    from megatron.training.argument_utils import gpt_config_from_args

    model_config = gpt_config_from_args(args)
    adapt = _architecture_options(args)
    if model_config.transformer_layer_spec is not None:  # --spec names a custom spec
        base = model_config.transformer_layer_spec
        model_config.transformer_layer_spec = adapt(with_elastic_router(
            base(model_config) if callable(base) else base, elastic
        ))
    else:
        model_config.transformer_layer_spec = functools.partial(
            _elastic_default_spec, elastic=elastic, adapt=adapt
        )
    return model_config
