"""`with_elastic_router`: rewrite any Megatron layer/block spec so its MoE layers route elastically."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
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
    found = []
    rewritten = _rewrite(spec, elastic, found)
    if not found:
        raise ValueError("with_elastic_router: the spec has no MoE layer (is --num-experts set?)")
    return rewritten


def _rewrite(node: Any, elastic: ElasticMoEConfig, found: list) -> Any:
    """Rebuild a spec tree: `ModuleSpec`s and `functools.partial`s (Megatron 0.19 uses both),
    submodule dataclasses and lists; the MoE layers among them become elastic."""
    if isinstance(node, ModuleSpec):
        module = import_module(node.module) if isinstance(node.module, tuple) else node.module
        if _is_moe_layer(module):
            found.append(node)
            submodules = _elastic_submodules(node.submodules, elastic)
            return dataclasses.replace(
                node, module=ElasticMoELayer, params=dict(node.params), submodules=submodules
            )
        submodules = _rewrite(node.submodules, elastic, found)
        return dataclasses.replace(node, params=dict(node.params), submodules=submodules)
    if isinstance(node, functools.partial):
        keywords = {name: _rewrite(value, elastic, found) for name, value in node.keywords.items()}
        args = [_rewrite(value, elastic, found) for value in node.args]
        if _is_moe_layer(node.func):
            found.append(node)
            keywords["submodules"] = _elastic_submodules(node.keywords.get("submodules"), elastic)
            return functools.partial(ElasticMoELayer, *args, **keywords)
        return functools.partial(node.func, *args, **keywords)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {
            f.name: _rewrite(getattr(node, f.name), elastic, found)
            for f in dataclasses.fields(node)
            if f.init
        }
        return dataclasses.replace(node, **changes)
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(item, elastic, found) for item in node)
    return node


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
    if not (isinstance(base, type) and issubclass(base, TopKRouter)):
        raise ValueError(
            f"with_elastic_router replaces Megatron's TopKRouter, not {getattr(base, '__name__', base)}"
        )
    return dataclasses.replace(submodules, router=functools.partial(ElasticRouter, elastic=elastic))
