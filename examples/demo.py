"""`make demo`: pretrain a tiny GPT-MoE with EMoE on CPU, save it, and print validation loss at
k' = 1 ... 3k from the saved checkpoint.

Two gloo processes with expert parallelism 2 (alltoall dispatcher) run Megatron's own training
loop through the training entry (`emoe-pretrain`), launched by the project's one recipe
(`megatron_emoe.runtime.launch`). The data is the embedded default (Python standard
library code and docstrings, a BPE tokenizer trained on it), built once and cached. Settings live
in examples/configs/demo.yaml; flags given here override them.

    python examples/demo.py [--overwrite] [--nproc 2] [--run-dir runs/demo] [Megatron flags ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import megatron_emoe.cli  # noqa: F401  (first: hides Megatron's import notices, as the console scripts do)
from megatron_emoe.data.default_data import ensure_default_data
from megatron_emoe.errors import UsageError, exits_on_usage_error
from megatron_emoe.runtime.launch import run_training_job, training_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "demo.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo", help="checkpoints, TensorBoard and the log go here")
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes (expert parallel size divides it)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier --run-dir first")
    return parser.parse_known_args(argv)


def command(run_dir: Path, nproc: int, data: dict, extra: list[str]) -> list[str]:
    """torchrun over the training entry with the demo config, the default data and `extra` flags."""
    return training_command([
        "--config", str(CONFIG),
        "--train-data-path", data["pretrain_train"],
        "--valid-data-path", data["pretrain_valid"],
        "--tokenizer-model", data["tokenizer_model"],
        "--save", str(run_dir / "checkpoints"),
        "--tensorboard-dir", str(run_dir / "tensorboard"),
        *extra,
    ], nproc)


@exits_on_usage_error("examples/demo.py")
def main(argv=None) -> int:
    options, extra = parse_args(argv)
    run_dir = (REPO / options.run_dir).resolve()
    if run_dir.exists():
        if not options.overwrite:
            raise UsageError(f"--run-dir {run_dir} exists: pass --overwrite to replace it, or choose "
                             "another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)

    print("[1/3] embedded default data (Python stdlib code + docstrings, BPE tokenizer)", flush=True)
    data = ensure_default_data(progress=True)
    print(f"[2/3] pretraining with EMoE on {options.nproc} CPU processes (settings: {CONFIG.relative_to(REPO)})",
          flush=True)
    start = time.time()
    code = run_training_job(command(run_dir, options.nproc, data, extra), run_dir / "train.log",
                            cwd=REPO, progress=lambda line: print(line, flush=True), start=start)
    if code != 0:
        print(f"training failed (exit {code}); see {run_dir / 'train.log'}")
        return code
    result = json.loads((run_dir / "checkpoints" / "elastic_eval.json").read_text())
    print(f"[3/3] validation loss by active experts k' from the saved checkpoint (iteration "
          f"{result['iteration']}, trained with k = {result['train_topk']}; the first --eval-iters "
          f"validation batches, so k' = {result['train_topk']} differs from the step losses above, "
          f"which each took the next batches; {time.time() - start:.0f} s):")
    losses = result["val_loss"]
    print("  k'      " + "".join(f"{k:>8}" for k in losses))
    print("  loss    " + "".join(f"{v:8.3f}" for v in losses.values()))
    print(f"checkpoint: {run_dir / 'checkpoints'}  TensorBoard: {run_dir / 'tensorboard'}  "
          f"log: {run_dir / 'train.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
