"""The one helper tests use to run the training entry for real (the project's launch recipe,
`megatron_emoe.runtime.launch`), plus readers for what a run leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_emoe.runtime import launch

REPO = Path(__file__).resolve().parents[1]
# The tiny GPT-MoE of examples/configs/tiny.yaml (2 layers, 4 experts, top-2, EP 2 on 2 processes);
# flags given after it override its values.
TINY_CONFIG = REPO / "examples" / "configs" / "tiny.yaml"
TINY_MODEL = ["--config", str(TINY_CONFIG)]


def environment() -> dict[str, str]:
    return launch.launch_environment()


def training_command(flags: list[str], nproc: int = 2) -> list[str]:
    """torchrun (standalone, local) over the entry."""
    return launch.training_command(flags, nproc)


def entry_command(flags: list[str]) -> list[str]:
    """The entry alone, without torchrun: enough for input it refuses before torch.distributed
    starts, and its stderr is the entry's own."""
    return [sys.executable, "-m", launch.ENTRY_MODULE, *flags]


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
    line on stderr (returned). What was printed before the call is not counted."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err
