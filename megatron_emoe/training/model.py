"""The GPT model of the training entry: Megatron's default layer spec with elastic routers."""

from __future__ import annotations

import functools

from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.spec import with_elastic_router


def _elastic_default_spec(model_config, vp_stage=None, *, elastic: ElasticMoEConfig):
    from megatron.training.models.gpt import default_layer_spec

    return with_elastic_router(default_layer_spec(model_config, vp_stage), elastic)


def elastic_gpt_config(args, elastic: ElasticMoEConfig):
    """Megatron's `GPTModelConfig` from the flags, its layer spec wrapped by `with_elastic_router`."""
    from megatron.training.argument_utils import gpt_config_from_args

    model_config = gpt_config_from_args(args)
    if model_config.transformer_layer_spec is not None:  # --spec names a custom spec
        base = model_config.transformer_layer_spec
        model_config.transformer_layer_spec = with_elastic_router(
            base(model_config) if callable(base) else base, elastic
        )
    else:
        model_config.transformer_layer_spec = functools.partial(
            _elastic_default_spec, elastic=elastic
        )
    return model_config
