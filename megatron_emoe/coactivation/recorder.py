"""`CoactivationRecorder`: forward hooks on the `ElasticRouter`s of a model that sum the
`[experts, experts]` co-activation counts per MoE layer; and eval-time recording at budgets k'.

The hooks only read the router's output (and the router entropy it keeps when asked to, see
`ElasticRouter.track_entropy`), so routing is unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterable, Optional

import torch
from megatron.core.utils import get_model_config

from megatron_emoe.budget import Budget
from megatron_emoe.coactivation.counts import coactivation_counts
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.coactivation.storage import write_reduced
from megatron_emoe.cpu import device as default_device
from megatron_emoe.layers import num_layer_slots, router_slot
from megatron_emoe.routers import active_experts, elastic_routers

PHASES = ("train", "eval", "any")


class CoactivationRecorder:
    """Sums `[experts, experts]` co-activation counts per MoE layer from `ElasticRouter` forwards.

    Forward hooks read the router's `(probs, routing_map)` output and change nothing. `phase`
    picks the forwards counted: "train" (training mode with grad enabled: once per micro-batch,
    not again on activation recompute), "eval" (eval mode), or "any" (both). `entropy=True` also
    accumulates the token-mean router entropy, which the router computes from its own logits
    while attached (`ElasticRouter.track_entropy`; no extra gating matmul, no RNG use). Counts stay
    on the router's device; `local()`/`reduce()` read them.
    """

    def __init__(self, model=None, *, phase: str = "any", entropy: bool = True):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        self.phase = phase
        self.entropy = entropy
        self.num_experts: Optional[int] = None
        self.num_slots: Optional[int] = None
        self._routers: dict[int, Any] = {}
        self._handles: list = []
        # Each hooked router's `track_entropy` before attach, restored on detach.
        self._tracked: dict[int, bool] = {}
        self._attached = False
        self._counts: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._entropy_sum: dict[int, torch.Tensor] = {}
        self._replica_layers: set[int] = set()
        if model is not None:
            self.add(model)

    def add(self, model) -> "CoactivationRecorder":
        """Also record the elastic routers of `model` (a module or a list of model chunks)."""
        routers = elastic_routers(model)
        config = routers[0].config if routers else get_model_config(_chunks(model)[0])
        self._set_sizes(config)
        for router in routers:
            if id(router) in self._routers:
                continue
            self._routers[id(router)] = router
            if router.layer_number is not None and _is_tp_replica(router):
                self._replica_layers.add(router_slot(router))
            if self._attached:
                self._hook(router)
        return self

    def _set_sizes(self, config) -> None:
        sizes = (config.num_moe_experts, num_layer_slots(config))
        if self.num_experts is not None and (self.num_experts, self.num_slots) != sizes:
            raise ValueError("all models of a recorder must share num experts and layers")
        self.num_experts, self.num_slots = sizes

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> "CoactivationRecorder":
        if not self._attached:
            self._attached = True
            for router in self._routers.values():
                self._hook(router)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for key, tracked in self._tracked.items():
            self._routers[key].track_entropy = tracked
        self._tracked.clear()
        self._attached = False

    def __enter__(self) -> "CoactivationRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, router) -> None:
        self._handles.append(router.register_forward_hook(self._record, with_kwargs=True))
        if self.entropy:
            self._tracked[id(router)] = router.track_entropy
            router.track_entropy = True

    def _counts_this_forward(self, router) -> bool:
        if self.phase == "eval":
            return not router.training
        if self.phase == "train":
            return router.training and torch.is_grad_enabled()
        return not router.training or torch.is_grad_enabled()

    def _record(self, router, args, kwargs, output) -> None:
        if router.layer_number is None or not self._counts_this_forward(router):
            return
        routing_map = output[1]
        if routing_map.dtype != torch.bool or routing_map.dim() != 2:
            raise TypeError(
                "co-activation needs the router to return a boolean [tokens, experts] routing map"
            )
        padding_mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1).bool()
        layer = router_slot(router)
        with torch.no_grad():
            counts = coactivation_counts(routing_map, padding_mask)
            valid = routing_map.shape[0]
            if padding_mask is not None:
                valid -= int(padding_mask.sum())
            device = routing_map.device
            if layer not in self._counts:
                self._counts[layer] = torch.zeros_like(counts)
                self._tokens[layer] = torch.zeros((), dtype=torch.int64, device=device)
                self._entropy_sum[layer] = torch.zeros((), dtype=torch.float64, device=device)
            self._counts[layer] += counts
            self._tokens[layer] += valid
            if self.entropy and valid > 0:
                if router.last_entropy is None:
                    raise RuntimeError(
                        "the router kept no entropy: its track_entropy was turned off while a "
                        "CoactivationRecorder(entropy=True) was attached"
                    )
                self._entropy_sum[layer] += router.last_entropy.double() * valid

    # -- results -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what was recorded (hooks stay)."""
        self._counts.clear()
        self._tokens.clear()
        self._entropy_sum.clear()

    def local(self) -> Coactivation:
        """This rank's own counts, with no communication."""
        return self._collect(*self._stacked(), reduce_group=None, communicate=False)

    def reduce(self, group=None) -> Coactivation:
        """Counts summed over the ranks of `group` (default: all); a collective, all ranks call it.

        Each rank routes its own tokens (data, context, expert and sequence parallel shards), so the
        sum covers every token once; TP ranks holding the same tokens are counted once. Layers of
        other pipeline stages arrive through the sum too, so every rank gets the whole model.
        """
        return self._collect(*self._stacked(), reduce_group=group, communicate=True)

    def _stacked(self):
        if self.num_slots is None:
            raise ValueError("the recorder has no model: pass one to CoactivationRecorder or add()")
        device = next(iter(self._counts.values())).device if self._counts else default_device()
        experts, slots = self.num_experts, self.num_slots
        counts = torch.zeros(slots, experts, experts, dtype=torch.int64, device=device)
        tokens = torch.zeros(slots, dtype=torch.int64, device=device)
        entropy = torch.zeros(slots, dtype=torch.float64, device=device)
        for layer, value in self._counts.items():
            counts[layer - 1] = value
            tokens[layer - 1] = self._tokens[layer]
            entropy[layer - 1] = self._entropy_sum[layer]
        return counts, tokens, entropy

    def _collect(self, counts, tokens, entropy, reduce_group, communicate) -> Coactivation:
        if communicate:
            for layer in self._replica_layers:
                counts[layer - 1] = 0
                tokens[layer - 1] = 0
                entropy[layer - 1] = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for tensor in (counts, tokens, entropy):
                    torch.distributed.all_reduce(tensor, group=reduce_group)
        counts, tokens, entropy = counts.cpu(), tokens.cpu(), entropy.cpu()
        result = Coactivation({}, {}, {}, {"phase": self.phase})
        for index in range(counts.shape[0]):
            n = int(tokens[index])
            if n == 0 and not bool(counts[index].any()):
                continue
            layer = index + 1
            result.counts[layer] = counts[index].clone()
            result.tokens[layer] = n
            result.entropy[layer] = float(entropy[index]) / n if self.entropy and n else math.nan
        return result


