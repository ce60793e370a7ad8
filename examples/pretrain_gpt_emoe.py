"""Pretrain or instruction-tune a GPT-MoE with elastic routing: Megatron-LM's `pretrain_gpt.py`
flags plus ours (`--moe-router-mode`, `--emoe-*`, `--mmoe-*`, `--sft-packed`, `--config FILE`).

    torchrun --nproc-per-node 8 examples/pretrain_gpt_emoe.py --config my.yaml [--flag value ...]

The same entry is installed as the console script `emoe-pretrain`
(`torchrun --nproc-per-node 8 --no-python emoe-pretrain ...`).
"""

import sys

from megatron_emoe.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
