"""The model every app runs: Megatron's GPT model from the flags, its layer spec wrapped by
`with_elastic_router`, built on the current ranks and loaded from a checkpoint.

Training builds it through `elastic_gpt_config` inside Megatron's loop; evaluation and conversion
build and load it with `build_model` / `load` / `loaded_model` under `megatron_globals`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training import get_args
from megatron.training.argument_utils import gpt_config_from_args
from megatron.training.arguments import validate_args
from megatron.training.checkpointing import load_checkpoint
from megatron.training.global_vars import set_global_variables, unset_global_variables
from megatron.training.models.gpt import default_layer_spec

from megatron_emoe.config import ElasticMoEConfig, elastic_config_from_args
from megatron_emoe.errors import UsageError
from megatron_emoe.mla import with_local_mla
from megatron_emoe.qk_norm import with_projection_qk_norm
from megatron_emoe.runtime import cpu_loop
from megatron_emoe.runtime.arguments import parse_training_args
from megatron_emoe.runtime.checkpoints import reading_checkpoint, required_checkpoint
from megatron_emoe.runtime.saved_args import args_from_checkpoint, checkpoint_args
from megatron_emoe.spec import rewrite_moe_layers, with_elastic_router


def _elastic_default_spec(model_config, vp_stage=None, *, elastic: ElasticMoEConfig, adapt):
    """This (virtual) pipeline stage's default spec, elastic; a stage may hold no MoE layer."""
    return adapt(rewrite_moe_layers(default_layer_spec(model_config, vp_stage), elastic)[0])


def _architecture_options(args):
    """Spec changes the flags ask for beyond Megatron's default spec (identity when none)."""
    changes = []
    if getattr(args, "qk_layernorm_across_heads", False):
        if not args.qk_layernorm:
            raise UsageError("--qk-layernorm-across-heads needs --qk-layernorm")
        changes.append(with_projection_qk_norm)
    if getattr(args, "multi_latent_attention", False) and args.transformer_impl == "local":
        changes.append(functools.partial(with_local_mla, q_lora_rank=args.q_lora_rank))

    def adapt(spec):
        for change in changes:
            spec = change(spec)
        return spec

    return adapt


def elastic_gpt_config(args, elastic: ElasticMoEConfig):
    """Megatron's `GPTModelConfig` from the flags, its layer spec wrapped by `with_elastic_router`."""
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


def build_args(argv: list[str]) -> argparse.Namespace:
    """Megatron's flags for this rank from `argv`, validated by Megatron (world from the
    current process group)."""
    cpu_loop.enable()  # CPU views of torch in megatron.training (no-op with CUDA)
    args = parse_training_args(cpu_loop.with_cpu_flags(argv))
    args.world_size = torch.distributed.get_world_size()
    args.rank = torch.distributed.get_rank()
    validate_args(args, {})
    return args


@contextlib.contextmanager
def megatron_globals(args: argparse.Namespace, build_tokenizer: bool = False) -> Iterator[None]:
    """Megatron's global args/timers (and tokenizer if asked) for the body, then unset."""
    cpu_loop.enable()  # CPU views of torch in megatron.training (no-op with CUDA)
    set_global_variables(args, build_tokenizer=build_tokenizer)
    try:
        yield
    finally:
        unset_global_variables()


def build_model(args: argparse.Namespace) -> list[torch.nn.Module]:
    """The training entry's GPTModel (elastic routers, default layer spec) for these flags,
    as model chunks on the current ranks (no DDP wrapper)."""
    model_config = elastic_gpt_config(args, elastic_config_from_args(args))
    builder = model_config.get_builder_cls()(model_config)
    return builder.build_distributed_models(
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False
    )


def load(model, load_arg: str = "load") -> int:
    """Load the checkpoint in `--load` (or the folder of flag `load_arg`) into `model`, from any
    saved TP/EP layout; returns its iteration.

    A missing, partial or corrupt checkpoint is a `UsageError` naming the file: checked before
    Megatron reads it (which would start from random weights, or exit, on a bad tracker), and
    the library's error when a file turns out garbled on reading."""
    load_dir, name, flag = _checkpoint_to_load(load_arg)
    with reading_checkpoint(load_dir, name, flag):
        iteration, _ = load_checkpoint(model, None, None, load_arg=load_arg, strict=True)
    return iteration


def _checkpoint_to_load(load_arg: str) -> tuple[str, str, str]:
    """(folder, checkpoint in it, flag name) of flag `load_arg` in Megatron's global args, once
    the checkpoint there passes `required_checkpoint`."""
    args = get_args()
    load_dir, flag = getattr(args, load_arg), "--" + load_arg.replace("_", "-")
    return load_dir, required_checkpoint(load_dir, flag, step=getattr(args, "ckpt_step", None)), flag


@contextlib.contextmanager
def loaded_model(load_dir: str, tp: int = 1, ep: int = 1) -> Iterator[list[torch.nn.Module]]:
    """The checkpoint in `load_dir` as a model at TP = `tp`, EP = `ep` (on the current ranks)."""
    args = args_from_checkpoint(checkpoint_args(load_dir), load_dir, tp=tp, ep=ep)
    with megatron_globals(args):
        model = build_model(args)
        load(model)
        yield model
