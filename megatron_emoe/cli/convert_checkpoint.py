"""Convert MoE checkpoints between Hugging Face folders and Megatron `torch_dist` checkpoints.

  hf-to-megatron --hf-path DIR --output DIR [--target-tensor-parallel-size N]
                 [--target-expert-parallel-size N] [--overwrite]
  megatron-to-hf --load DIR --output DIR [--num-experts-per-tok K] [--hf-config DIR]
                 [--max-shard-size-mb MB] [--overwrite]

Families: Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2/V3 (see docs in README).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


from megatron_emoe.conversion.convert import (
    HFToMegatron,
    MegatronToHF,
    hf_to_megatron,
    megatron_to_hf,
)
from megatron_emoe.errors import ArgumentParser, exits_on_usage_error


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    to_megatron = commands.add_parser("hf-to-megatron", help="Hugging Face folder -> Megatron checkpoint")
    to_megatron.add_argument("--hf-path", required=True, help="HF model folder (config.json + safetensors)")
    to_megatron.add_argument("--output", required=True, help="Megatron checkpoint folder to create")
    to_megatron.add_argument("--target-tensor-parallel-size", type=int, default=1,
                             help="TP size the checkpoint is written at (any layout loads it later)")
    to_megatron.add_argument("--target-expert-parallel-size", type=int, default=1,
                             help="EP size the checkpoint is written at (any layout loads it later)")
    to_megatron.add_argument("--overwrite", action="store_true",
                             help="Replace a non-empty --output (only once the new one is complete)")

    to_hf = commands.add_parser("megatron-to-hf", help="Megatron checkpoint -> Hugging Face folder")
    to_hf.add_argument("--load", required=True, help="Megatron checkpoint folder (any TP/EP layout)")
    to_hf.add_argument("--output", required=True, help="HF folder to create")
    to_hf.add_argument("--num-experts-per-tok", type=int, default=None,
                       help="Serving budget k' written to config.json (default: the config's)")
    to_hf.add_argument("--hf-config", default=None,
                       help="HF folder with the base model's config/tokenizer (default: <load>/hf)")
    to_hf.add_argument("--max-shard-size-mb", type=int, default=5000, help="Largest safetensors shard")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="Replace a non-empty --output (only once the new one is complete)")
    return parser


@exits_on_usage_error("emoe-convert-checkpoint")
def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    settings_class, run = {
        "hf-to-megatron": (HFToMegatron, hf_to_megatron),
        "megatron-to-hf": (MegatronToHF, megatron_to_hf),
    }[command]
    settings = settings_class(**{f.name: args[f.name] for f in dataclasses.fields(settings_class)})
    run(settings)
    print(f"wrote {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