def _chunks(model) -> list[torch.nn.Module]:
    return [model] if isinstance(model, torch.nn.Module) else list(model)


def _is_tp_replica(router) -> bool:
    """True on TP ranks other than 0 when all TP ranks route the same tokens (no sequence
    parallelism): their counts are copies, counted once in `reduce`."""
    group = getattr(router, "tp_group", None)
    if group is None or group.size() == 1 or router.config.sequence_parallel:
        return False
    return group.rank() != 0


# ---------------------------------------------------------------------------------------------
# Eval at budgets
# ---------------------------------------------------------------------------------------------
def collect_at_budgets(
    model, budgets: Iterable, run: Callable[[], Any], *, entropy: bool = True, group=None
) -> dict:
    """Eval-mode co-activation at each budget k' (anything `Budget.of` takes): sets it
    (`active_experts`), calls `run()` (which runs the eval forwards), reduces over ranks; restores
    each router's budget after. Keys are the budgets as given."""
    results = {}
    for k in budgets:
        with active_experts(model, k):
            with CoactivationRecorder(model, phase="eval", entropy=entropy) as recorder:
                run()
        results[k] = recorder.reduce(group)
        results[k].meta.update(tag=eval_tag(k), budget=Budget.of(k).to_json())
    return results


def existing_eval_files(directory: str, budgets: Iterable) -> list[str]:
    """The files of `directory` that evaluating `budgets` would replace (`<eval tag>.npz`)."""
    names = [f"{eval_tag(budget)}.npz" for budget in budgets]
    return [name for name in names if os.path.exists(os.path.join(directory, name))]


def eval_tag(budget) -> str:
    """File tag of eval matrices at `budget` (anything `Budget.of` takes but None): `eval_k4`,
    `eval_k1-2-4` for per-layer budgets, `eval_top_p0.5_max4` for token-adaptive ones."""
    value = Budget.of(budget)
    if value is None:
        raise ValueError("eval_tag needs a budget k', got None (the training top-k)")
    return f"eval_{value.label}" if value.is_top_p else f"eval_k{value.label}"


@contextlib.contextmanager
def recording(model, directory: Optional[str], tag: str, *, heatmaps: bool = True, **meta):
    """Record eval-mode co-activation of the forwards inside the block, then reduce over ranks and
    write `<directory>/<tag>.npz` (+ heatmaps) on rank 0. Does nothing when `directory` is None."""
    if directory is None:
        yield None
        return
    recorder = CoactivationRecorder(model, phase="eval").attach()
    try:
        yield recorder
    except BaseException:
        recorder.detach()
        raise
    recorder.detach()
    write_reduced(recorder.reduce(), directory, tag, heatmaps=heatmaps, **meta)
