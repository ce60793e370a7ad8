"""Console scripts (installed by `make install` / `pip install`): thin command lines over the
training, evaluation, conversion and data packages. Each `main(argv)` returns an exit status.

Importing Megatron-Core on a machine without Transformer Engine, Apex or CUDA prints a dozen
warnings (one per module that falls back), torch logs that no CUDA runtime was found, and a lone
process is told it is rank 0. A command line owns its process, so it hides exactly those notices:
a refused flag is then one line.
"""

import logging
import warnings

for _notice in (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"Only transformer-engine>=.* supports MoE experts.*",
    r"Could not determine rank from torch.distributed, RANK, or SLURM_PROCID.*",  # one process: rank 0
):
    warnings.filterwarnings("ignore", message=_notice)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
