"""Helpers for `test_gpu_path.py`: skip conditions, NCCL processes on GPUs, and the checks that the
CPU and GPU variants of a test share (so the CPU runs also exercise the checking code itself).

Nothing here imports Transformer Engine at module level: the file must import on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.extensions.transformer_engine import HAVE_TE

from megatron_emoe.runtime.launch import megatron_session, spawn_ranks

CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA GPU (none visible to torch)"
NO_TE_REASON = (
    "needs Transformer Engine (pip install -e '.[te]' on a CUDA machine); "
    "megatron.core.extensions.transformer_engine.HAVE_TE is False"
)


# -------------------------------------------------------------------------------------------------
# What this machine supports
# -------------------------------------------------------------------------------------------------
def gpu_count() -> int:
    return torch.cuda.device_count() if CUDA else 0


def _te_check(name: str) -> tuple[bool, str]:
    """Call Transformer Engine's `check_*_support()` wherever this TE version keeps it."""
    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            check = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if check is not None:
            ok, reason = check()
            return bool(ok), str(reason)
    return False, f"this Transformer Engine has no {name}()"


# Megatron-Core 0.19's `fp8_utils.get_fp8_recipe` version gates, per recipe.
_RECIPE_TE_VERSION = {"delayed": None, "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0",
                      "mxfp8": "2.1.0"}
_RECIPE_CHECK = {"delayed": "check_fp8_support", "tensorwise": "check_fp8_support",
                 "blockwise": "check_fp8_block_scaling_support", "mxfp8": "check_mxfp8_support"}


def fp8_recipe_support(recipe: str) -> tuple[bool, str]:
    """(usable, why not) for Megatron's `fp8_recipe` on this GPU and Transformer Engine."""
    if not CUDA:
        return False, NO_CUDA_REASON
    if not HAVE_TE:
        return False, NO_TE_REASON
    from megatron.core.utils import is_te_min_version

    version = _RECIPE_TE_VERSION[recipe]
    if version is not None and not is_te_min_version(version):
        return False, f"fp8_recipe={recipe} needs Transformer Engine >= {version}"
    ok, reason = _te_check(_RECIPE_CHECK[recipe])
    if not ok:
        capability = torch.cuda.get_device_capability()
        return False, f"fp8_recipe={recipe} is not supported on sm{capability[0]}{capability[1]}: {reason}"
    return True, ""


def fused_permute_available() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return all(
        getattr(moe_utils, name, None) is not None
        for name in ("fused_permute", "fused_permute_with_probs", "fused_unpermute",
                     "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs")
    )


def flex_backend_status(backend: str) -> tuple[bool, str]:
    """(usable, why not) for the flex dispatcher with `backend` ('deepep' or 'hybridep')."""
    if not CUDA:
        return False, NO_CUDA_REASON
    if not HAVE_TE:
        return False, NO_TE_REASON
    from megatron.core.transformer.moe import fused_a2a

    available = fused_a2a.HAVE_DEEP_EP if backend == "deepep" else fused_a2a.HAVE_HYBRIDEP
    if not available:
        package = "deep_ep" if backend == "deepep" else "deep_ep.HybridEPBuffer (DeepEP's hybrid-ep branch)"
        return False, f"the flex dispatcher's {backend} backend needs {package}, which is not importable"
    if gpu_count() < 2:
        return False, f"the flex dispatcher with {backend} needs expert parallelism > 1, so >= 2 GPUs"
    return True, ""


# -------------------------------------------------------------------------------------------------
# NCCL processes with Megatron's parallel state (the GPU counterpart of megatron_emoe.runtime.launch)
# -------------------------------------------------------------------------------------------------
def _nccl_rank(rank, world_size, store_dir, fn, args, tp, ep, timeout):
    with megatron_session(rank, world_size, store_dir, tp=tp, ep=ep, timeout=timeout,
                          backend="nccl"):
        return fn(rank, *args)


