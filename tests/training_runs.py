"""The one helper tests use to run the training entry for real: torchrun over
examples/pretrain_gpt_emoe.py with N gloo processes, plus readers for what a run leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "examples" / "pretrain_gpt_emoe.py"

# A tiny GPT-MoE: 2 layers, 4 experts of which 2 are active, expert parallel 2 on 2 processes.
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--disable-bias-linear",
    "--num-experts", "4", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2",
    "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "2",
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
    "--lr-warmup-iters", "0", "--clip-grad", "1.0", "--seed", "1234",
    "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1",
    "--tokenizer-type", "HuggingFaceTokenizer",
]


def environment() -> dict[str, str]:
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


def training_command(flags: list[str], nproc: int = 2) -> list[str]:
    """torchrun (standalone, local) over the entry, or the entry alone for one process."""
    if nproc == 1:
        return [sys.executable, str(ENTRY), *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(ENTRY), *flags]


def run_training(flags: list[str], log: Path, nproc: int = 2, timeout: int = 400):
    """Run the entry to the end; returns (exit code, output). The output is also kept in `log`."""
    proc = subprocess.run(training_command(flags, nproc), cwd=REPO, env=environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    log.write_text(proc.stdout)
    return proc.returncode, proc.stdout


def scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    """Step -> value of one TensorBoard scalar (float32, as logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def tags(tensorboard_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Tags()["scalars"]


def console_script(name: str) -> str:
    """An installed console script (`make install` puts them next to this interpreter)."""
    return str(Path(sys.executable).with_name(name))


def usage_error(main, argv, capsys) -> str:
    """Call a console script's `main(argv)`, which must refuse the input: exit status 2 and one
    line on stderr (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err
