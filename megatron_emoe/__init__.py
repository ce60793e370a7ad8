"""megatron-emoe: elastic Mixture-of-Experts routing (EMoE, Matryoshka MoE) for Megatron-Core.

`megatron_emoe.routing` is pure torch and imports without Megatron; the Megatron glue below is
imported lazily so that `import megatron_emoe` stays light.
"""

from megatron_emoe.budget import Budget, TopP
from megatron_emoe.config import ElasticMoEConfig, add_elastic_moe_args, elastic_config_from_args

__version__ = "0.1.0"

_LAZY = {
    "ElasticRouter": "megatron_emoe.router",
    "ElasticMoELayer": "megatron_emoe.layer",
    "with_elastic_router": "megatron_emoe.spec",
    "set_active_experts": "megatron_emoe.routers",
    "get_active_experts": "megatron_emoe.routers",
    "set_training_step": "megatron_emoe.routers",
    "elastic_routers": "megatron_emoe.routers",
    "CoactivationRecorder": "megatron_emoe.coactivation",
}

__all__ = ["Budget", "ElasticMoEConfig", "TopP", "add_elastic_moe_args", "elastic_config_from_args",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_emoe' has no attribute {name!r}")