def run_nccl(fn, world_size: int = 1, *, tp: int = 1, ep: int = 1, args=(), timeout: int = 300):
    """Run `fn(rank, *args)` on `world_size` GPUs with NCCL and Megatron's parallel state.

    world_size=1 runs in this process (like `run_distributed_test`); more ranks are spawned, and a
    failing rank's traceback is raised here. `fn` must be a top-level function."""
    with tempfile.TemporaryDirectory(prefix="megatron-emoe-nccl-") as store_dir:
        run_args = (world_size, store_dir, fn, tuple(args), tp, ep, timeout)
        if world_size == 1:
            _nccl_rank(0, *run_args)
            return
        spawn_ranks(_nccl_rank, run_args, world_size, fn.__name__, timeout)


# -------------------------------------------------------------------------------------------------
# What one MoE layer routed and dispatched
# -------------------------------------------------------------------------------------------------
class DispatchRecorder:
    """Clones, per forward, of the router's (probs, routing map) and of what the experts received.

    Clones matter: with `moe_router_padding_for_quantization` the alltoall dispatcher pads the
    router's routing map *in place* (`moe_utils.pad_routing_map` writes through a transpose view).
    """

    def __init__(self, layer):
        self.probs, self.maps = [], []
        self.rows, self.tokens_per_expert, self.permuted_probs = [], [], []
        layer.router.register_forward_hook(self._after_router)
        layer.experts.register_forward_pre_hook(self._before_experts)

    def _after_router(self, module, inputs, output):
        probs, routing_map = output
        self.probs.append(probs.detach().clone())
        self.maps.append(routing_map.detach().clone())

    def _before_experts(self, module, args):
        hidden, tokens_per_expert, permuted_probs = args[:3]
        self.rows.append(hidden.shape[0])
        self.tokens_per_expert.append(torch.as_tensor(tokens_per_expert).detach().long().cpu().clone())
        self.permuted_probs.append(permuted_probs.detach().float().reshape(-1).clone())


def _sum_over(group, value: int) -> int:
    if group is None or group.size() == 1:
        return int(value)
    # NCCL reduces CUDA tensors only; gloo takes either.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    total = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def check_exact_budget(recorder: DispatchRecorder, k: Optional[int], expert_group=None) -> None:
    """The router chose exactly `k` experts per token (k=None: per-token budgets, any count), each
    with a non-zero gate, and the experts received exactly those weighted (token, expert) pairs."""
    routing_map, probs = recorder.maps[-1], recorder.probs[-1]
    per_token = routing_map.sum(-1)
    if k is not None:
        assert (per_token == k).all(), (
            f"routing map has {per_token.unique().tolist()} experts/token, want {k}"
        )
    nonzero = (probs != 0).sum(-1)
    assert torch.equal(nonzero, per_token), "router gates are non-zero off the routing map"
    assert not ((probs != 0) & ~routing_map.bool()).any(), "a gate is non-zero outside the map"
    local_pairs = int(routing_map.sum())
    real_received = int((recorder.permuted_probs[-1] != 0).sum())
    assert _sum_over(expert_group, real_received) == _sum_over(expert_group, local_pairs), (
        "the experts received a different number of weighted (token, expert) pairs than routed"
    )


