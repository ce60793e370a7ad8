"""`with_elastic_router`: rewrite any Megatron layer/block spec so its MoE layers route elastically."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import InferenceTopKRouter, TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, import_module

from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.layer import ElasticMoELayer
from megatron_emoe.router import ElasticRouter


def with_elastic_router(spec: Any, elastic: ElasticMoEConfig) -> Any:
    """Return a copy of ``spec`` whose MoE layers use `ElasticMoELayer` + `ElasticRouter`.

    Works on any spec tree: a layer `ModuleSpec`, `TransformerBlockSubmodules` (decoder block
    specs, local or Transformer Engine), MTP block specs, or lists of these. The input is not
    modified. Raises `ValueError` if an MoE layer class it cannot take is found, or no MoE at all.
    """
    rewritten, count = rewrite_moe_layers(spec, elastic)
    if not count:
        raise ValueError("with_elastic_router: the spec has no MoE layer (is --num-experts set?)")
    return rewritten


def rewrite_moe_layers(spec: Any, elastic: ElasticMoEConfig) -> tuple[Any, int]:
    """``spec`` with its MoE layers made elastic, and how many there were. A pipeline stage's
    spec may have none (dense layers only), which `with_elastic_router` would refuse."""
    found = []
    return _rewrite(spec, elastic, found), len(found)


def map_spec(node: Any, visit) -> Any:
    """Rebuild a spec tree bottom-up: `ModuleSpec`s and `functools.partial`s (Megatron 0.19 uses
    both), submodule dataclasses and lists. `visit(node)` may return a replacement for a node whose
    children are already rebuilt, or None to keep it. The input is not modified."""
    if isinstance(node, ModuleSpec):
        rebuilt = dataclasses.replace(
            node, params=dict(node.params), submodules=map_spec(node.submodules, visit)
        )
    elif isinstance(node, functools.partial):
        keywords = {name: map_spec(value, visit) for name, value in node.keywords.items()}
        args = [map_spec(value, visit) for value in node.args]
        rebuilt = functools.partial(node.func, *args, **keywords)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: map_spec(getattr(node, f.name), visit) for f in dataclasses.fields(node) if f.init}
        rebuilt = dataclasses.replace(node, **changes)
    elif isinstance(node, (list, tuple)):
        rebuilt = type(node)(map_spec(item, visit) for item in node)
    else:
        return node
    replaced = visit(rebuilt)
    return rebuilt if replaced is None else replaced


def _rewrite(node: Any, elastic: ElasticMoEConfig, found: list) -> Any:
    """`node` with its MoE layers made elastic (appended to `found`)."""

    def visit(spec):
        if isinstance(spec, ModuleSpec):
            module = import_module(spec.module) if isinstance(spec.module, tuple) else spec.module
            if _is_moe_layer(module):
                found.append(spec)
                submodules = _elastic_submodules(spec.submodules, elastic)
                return dataclasses.replace(spec, module=ElasticMoELayer, submodules=submodules)
        if isinstance(spec, functools.partial) and _is_moe_layer(spec.func):
            found.append(spec)
            keywords = dict(spec.keywords)
            keywords["submodules"] = _elastic_submodules(keywords.get("submodules"), elastic)
            return functools.partial(ElasticMoELayer, *spec.args, **keywords)
        return None

    return map_spec(node, visit)


def _is_moe_layer(module: Any) -> bool:
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        return False
    if module not in (MoELayer, ElasticMoELayer):
        raise ValueError(
            f"with_elastic_router supports Megatron's MoELayer, not its subclass {module.__name__}"
        )
    return True


def _elastic_submodules(submodules: Any, elastic: ElasticMoEConfig) -> Any:
    """MoE submodules with the router swapped for an `ElasticRouter` carrying ``elastic``."""
    if submodules is None:
        raise ValueError("with_elastic_router: an MoE layer spec has no submodules")
    router = submodules.router
    base = router.func if isinstance(router, functools.partial) else router
    if isinstance(base, type) and issubclass(base, InferenceTopKRouter):
        raise ValueError(
            "with_elastic_router does not take InferenceTopKRouter "
            "(transformer_impl='inference_optimized'): its dispatcher caches the top-k; use the "
            "training layer spec and set_active_experts for elastic inference"
        )
    if not (isinstance(base, type) and issubclass(base, TopKRouter)):
        raise ValueError(
            f"with_elastic_router replaces Megatron's TopKRouter, not {getattr(base, '__name__', base)}"
        )
    return dataclasses.replace(submodules, router=functools.partial(ElasticRouter, elastic=elastic))
