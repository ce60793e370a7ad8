"""`make demo`: pretrain a tiny GPT-MoE with EMoE on CPU, save it, and print validation loss at
k' = 1 ... 3k from the saved checkpoint.

Two gloo processes with expert parallelism 2 (alltoall dispatcher) run Megatron's own training
loop through examples/pretrain_gpt_emoe.py. The data is the embedded default (Python standard
library code and docstrings, a BPE tokenizer trained on it), built once and cached. Settings live
in examples/configs/demo.yaml; flags given here override them.

    python examples/demo.py [--overwrite] [--nproc 2] [--run-dir runs/demo] [Megatron flags ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "demo.yaml"
ENTRY = REPO / "examples" / "pretrain_gpt_emoe.py"
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+).*?lm loss: ([0-9.E+-]+)")
VALIDATION = re.compile(r"validation loss at iteration (\d+)(?: on validation set)? \|.*?lm loss value: ([0-9.E+-]+)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo", help="checkpoints, TensorBoard and the log go here")
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes (expert parallel size divides it)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier --run-dir first")
    return parser.parse_known_args(argv)


def command(run_dir: Path, nproc: int, data: dict, extra: list[str]) -> list[str]:
    """torchrun over the training entry with the demo config, the default data and `extra` flags."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(ENTRY), "--config", str(CONFIG),
        "--train-data-path", data["pretrain_train"],
        "--valid-data-path", data["pretrain_valid"],
        "--tokenizer-model", data["tokenizer_model"],
        "--save", str(run_dir / "checkpoints"),
        "--tensorboard-dir", str(run_dir / "tensorboard"),
        *extra,
    ]


def run_with_progress(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, keeping its whole output in `log_path` and showing one line per logged step."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    start = time.time()
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if match := ITERATION.search(line):
                done, total, loss = int(match[1]), int(match[2]), float(match[3])
                elapsed = time.time() - start
                print(f"  step {done:4d}/{total} | train loss {loss:6.3f} | {elapsed:5.0f} s elapsed", flush=True)
            elif match := VALIDATION.search(line):
                print(f"  step {int(match[1]):4d} validation loss {float(match[2]):6.3f}", flush=True)
            elif "Traceback" in line or "Error" in line.split(":")[0]:
                print("  " + line.rstrip(), flush=True)
        return proc.wait()


def main(argv=None) -> int:
    from megatron_emoe.data.default_data import ensure_default_data

    options, extra = parse_args(argv)
    run_dir = (REPO / options.run_dir).resolve()
    if run_dir.exists():
        if not options.overwrite:
            sys.exit(f"{run_dir} exists: pass --overwrite to replace it, or choose another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)

    print("[1/3] embedded default data (Python stdlib code + docstrings, BPE tokenizer)", flush=True)
    data = ensure_default_data(progress=True)
    print(f"[2/3] pretraining with EMoE on {options.nproc} CPU processes (settings: {CONFIG.relative_to(REPO)})",
          flush=True)
    start = time.time()
    code = run_with_progress(command(run_dir, options.nproc, data, extra), run_dir / "train.log")
    if code != 0:
        print(f"training failed (exit {code}); see {run_dir / 'train.log'}")
        return code
    result = json.loads((run_dir / "checkpoints" / "elastic_eval.json").read_text())
    print(f"[3/3] validation loss by active experts k' (model trained with k = {result['train_topk']}, "
          f"{time.time() - start:.0f} s):")
    losses = result["val_loss"]
    print("  k'      " + "".join(f"{k:>8}" for k in losses))
    print("  loss    " + "".join(f"{v:8.3f}" for v in losses.values()))
    print(f"checkpoint: {run_dir / 'checkpoints'}  TensorBoard: {run_dir / 'tensorboard'}  "
          f"log: {run_dir / 'train.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
