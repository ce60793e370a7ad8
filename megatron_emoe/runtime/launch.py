"""Launching: the training entry under torchrun, and functions in N local gloo processes.

- `training_command(argv, nproc)` and `launch_environment()` are the one recipe (torchrun command
  and environment) by which the demo, the tests and the benchmarks start the training entry;
  `run_training_job` runs it with one progress line per logged step.
- `run_ranks(fn, world_size, backend=...)` / `run_gloo(fn, world_size=2, ep=2)` spawn
  `world_size` local processes (file-store rendezvous, gloo on loopback, or NCCL with one GPU per
  rank) and in each initialise the process group, `megatron_emoe.cpu.enable()` on gloo, Megatron's
  parallel groups and seeds, then call `fn(rank, *args, **kwargs)`; the evaluation and conversion
  apps, the benchmarks and the tests use them. A failure in any rank is raised in the caller with that rank's
  traceback. `fn` must be a top-level (picklable) function. With world_size=1 it runs in the
  calling process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

from megatron_emoe import cpu
from megatron_emoe.errors import UsageError

SEED = 1234
ENTRY_MODULE = "megatron_emoe.cli.pretrain"
# What Megatron's training loop logs: a training step and an evaluation.
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+).*?lm loss: ([0-9.E+-]+)")
VALIDATION = re.compile(
    r"validation loss at iteration (\d+)(?: on validation set)? \|.*?lm loss value: ([0-9.E+-]+)"
)


def launch_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local training job: `base` (default: this process's) plus no
    torch.compile on CPU (Megatron compiles a few router helpers), gloo on loopback, one OpenMP
    thread per rank, and no Python warnings."""
    return dict(os.environ if base is None else base, TORCHDYNAMO_DISABLE="1", GLOO_SOCKET_IFNAME="lo",
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def training_command(argv: Sequence[str], nproc: int = 1) -> list[str]:
    """The training entry with `argv` on `nproc` local processes under torchrun (standalone
    rendezvous on a free port), which sets the environment torch.distributed starts from."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--module", ENTRY_MODULE, *argv]


def run_training_job(command: Sequence[str], log_path: str | os.PathLike, cwd=None,
                     progress: Callable[[str], None] | None = print, start: float | None = None) -> int:
    """Run a training `command`, keeping its whole output in `log_path`; with `progress`, report
    one line per logged step and evaluation, and the first lines of any error. Returns the exit
    status."""
    start = time.time() if start is None else start
    with open(log_path, "w") as log, subprocess.Popen(
        list(command), cwd=cwd, env=launch_environment(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if progress is None:
                continue
            if match := ITERATION.search(line):
                done, total, loss = int(match[1]), int(match[2]), float(match[3])
                progress(f"  step {done:4d}/{total} | train loss {loss:6.3f} | "
                         f"{time.time() - start:5.0f} s elapsed")
            elif match := VALIDATION.search(line):
                progress(f"  step {int(match[1]):4d} validation loss {float(match[2]):6.3f} "
                         "(the next --eval-iters batches of the validation stream)")
            elif "Traceback" in line or "Error" in line.split(":")[0] or ": error: " in line:
                progress("  " + line.rstrip())
        return proc.wait()


@contextlib.contextmanager
def megatron_session(
    rank, world_size, store_dir, *, tp=1, ep=1, pp=1, vpp=None, cp=1, timeout=120, backend="gloo"
):
    """This process as rank `rank` of a local world (file store in `store_dir`) with Megatron's
    parallel groups and seeds set up; all torn down on exit. `backend="gloo"` (CPU or GPU, with
    the CPU shim) or "nccl" (rank `rank` on GPU `rank`, for the GPU tests)."""
    nccl = backend == "nccl"
    if nccl:
        torch.cuda.set_device(rank)
    # A file store opens no listening socket, and gloo is pinned to loopback, so nothing here
    # is reachable from outside this machine (a TCP store would listen on every interface).
    with mock.patch.dict(os.environ, {"GLOO_SOCKET_IFNAME": "lo"}):
        dist.init_process_group(
            backend,
            store=dist.FileStore(os.path.join(store_dir, "store"), world_size),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
            **({"device_id": torch.device("cuda", rank)} if nccl else {}),
        )
    try:
        if not nccl:
            cpu.enable()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=cp,
        )
        torch.manual_seed(SEED)  # as megatron.training does before seeding the tracker
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        yield
    finally:
        # Routers record into a global tracker sized and grouped by the first model: reset it
        # so a later in-process run with other layers or groups starts clean.
        destroy_moe_metrics_tracker()
        if nccl:  # HybridEP keeps a process-wide buffer bound to these groups
            from megatron.core.transformer.moe import fused_a2a

            if getattr(fused_a2a, "reset_hybrid_ep_buffer", None) is not None:
                fused_a2a.reset_hybrid_ep_buffer()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _run(rank, world_size, store_dir, fn, args, kwargs, parallel, timeout):
    """Body of one rank: set up gloo and Megatron, run `fn`, always tear down."""
    with megatron_session(rank, world_size, store_dir, timeout=timeout, **parallel):
        return fn(rank, *args, **kwargs)


def local_backend(world_size: int, cuda_devices: int) -> str:
    """The backend for `world_size` local ranks (the tools' `--nproc`) on a node with
    `cuda_devices` GPUs: NCCL with GPU r for rank r, or gloo on the CPU without GPUs. Sharing
    GPUs is refused (ranks would pile on GPU 0)."""
    if cuda_devices == 0:
        return "gloo"
    if cuda_devices < world_size:
        raise UsageError(
            f"--nproc {world_size} needs one GPU per rank; this node has {cuda_devices}"
        )
    return "nccl"


def run_ranks(fn, world_size=1, *, backend="gloo", tp=1, ep=1, pp=1, vpp=None, cp=1, args=(),
              kwargs=None, timeout=120):
    """Run `fn(rank, *args, **kwargs)` on `world_size` local ranks over `backend` ("nccl": rank
    r on GPU r; see `local_backend`), `vpp` virtual pipeline stages per rank; raise if any rank
    fails."""
    parallel = {"tp": tp, "ep": ep, "pp": pp, "vpp": vpp, "cp": cp, "backend": backend}
    with tempfile.TemporaryDirectory(prefix="megatron-emoe-gloo-") as store_dir:
        run_args = (world_size, store_dir, fn, tuple(args), dict(kwargs or {}), parallel, timeout)
        if world_size == 1:
            _run(0, *run_args)
        else:
            spawn_ranks(_run, run_args, world_size, fn.__name__, timeout)


def run_gloo(fn, world_size=2, *, tp=1, ep=1, pp=1, vpp=None, cp=1, args=(), kwargs=None,
             timeout=120):
    """`run_ranks` over gloo on the CPU (tests, benchmarks, the CPU shim)."""
    run_ranks(fn, world_size, backend="gloo", tp=tp, ep=ep, pp=pp, vpp=vpp, cp=cp, args=args,
              kwargs=kwargs, timeout=timeout)


def spawn_ranks(body, run_args, world_size, name, timeout, start_method="spawn"):
    """Run `body(rank, *run_args)` in `world_size` processes; raise the first failing rank's
    traceback, or `TimeoutError` after `timeout` s; never leave a process behind."""
    context = mp.start_processes(body, args=run_args, nprocs=world_size, join=False,
                                 start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        # join() raises ProcessRaisedException, with the rank's traceback, as soon as a rank fails.
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
