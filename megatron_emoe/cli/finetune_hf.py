"""Fine-tune a transformers MoE model with elastic routing (EMoE, M-MoE, Top-k + L_HR) through
DeepSpeed, on the project's SFT data (loss on responses only). Run it under torchrun:

  torchrun --nproc-per-node 2 --no-python emoe-finetune-hf --model HF_DIR \
      --deepspeed-config examples/configs/ds_zero2.json --save OUT --moe-router-mode emoe \
      [--expert-parallel-size 2] [--train-iters N] [--load CKPT]

Bad flags or files: one line on stderr, exit status 2, before any model is built.
"""

from __future__ import annotations

import sys

from megatron_emoe.errors import exits_on_usage_error
from megatron_emoe.hf_finetune.loop import run
from megatron_emoe.hf_finetune.options import parse_options


@exits_on_usage_error("emoe-finetune-hf")
def main(argv=None) -> int:
    run(parse_options(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
