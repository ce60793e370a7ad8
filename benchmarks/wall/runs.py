"""The scaling-wall grid as runs: one (setting, mode, seed) each, with its command, its folder and
its result file, and the job pool that runs the unfinished ones.

A run's folder is `<work-dir>/<setting>/<mode>/seed<seed>/`; `result.json` is written (atomically)
only when the run has trained and been evaluated, so a rerun of the benchmark skips exactly the
finished runs and redoes any that stopped half-way. Setting (b) starts from the Top-k checkpoint
of (a) with the same seed, which is kept (every other checkpoint is deleted once evaluated).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_emoe.files import write_text_atomically
from megatron_emoe.runtime import launch

CONSUMED = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+)")
STEP_TIME = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
ERROR_LINE = re.compile(r"(^|\s)\w*(Error|Exception|error): ")
BASE = "base"  # (b)'s evaluation of the pretrained Top-k model itself


@dataclass
class Run:
    """One run of the grid."""

    setting: str  # "a" or "b"
    mode: str  # a mode name, or BASE
    seed: int
    dir: Path
    kind: str  # "train", or "eval" (evaluation only)
    iterations: int = 0
    flags: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    after: tuple[str, ...] = ()  # names of the runs this one needs first
    keep_checkpoints: bool = False

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.mode}/seed{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def eval_json(self) -> Path:
        return self.dir / "elastic_eval.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def coactivation(self) -> Path:
        return self.dir / "coactivation"

    @property
    def log(self) -> Path:
        return self.dir / "train.log"

    def finished(self) -> Optional[dict]:
        """The stored result, if this run finished with the same command; None if not run yet.
        Raises StaleResult when the folder holds a result of other flags."""
        if not self.result_path.is_file():
            return None
        stored = json.loads(self.result_path.read_text())
        if stored.get("command") != shlex.join(self.command):
            raise StaleResult(f"--work-dir: {self.result_path} was made with other flags than "
                              "this run's: choose another --work-dir, or --overwrite to start the "
                              "grid anew")
        return stored


def read_log(path: Path) -> dict:
    """Training losses per logged step, consumed samples, Megatron's last validation loss and the
    training time (mean logged step time x steps)."""
    text = path.read_text(errors="replace")
    losses = {int(m[1]): float(m[3]) for m in launch.ITERATION.finditer(text)}
    consumed = [(int(m[1]), int(m[2])) for m in CONSUMED.finditer(text)]
    validation = [float(m[2]) for m in launch.VALIDATION.finditer(text)]
    steps = [float(m[1]) for m in STEP_TIME.finditer(text)]
    iterations = consumed[-1][0] if consumed else 0
    return {"train_loss": {str(i): v for i, v in losses.items()},
            "consumed_samples": consumed[-1][1] if consumed else 0,
            "megatron_validation_loss": validation[-1] if validation else None,
            "train_time_s": statistics.fmean(steps) * iterations / 1000 if steps else 0.0}


def error_lines(log: Path, keep: int = 3) -> list[str]:
    """The last distinct error messages of a failed run's log (the ranks' own, not torchrun's)."""
    found: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if ERROR_LINE.search(line) and "ChildFailedError" not in line and line not in found:
            found.append(line)
    return found[-keep:]


def coactivation_distance(run: Run) -> Optional[dict[str, Optional[float]]]:
    """k' -> mean over layers of the train-vs-eval co-activation distance (None without it)."""
    table = run.coactivation / "coactivation_distance.json"
    if not table.is_file():
        return None
    return json.loads(table.read_text())["mean_over_layers"]


class RunFailed(Exception):
    """A run exited with an error or wrote no evaluation."""


class StaleResult(Exception):
    """A run folder holds the result of another command."""


def execute(run: Run, seq_length: int, say: Callable[[str], None]) -> dict:
    """Run one command (its folder made anew), write and return its result."""
    if run.dir.exists():
        shutil.rmtree(run.dir)  # a run that stopped half-way starts again
    run.dir.mkdir(parents=True)
    start = time.time()
    code = launch.run_training_job(run.command, run.log, cwd=launch_cwd(), progress=None)
    wall = time.time() - start
    if code != 0 or not run.eval_json.is_file():
        lines = "\n".join("    " + line for line in error_lines(run.log))
        raise RunFailed(f"run {run.name} failed (exit {code}) after {wall:.0f} s; see {run.log}"
                        + (f"\n{lines}" if lines else ""))
    evaluation = json.loads(run.eval_json.read_text())
    logged = read_log(run.log)
    result = {
        "setting": run.setting, "mode": run.mode, "seed": run.seed, "kind": run.kind,
        "val_loss": evaluation["val_loss"], "eval_tokens": evaluation["eval_tokens"],
        "router_mode": evaluation["router_mode"], "train_topk": evaluation["train_topk"],
        "iterations": run.iterations, "tokens_trained": logged["consumed_samples"] * seq_length,
        "wall_s": round(wall, 1), **logged,
        "coactivation_distance": coactivation_distance(run),
        "command": shlex.join(run.command),
    }
    if run.kind == "train" and not run.keep_checkpoints and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)
    write_text_atomically(str(run.result_path), json.dumps(result, indent=1) + "\n")
    losses = " ".join(f"{float(v):.4f}" for v in evaluation["val_loss"].values())
    say(f"[done] {run.name} in {wall:.0f} s; loss at k' = 1 ...: {losses}")
    return result


def launch_cwd() -> Path:
    return Path(__file__).resolve().parents[2]


def run_pool(runs: list[Run], jobs: int, seq_length: int) -> dict[str, dict]:
    """Run every unfinished run, `jobs` at a time, each after the runs it needs; return all
    results by run name. After a failure no new run starts; the others finish, then it stops."""
    results = {run.name: stored for run in runs if (stored := run.finished()) is not None}
    pending = [run for run in runs if run.name not in results]
    lock = threading.Lock()
    start = time.time()

    def say(line: str) -> None:
        with lock:
            print(f"{line}  [{(time.time() - start) / 60:.1f} min]", flush=True)

    print(f"{len(runs)} runs: {len(results)} finished before, {len(pending)} to run, "
          f"{jobs} at a time", flush=True)
    failures: list[str] = []
    total = len(pending)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        active = {}
        while pending or active:
            for run in list(pending):
                if failures or len(active) >= jobs:
                    break
                if all(name in results for name in run.after):
                    pending.remove(run)
                    say(f"[start {total - len(pending)}/{total}] {run.name} "
                        f"({run.iterations} steps)" if run.kind == "train"
                        else f"[start {total - len(pending)}/{total}] {run.name} (evaluation)")
                    active[pool.submit(execute, run, seq_length, say)] = run
            if not active:
                break
            finished, _ = wait(active, return_when=FIRST_COMPLETED)
            for future in finished:
                run = active.pop(future)
                try:
                    results[run.name] = future.result()
                except RunFailed as error:
                    failures.append(str(error))
                    say(str(error))
    if failures:
        raise SystemExit("\n".join(failures))
    if pending:
        raise SystemExit("runs left waiting for runs that did not finish: "
                         + ", ".join(run.name for run in pending))
    return results
