"""Fixtures shared by the test modules, so that the suite builds the small default data once and
trains its tiny EMoE checkpoint once per session instead of once per module."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from megatron_emoe.data.default_data import ensure_default_data
from tests.training_runs import TINY_MODEL, run_training

CHECKPOINT_ITERS = 4
_VALIDATION = re.compile(rf"validation loss at iteration {CHECKPOINT_ITERS} \|.*?lm loss value: ([0-9.E+-]+)")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict:
    """The embedded default data as `make demo` builds it, but small: 300 kB of stdlib text and a
    512-token BPE tokenizer (paths of the pretraining and SFT splits and of the tokenizer)."""
    return ensure_default_data(tmp_path_factory.mktemp("data") / "default",
                               corpus_bytes=300_000, vocab_size=512)


def data_flags(data: dict, kind: str = "pretrain") -> list[str]:
    """The training entry's data flags for `small_data` (kind: "pretrain" or "sft")."""
    return ["--train-data-path", data[f"{kind}_train"], "--valid-data-path", data[f"{kind}_valid"],
            "--tokenizer-model", data["tokenizer_model"]]


@dataclasses.dataclass(frozen=True)
class TrainedCheckpoint:
    """A checkpoint the real training entry saved, with what its run printed."""

    path: Path  # the --save folder (tracker + iter_0000004)
    data: dict  # `small_data`
    flags: list[str]  # the training run's flags
    log: str  # its output
    validation_loss: float  # the training loop's evaluation at the last step


@pytest.fixture(scope="session")
def emoe_checkpoint(small_data, tmp_path_factory) -> TrainedCheckpoint:
    """A tiny EMoE checkpoint (tiny.yaml: 2 MoE layers, 4 experts, k = 2 of k_ideal = 3, EP = 2 on
    2 gloo ranks) after 4 steps, evaluated by the training loop once, at its last step, on the
    first 2 validation batches. Shared by the whole session: tests copy it before changing it."""
    root = tmp_path_factory.mktemp("emoe_checkpoint")
    flags = [*TINY_MODEL, *data_flags(small_data), "--eval-interval", str(CHECKPOINT_ITERS),
             "--eval-iters", "2", "--train-iters", str(CHECKPOINT_ITERS),
             "--save", str(root / "ckpt"), "--save-interval", str(CHECKPOINT_ITERS),
             "--moe-router-mode", "emoe", "--emoe-k-ideal", "3"]
    code, out = run_training(flags, root / "train.log")
    assert code == 0, out[-3000:]
    validation = [float(m) for m in _VALIDATION.findall(out)]
    assert validation, "the training loop logged no validation loss"
    return TrainedCheckpoint(root / "ckpt", small_data, flags, out, validation[0])
