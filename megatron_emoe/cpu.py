"""Run Megatron-Core's MoE stack on CPU tensors with the gloo backend (tests and CPU-only machines).

`enable()` patches, only when CUDA is unavailable, the places where Megatron-Core 0.19 assumes a GPU
(see /work/shared/notes/megatron-on-cpu.md). It never fakes `torch.cuda.is_available()`: most patches
swap the name `torch` inside a few Megatron modules for a view of torch whose `torch.cuda` treats the
CPU as the current device and the CPU default generator as the "CUDA" generator.
"""

import functools
import logging
import types

import torch

_enabled = False

# Tensor factories that Megatron calls with device="cuda".
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full")


def device() -> torch.device:
    """The device the project should put tensors on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _View(types.ModuleType):
    """Module `base` with a few attributes overridden; every other attribute is `base`'s own."""

    def __init__(self, base: types.ModuleType, **overrides):
        super().__init__(base.__name__, base.__doc__)
        self.__dict__.update(overrides, _base=base)

    def __getattr__(self, name):
        return getattr(self.__dict__["_base"], name)


def _on_cpu(factory):
    """A tensor factory that builds on the CPU what it is asked to build on a CUDA device."""

    @functools.wraps(factory)
    def build(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return build


def _cpu_torch(**cuda_overrides) -> _View:
    """`torch` as the patched Megatron modules see it: `torch.cuda` means the CPU, and tensors
    asked for with `device="cuda"` are made on the CPU."""
    cuda = _View(
        torch.cuda,
        current_device=lambda: torch.device("cpu"),  # `device=torch.cuda.current_device()`
        synchronize=lambda device=None: None,  # nothing to wait for on CPU
        get_rng_state=lambda device="cuda": torch.get_rng_state(),  # CudaRNGStatesTracker.add
        manual_seed=torch.manual_seed,  # model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add
        **cuda_overrides,
    )
    factories = {name: _on_cpu(getattr(torch, name)) for name in _FACTORIES}
    return _View(torch, cuda=cuda, **factories)


def _default_causal_mask(sq: int) -> torch.Tensor:
    """`get_default_causal_mask` on CPU: True above the diagonal (masked)."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
    """`_maybe_dtoh_and_synchronize` without CUDA streams: split sizes become numpy, as on GPU."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            splits = getattr(self, name)
            if torch.is_tensor(splits):
                setattr(self, name, splits.numpy())
    return tokens_per_expert


def _tensors_stay_on_cpu(method):
    """`method` run with `Tensor.cuda()` returning the tensor itself (CPU has no other device)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return run


class _SameGeneratorFilter(logging.Filter):
    """On CPU the tracked "CUDA" generator is the CPU one, so `fork()`'s CPU-state warning is moot."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable() -> None:
    """Make Megatron-Core's MoE path run on CPU with gloo; a no-op with CUDA, safe to call twice."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return

    from megatron.core import utils
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import layers, mappings, random
    from megatron.core.transformer import multi_token_prediction
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import router, token_dispatcher

    cpu_torch = _cpu_torch()
    # Router.gating and TopKRouter buffers use torch.cuda.current_device().
    router.torch = cpu_torch
    # _gather/_reduce_scatter allocate on torch.cuda.current_device() for groups of > 1 rank.
    mappings.torch = cpu_torch
    # GlobalMemoryBuffer.get_tensor (gathers with use_global_buffer) allocates there too.
    utils.torch = cpu_torch
    # RotaryEmbedding moves inv_freq to torch.cuda.current_device() on every forward.
    rotary_pos_embedding.torch = cpu_torch
    # YarnRotaryEmbedding (MLA's YaRN) allocates its frequencies there too.
    yarn_rotary_pos_embedding.torch = cpu_torch
    # Pipeline send/recv buffers and their shape exchange live on torch.cuda.current_device().
    p2p_communication.torch = cpu_torch
    # Tied embeddings under pipeline parallelism: the first and last stages' copies are moved
    # with `.cuda()` before they are all-reduced to agree.
    language_module.LanguageModule.setup_embeddings_and_output_layer = _tensors_stay_on_cpu(
        language_module.LanguageModule.setup_embeddings_and_output_layer
    )
    # MTP's loss bookkeeping allocates on torch.cuda.current_device().
    multi_token_prediction.torch = cpu_torch
    # Parallel linears allocate weights on torch.cuda.current_device() (use_cpu_initialization=False).
    layers.torch = cpu_torch
    # FileSystemWriterAsync calls torch.cuda.synchronize() before writing.
    filesystem_async.torch = cpu_torch
    # save_state_dict_async_finalize all-reduces a failure flag made on torch.cuda.current_device().
    state_dict_saver.torch = cpu_torch
    # model_parallel_cuda_manual_seed and CudaRNGStatesTracker.add seed and read the CUDA generator.
    random.torch = cpu_torch
    # The tracker, fork() and CheckpointFunction save/restore the CUDA generator: use the CPU one.
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    # fork() warns whenever the CPU generator moves inside it, which on CPU is every draw.
    logging.getLogger(random.__name__).addFilter(_SameGeneratorFilter())
    # get_default_causal_mask uses device="cuda"; fused_softmax imported it by name.
    transformer_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = _default_causal_mask
    # MoEAlltoAllTokenDispatcher.__init__ creates torch.cuda.Stream() when this is None.
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cpu.current_stream()
    # _maybe_dtoh_and_synchronize uses CUDA streams and leaves CPU split sizes as tensors.
    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _dtoh_and_synchronize
    _enabled = True
