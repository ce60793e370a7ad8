"""Fine-tune a Hugging Face MoE model with EMoE through DeepSpeed (the `emoe-finetune-hf` entry).

  torchrun --nproc-per-node 2 examples/finetune_hf_emoe.py --model HF_DIR \
      --deepspeed-config examples/configs/ds_zero2.json --save runs/hf_emoe \
      --moe-router-mode emoe --emoe-k-ideal 4 --emoe-hr-loss-coeff 1e-8 --train-iters 100
"""

import sys

from megatron_emoe.cli.finetune_hf import main

if __name__ == "__main__":
    sys.exit(main())
