"""`emoe-pretrain`: the training entry (Megatron-LM's `pretrain_gpt.py` with elastic routing).

    torchrun --nproc-per-node 8 --no-python emoe-pretrain --config my.yaml [--flag value ...]
    torchrun --nproc-per-node 8 --module megatron_emoe.cli.pretrain --config my.yaml ...
"""

import sys

from megatron_emoe.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
