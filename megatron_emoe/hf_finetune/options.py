"""`emoe-finetune-hf` flags, read into a typed `FinetuneOptions` and checked before anything is
built: files, sizes, the DeepSpeed config, expert parallelism and the elastic config against the
model's config.json (the same rules as `elasticize` applies)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

from transformers import AutoConfig

from megatron_emoe.config import ElasticMoEConfig, add_elastic_moe_args, elastic_config_from_args
from megatron_emoe.data.default_data import data_paths, default_output_dir
from megatron_emoe.errors import ArgumentParser, UsageError
from megatron_emoe.hf.gate_styles import style_of
from megatron_emoe.hf.moe_view import moe_layer_pattern, moe_view


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Everything one fine-tuning run needs, checked."""

    model: str  # a transformers model folder
    train_data: str  # JSONL conversations
    tokenizer: str  # a tokenizer folder with the chat template's special tokens
    deepspeed_config: dict
    save: str
    elastic: ElasticMoEConfig
    train_iters: int
    seq_length: int
    lr: float
    seed: int
    save_interval: int
    ep_size: int  # DeepSpeed-MoE expert parallelism; 0 keeps the transformers experts
    load: Optional[str]  # a DeepSpeed checkpoint folder to resume from (default: --save's)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="emoe-finetune-hf", description=__doc__)
    parser.add_argument("--model", required=True,
                        help="transformers MoE model folder (config.json + weights)")
    parser.add_argument("--data-dir", default=None,
                        help="the default data folder (emoe-build-default-data); its raw SFT split "
                             "and tokenizer are used unless --train-data/--tokenizer are given")
    parser.add_argument("--train-data", default=None, help="JSONL conversations")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder")
    parser.add_argument("--deepspeed-config", required=True, help="DeepSpeed JSON config (ZeRO stage, batch)")
    parser.add_argument("--save", required=True,
                        help="folder for DeepSpeed checkpoints and the final model (save/hf)")
    parser.add_argument("--load", default=None, help="resume from this DeepSpeed checkpoint folder")
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--save-interval", type=int, default=0,
                        help="checkpoint every N steps (0: at the end only)")
    parser.add_argument("--expert-parallel-size", dest="ep_size", type=int, default=0,
                        help="run the routed experts in deepspeed.moe layers with this EP size (ZeRO-1/2)")
    add_elastic_moe_args(parser)
    return parser


def parse_options(argv) -> FinetuneOptions:
    """Parse and check `argv`; a `UsageError` names the flag and what is allowed."""
    args = build_parser().parse_args(argv)
    data = data_paths(args.data_dir or default_output_dir())
    train_data = args.train_data or os.path.join(data["output_dir"], "raw", "sft_train.jsonl")
    tokenizer = args.tokenizer or data["tokenizer_model"]
    for flag, path in (("--train-data", train_data),):
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: no file {path} (build the default data with emoe-build-default-data)")
    for flag, path in (("--model", args.model), ("--tokenizer", tokenizer)):
        if not os.path.isdir(path):
            raise UsageError(f"{flag}: no folder {path}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model: {args.model} has no config.json")
    for flag, value in (("--train-iters", args.train_iters), ("--seq-length", args.seq_length)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.lr <= 0 or args.save_interval < 0 or args.ep_size < 0:
        raise UsageError("--lr must be > 0, --save-interval and --expert-parallel-size >= 0")
    ds_config = _deepspeed_config(args.deepspeed_config, args.ep_size)
    elastic = elastic_config_from_args(args)
    _check_against_model(args.model, elastic, args.ep_size)
    if args.load is not None and not os.path.isfile(os.path.join(args.load, "latest")):
        raise UsageError(f"--load: {args.load} holds no DeepSpeed checkpoint (no 'latest' file)")
    return FinetuneOptions(args.model, train_data, tokenizer, ds_config, args.save, elastic,
                           args.train_iters, args.seq_length, args.lr, args.seed,
                           args.save_interval, args.ep_size, args.load)


def _deepspeed_config(path: str, ep_size: int) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--deepspeed-config: cannot read {path}: {error}") from None
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if ep_size and stage == 3:
        raise UsageError("--expert-parallel-size with ZeRO stage 3: DeepSpeed's ZeRO-3 refuses its "
                         "MoE layers; use a ZeRO-1/2 config (examples/configs/ds_zero2.json)")
    if "optimizer" in config:
        raise UsageError("--deepspeed-config: leave 'optimizer' out (the run uses torch AdamW with "
                         "--lr; DeepSpeed's fused optimizers need its compiled ops)")
    return config


def _check_against_model(folder: str, elastic: ElasticMoEConfig, ep_size: int) -> None:
    config = AutoConfig.from_pretrained(folder)
    style = style_of(config)
    pattern = moe_layer_pattern(config)
    elastic.validate(moe_view(style, len(pattern), [i + 1 for i, moe in enumerate(pattern) if moe]))
    if ep_size and style.num_experts % ep_size:
        raise UsageError(f"--expert-parallel-size must divide the {style.num_experts} experts, got {ep_size}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ep_size and world % ep_size:
        raise UsageError(f"--expert-parallel-size {ep_size} must divide the {world} processes")
