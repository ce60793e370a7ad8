"""Megatron-style CLI flags for `ElasticMoEConfig`, generated from the dataclass so they map 1:1."""

from __future__ import annotations

import argparse
import dataclasses

from megatron_emoe.config import ElasticMoEConfig


def add_elastic_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the elastic-routing flags to a (Megatron) parser; usable as `extra_args_provider`."""
    group = parser.add_argument_group(title="elastic MoE routing (megatron-emoe)")
    for f in dataclasses.fields(ElasticMoEConfig):
        meta = f.metadata
        group.add_argument(
            meta["flag"], dest=_dest(meta["flag"]), default=f.default, help=meta["help"],
            **meta["argparse"],
        )
    return parser


def elastic_config_from_args(args: argparse.Namespace, transformer_config=None) -> ElasticMoEConfig:
    """Build (and, given a `TransformerConfig`, fully validate) the config from parsed flags."""
    config = ElasticMoEConfig(
        **{f.name: getattr(args, _dest(f.metadata["flag"])) for f in dataclasses.fields(ElasticMoEConfig)}
    )
    if transformer_config is not None:
        config.validate(transformer_config)
    return config


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