def check_padded_dispatch(recorder: DispatchRecorder, k: Optional[int], align: int, expert_group=None,
                          dispatcher=None) -> None:
    """FP8 routing-map padding: each expert's token count is a multiple of `align`, the padding
    carries zero gates, and the real (non-zero-gate) work is exactly `k` experts per token."""
    assert align > 0, "padding for quantization needs an alignment (fp8/fp4 set in the config)"
    check_exact_budget(recorder, k, expert_group)
    tokens_per_expert = recorder.tokens_per_expert[-1]
    assert (tokens_per_expert % align == 0).all(), (
        f"tokens_per_expert {tokens_per_expert.tolist()} not padded to multiples of {align}"
    )
    assert recorder.rows[-1] == int(tokens_per_expert.sum()), "expert input rows != sum(tokens_per_expert)"
    # Per local expert: received rows = real pairs + padding, each source rank adding < align rows.
    permuted = recorder.permuted_probs[-1]
    assert permuted.numel() == int(tokens_per_expert.sum())
    sources = 1 if expert_group is None else expert_group.size()
    segments = torch.split(permuted, tokens_per_expert.tolist())
    for expert, (segment, padded) in enumerate(zip(segments, tokens_per_expert.tolist(), strict=True)):
        real = int((segment != 0).sum())
        assert 0 <= padded - real < align * sources, (
            f"local expert {expert}: {padded} rows for {real} routed tokens (align {align})"
        )
    total_rows = _sum_over(expert_group, int(tokens_per_expert.sum()))
    total_pairs = _sum_over(expert_group, int(recorder.maps[-1].sum()))
    assert total_rows >= total_pairs, "padding lost routed tokens"
    if dispatcher is not None and getattr(dispatcher, "routing_map", None) is not None:
        # alltoall keeps the padded map it permuted with: a superset of the router's map.
        padded_map = dispatcher.routing_map
        assert (padded_map.sum(0) % align == 0).all(), "dispatcher's routing map is not padded"
        assert not (recorder.maps[-1] & ~padded_map.bool()).any(), "padding dropped a routed pair"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Normwise relative error ||value - reference|| / ||reference|| (Frobenius, in fp32)."""
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------------------------
# Audit: which dispatcher attributes depend on moe_router_topk, and does set_dispatcher_topk refresh them
# -------------------------------------------------------------------------------------------------
_SKIP = object()


def _plain(value):
    """A comparable snapshot of one attribute value, or _SKIP for handles (groups, streams, callables)."""
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__name__, value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().reshape(-1)
        return ("tensor", tuple(value.shape), str(value.dtype),
                tuple(flat.tolist()) if flat.numel() <= 4096 else None)
    if isinstance(value, np.ndarray):
        return ("array", value.shape, str(value.dtype), tuple(value.reshape(-1).tolist()))
    if isinstance(value, (list, tuple)):
        items = tuple(_plain(item) for item in value)
        return _SKIP if any(item is _SKIP for item in items) else items
    return _SKIP


def _is_dispatch_object(value) -> bool:
    """Objects of Megatron's MoE package a dispatcher owns (e.g. the flex `_comm_manager`)."""
    module = type(value).__module__ or ""
    return module.startswith("megatron.core.transformer.moe") and not isinstance(value, torch.nn.Module)


def dispatcher_state(dispatcher) -> tuple[dict, dict]:
    """(values, configs): every plain attribute of the dispatcher, of its config and of the objects
    it owns from Megatron's MoE package, by path; and each TransformerConfig found, by path."""
    values, configs = {}, {}

    def walk(prefix, obj, depth):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            configs[prefix] = obj
            for field in dataclasses.fields(obj):
                plain = _plain(getattr(obj, field.name, None))
                if plain is not _SKIP:
                    values[f"{prefix}.{field.name}"] = plain
            return
        for name, value in vars(obj).items():
            path = f"{prefix}.{name}"
            if depth < 3 and (
                _is_dispatch_object(value)
                or (dataclasses.is_dataclass(value) and not isinstance(value, type))
            ):
                walk(path, value, depth + 1)
                continue
            plain = _plain(value)
            if plain is not _SKIP:
                values[path] = plain

    walk("dispatcher", dispatcher, 0)
    return values, configs


def topk_audit(layer_at_k, layer_at_other_k, set_topk) -> dict:
    """Audit `set_topk(dispatcher, k)` against two layers built alike but for their top-k.

    Returns {path: (value after set_topk, value built at that k)} for every attribute that depends on
    moe_router_topk at construction (differs between the two builds) and is not refreshed by
    `set_topk`, plus every config reference inside the dispatcher that is not its private config
    (those would keep the shared config's top-k). Empty means set_topk covers the dispatcher.
    """
    first = layer_at_k.token_dispatcher
    other = layer_at_other_k.token_dispatcher
    other_k = other.config.moe_router_topk
    before, _ = dispatcher_state(first)
    target, _ = dispatcher_state(other)
    derived = {path for path in set(before) | set(target) if before.get(path) != target.get(path)}
    assert "dispatcher.config.moe_router_topk" in derived, derived
    set_topk(first, other_k)
    after, configs = dispatcher_state(first)
    problems = {path: (after.get(path), target.get(path)) for path in sorted(derived)
                if after.get(path) != target.get(path)}
    unchanged = {path for path in before if path not in derived and after.get(path) != before[path]}
    assert not unchanged, f"set_topk changed attributes that do not depend on top-k: {unchanged}"
    for path, config in configs.items():
        if config is not first.config:
            problems[f"{path} (is not the dispatcher's private config)"] = (
                "shared" if config is layer_at_k.config else "other", "private"
            )
    return problems
