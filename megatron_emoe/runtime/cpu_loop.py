"""Megatron's training loop (`megatron.training`) on CPU: the narrow patches it needs beyond
`megatron_emoe.cpu`. Everything here is a no-op when CUDA is available."""

from __future__ import annotations

import functools
import queue
import types

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_emoe import cpu

_enabled = False


def on_cpu() -> bool:
    return not torch.cuda.is_available()


# Flags every CPU run needs: gloo, Megatron's local layers and CPU initialisation, and none of the
# fused CUDA kernels. They go before the user's flags, so the README's list is the whole story.
CPU_FLAGS = (
    "--distributed-backend", "gloo",
    "--transformer-impl", "local",
    "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--num-workers", "0",
)


def with_cpu_flags(argv: list[str]) -> list[str]:
    """`argv` with `CPU_FLAGS` in front of it when there is no CUDA device."""
    return [*CPU_FLAGS, *argv] if on_cpu() else list(argv)


def _training_torch():
    """`torch` as megatron.training sees it on CPU: on top of `megatron_emoe.cpu`'s view, the CPU
    is the one device, and CUDA housekeeping (caches, memory stats, streams) does nothing."""
    return cpu._cpu_torch(
        device_count=lambda: 1,
        set_device=lambda device: None,
        empty_cache=lambda: None,
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        memory_stats=lambda device=None: {},
        Stream=torch.cpu.Stream,
        current_stream=torch.cpu.current_stream,
        stream=torch.cpu.stream,
        # validate_args asks TP > 1 runs before Blackwell (major 10) for CUDA_DEVICE_MAX_CONNECTIONS=1;
        # the CPU has no CUDA connections to limit, so it reports itself past that.
        get_device_properties=lambda device=None: types.SimpleNamespace(name="cpu", major=10, minor=0),
    )


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """`clip_grad_by_total_norm_fp32` for CPU grads (Megatron's asserts 'torch.cuda.FloatTensor'):
    scale every grad in place by max_norm / total_norm when that is below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    name = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, name) for p in parameters if getattr(p, name, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        torch._foreach_mul_(grads, clip_coeff.clamp_max(1.0))
    elif clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _keeping_rng_state(build):
    """`build` run without moving the CPU generator. A DataLoader draws its base seed from the
    default generator; on CPU that is also the model's (dropout, EMoE sampling), and a resumed
    run builds its loaders after restoring the checkpoint's RNG state, an uninterrupted one before."""

    @functools.wraps(build)
    def run(*args, **kwargs):
        state = torch.get_rng_state()
        try:
            return build(*args, **kwargs)
        finally:
            torch.set_rng_state(state)

    return run


def keep_save_results_in_process() -> None:
    """Synchronous `torch_dist` saves on CPU collect their writer threads' results in a plain
    in-process queue. Megatron's default is a multiprocessing Manager queue, there for
    `--async-save`'s writer process; its server is spawned, re-imports the entry, and costs each
    rank about 4 s at its first save. Call it only without `--async-save`."""
    if on_cpu() and filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def enable() -> None:
    """Patch the training loop's CUDA assumptions on CPU; safe to call twice."""
    global _enabled
    if _enabled or not on_cpu():
        return
    cpu.enable()
    from megatron.core import rerun_state_machine, timers
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.training import checkpointing, initialize, training
    from megatron.training.models import dist_utils
    from megatron.training.utils import common_utils

    training_torch = _training_torch()
    # initialize_megatron asserts CUDA, and skips model-parallel groups and the RNG tracker's
    # seeding when there is no CUDA device; training.py makes its counters with device='cuda';
    # checkpointing saves and restores the CUDA generator (the CPU one here, as in cpu.enable());
    # timers synchronise the device before reading the clock; DDP wrapping runs on a side stream;
    # DDP's grad buffers and the optimizer's norms and loss scale live on the current device; the
    # rerun state machine saves the CUDA generator and the schedules count tokens on the device.
    for module in (
        initialize, training, checkpointing, timers, dist_utils,
        distributed_data_parallel, param_and_grad_buffer, clip_grads, optimizer,
        rerun_state_machine, schedules, common_utils,
    ):
        module.torch = training_torch
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    training.build_train_valid_test_data_iterators = _keeping_rng_state(
        training.build_train_valid_test_data_iterators
    )
    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True
    )
    # set_jit_fusion_options warms up the fused CUDA kernels, which the CPU flags leave off.
    training.set_jit_fusion_options = lambda tp_size=1: None
    _enabled = True
