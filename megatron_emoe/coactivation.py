"""Expert co-activation diagnostics (EMoE, arXiv 2509.21892): which experts process the same tokens.

The EMoE paper traces the inference-time scaling wall to expert combinations that never ran together
in training. This module measures that: per MoE layer, the `[experts, experts]` count of tokens
routed to both experts i and j, collected from `ElasticRouter` forwards (in training, or in eval at
each budget k'), then compared between training and eval by the Frobenius distance of the
normalised matrices. The default normalisation, "pairs" (the distribution over co-activated
expert pairs), is this project's choice: it makes matrices taken at different k comparable.

- Pure functions: `coactivation_counts`, `normalize`, `frobenius_distance`.
- `CoactivationRecorder(model)`: forward hooks on the routers; they only read the routing map, so
  routing is unchanged. `reduce()` sums over all ranks (each holds its own tokens).
- `collect_at_budgets` / `recording`: eval matrices at budgets k'; `TrainingCollector`: training
  matrices written at each checkpoint save (`--coactivation-dir`).
- `save` / `load` (`.npz`) and `save_heatmaps` (PNG, one per layer); `distance_table` and
  `compare_directory` write the per-layer distance table as JSON.

Expert load and router entropy come from `megatron_emoe.routing` (`load_imbalance`,
`router_entropy`); the load is the diagonal of the counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_emoe import routing
from megatron_emoe.files import write_bytes_atomically, write_text_atomically
from megatron_emoe.layers import num_layer_slots, router_slot

NORMALIZATIONS = ("pairs", "tokens", "total")
# Default normalisation: the distribution over co-activated expert pairs (see `normalize`).
DEFAULT_NORMALIZATION = "pairs"
TRAIN_TAG = "train"
DISTANCE_FILE = "coactivation_distance.json"
PHASES = ("train", "eval", "any")

# Rows per matmul in `coactivation_counts`: float32 sums of 0/1 values are exact below 2**24.
_EXACT_ROWS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------
def coactivation_counts(
    routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Co-activation counts `[experts, experts]` (int64) of a boolean map `[tokens, experts]`.

    M[i, j] = number of tokens routed to both i and j, so M is symmetric and its diagonal is each
    expert's load. `padding_mask` (`[tokens]`, True = padding, Megatron's convention) drops rows.
    """
    if routing_map.dim() != 2:
        raise ValueError(
            f"routing_map must be [tokens, experts], got shape {tuple(routing_map.shape)}"
        )
    if padding_mask is not None:
        routing_map = routing_map[~padding_mask.reshape(-1).bool()]
    experts = routing_map.shape[1]
    counts = torch.zeros(experts, experts, dtype=torch.int64, device=routing_map.device)
    for start in range(0, routing_map.shape[0], _EXACT_ROWS):
        rows = routing_map[start : start + _EXACT_ROWS].to(torch.float32)
        counts += (rows.t() @ rows).round().to(torch.int64)
    return counts


def normalize(
    counts: torch.Tensor, mode: str = DEFAULT_NORMALIZATION, num_tokens: Optional[int] = None
) -> torch.Tensor:
    """Co-occurrence frequencies `[experts, experts]` (float64) from counts, comparable across k.

    - "pairs" (default): the diagonal is dropped and the off-diagonal entries sum to 1, i.e. the
      probability that a co-activated pair (token, i, j) is (i, j). Scale-free in tokens and in k,
      so a matrix collected at the training k compares with one at k' on *which* experts work
      together; EMoE sampling of k of the top-k_ideal matches top-k_ideal inference exactly in
      expectation under it. A map with no pairs (k = 1) gives zeros.
    - "tokens": counts / tokens, i.e. P(a token activates both i and j); the diagonal is the load
      fraction and the total is about k^2, so it also changes with k. Needs `num_tokens`.
    - "total": counts / their sum.
    """
    counts = counts.to(torch.float64)
    if mode == "pairs":
        pairs = counts - torch.diag(torch.diagonal(counts))
        total = pairs.sum()
        return pairs / total if total > 0 else pairs
    if mode == "tokens":
        if not num_tokens:
            raise ValueError("normalize(mode='tokens') needs num_tokens > 0")
        return counts / num_tokens
    if mode == "total":
        total = counts.sum()
        return counts / total if total > 0 else counts
    raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


def frobenius_distance(train_matrix: torch.Tensor, eval_matrix: torch.Tensor) -> float:
    """||train - eval||_F of two normalised `[experts, experts]` matrices (see `normalize`)."""
    if train_matrix.shape != eval_matrix.shape:
        raise ValueError(
            f"matrices differ in shape: {tuple(train_matrix.shape)} vs {tuple(eval_matrix.shape)}"
        )
    diff = train_matrix.to(torch.float64) - eval_matrix.to(torch.float64)
    return float(torch.linalg.matrix_norm(diff, ord="fro"))


# ---------------------------------------------------------------------------------------------
# Collected matrices of one phase
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Coactivation:
    """Summed co-activation of one phase (training, or eval at one budget), per global MoE layer.

    `counts[layer]` is `[experts, experts]` int64 on the CPU; `tokens[layer]` the (non-padding)
    tokens routed; `entropy[layer]` the token-mean router entropy in nats (NaN if not recorded).
    Layers are numbered as Megatron's metrics tracker numbers them: 1-based, MTP layers last.
    """

    counts: dict[int, torch.Tensor]
    tokens: dict[int, int]
    entropy: dict[int, float]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    def load(self, layer: int) -> torch.Tensor:
        """Tokens each expert received in `layer`: the diagonal, `[experts]`."""
        return torch.diagonal(self.counts[layer]).clone()

    def load_imbalance(self, layer: int) -> float:
        """Busiest expert's load over the mean (`routing.load_imbalance`)."""
        return float(routing.load_imbalance(self.load(layer)))

    def normalized(self, layer: int, mode: str = DEFAULT_NORMALIZATION) -> torch.Tensor:
        return normalize(self.counts[layer], mode, self.tokens.get(layer))

    def merged(self, other: "Coactivation") -> "Coactivation":
        """The sum of two collections (token-weighted entropy); meta spans both."""
        counts, tokens, entropy = dict(self.counts), dict(self.tokens), dict(self.entropy)
        for layer in other.layers:
            if layer not in counts:
                counts[layer], tokens[layer] = other.counts[layer], other.tokens[layer]
                entropy[layer] = other.entropy.get(layer, math.nan)
                continue
            mine, theirs = tokens[layer], other.tokens[layer]
            a, b = entropy.get(layer, math.nan), other.entropy.get(layer, math.nan)
            counts[layer] = counts[layer] + other.counts[layer]
            tokens[layer] = mine + theirs
            entropy[layer] = (a * mine + b * theirs) / max(mine + theirs, 1)
        meta = {**other.meta, **self.meta}
        if "iteration_end" in other.meta:
            meta["iteration_end"] = other.meta["iteration_end"]
        return Coactivation(counts, tokens, entropy, meta)


# ---------------------------------------------------------------------------------------------
# Recorder
# ---------------------------------------------------------------------------------------------
def _chunks(model) -> list[torch.nn.Module]:
    return [model] if isinstance(model, torch.nn.Module) else list(model)


def _is_tp_replica(router) -> bool:
    """True on TP ranks other than 0 when all TP ranks route the same tokens (no sequence
    parallelism): their counts are copies, counted once in `reduce`."""
    group = getattr(router, "tp_group", None)
    if group is None or group.size() == 1 or router.config.sequence_parallel:
        return False
    return group.rank() != 0


class CoactivationRecorder:
    """Sums `[experts, experts]` co-activation counts per MoE layer from `ElasticRouter` forwards.

    Forward hooks read the router's `(probs, routing_map)` output and change nothing. `phase`
    picks the forwards counted: "train" (training mode with grad enabled: once per micro-batch,
    not again on activation recompute), "eval" (eval mode), or "any" (both). `entropy=True` also
    accumulates `routing.router_entropy` of the router logits (one extra gating matmul per
    forward, no RNG use). Counts stay on the router's device; `local()`/`reduce()` read them.
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
        self._attached = False
        self._counts: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._entropy_sum: dict[int, torch.Tensor] = {}
        self._replica_layers: set[int] = set()
        if model is not None:
            self.add(model)

    def add(self, model) -> "CoactivationRecorder":
        """Also record the elastic routers of `model` (a module or a list of model chunks)."""
        from megatron_emoe.budget import elastic_routers

        routers = elastic_routers(model)
        config = routers[0].config if routers else _model_config(model)
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
        self._attached = False

    def __enter__(self) -> "CoactivationRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, router) -> None:
        self._handles.append(router.register_forward_hook(self._record, with_kwargs=True))

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
                logits = router.gating(args[0] if args else kwargs["input"])
                logits = logits.reshape(-1, routing_map.shape[1])
                if padding_mask is not None:
                    logits = logits[~padding_mask]
                self._entropy_sum[layer] += routing.router_entropy(logits).double() * valid

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
        from megatron_emoe.cpu import device as default_device

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


def _model_config(model):
    from megatron.core.utils import get_model_config

    return get_model_config(_chunks(model)[0])


# ---------------------------------------------------------------------------------------------
# Eval at budgets
# ---------------------------------------------------------------------------------------------
def collect_at_budgets(
    model, budgets: Iterable, run: Callable[[], Any], *, entropy: bool = True, group=None
) -> dict:
    """Eval-mode co-activation at each budget k': sets it (`set_active_experts`), calls `run()`
    (which runs the eval forwards), reduces over ranks; restores each router's budget after."""
    from megatron_emoe.budget import active_experts

    results = {}
    for k in budgets:
        with active_experts(model, k):
            with CoactivationRecorder(model, phase="eval", entropy=entropy) as recorder:
                run()
        results[k] = recorder.reduce(group)
        results[k].meta.update(tag=eval_tag(k), budget=k)
    return results


def existing_eval_files(directory: str, budgets: Iterable) -> list[str]:
    """The files of `directory` that evaluating `budgets` would replace (`<eval tag>.npz`)."""
    names = [f"{eval_tag(budget)}.npz" for budget in budgets]
    return [name for name in names if os.path.exists(os.path.join(directory, name))]


def eval_tag(budget) -> str:
    """File tag of eval matrices at `budget`: `eval_k4`, `eval_k1-2-4` for per-layer budgets,
    `eval_top_p0.5_max4` for token-adaptive ones."""
    if hasattr(budget, "label"):
        return f"eval_{budget.label}"
    if isinstance(budget, (list, tuple)):
        return "eval_k" + "-".join(str(int(k)) for k in budget)
    return f"eval_k{int(budget)}"


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


def write_reduced(stats: Coactivation, directory: str, tag: str, *, heatmaps: bool = True, **meta):
    """Tag `stats` (already reduced over ranks) and save them as `<directory>/<tag>.npz` (+ heatmaps)
    on rank 0."""
    stats.meta.update(tag=tag, **meta)
    if _rank() == 0:
        save(stats, directory, tag, heatmaps=heatmaps)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
class TrainingCollector:
    """Training-time co-activation for `--coactivation-dir DIR`.

    `observe(model, iteration)` (from the forward step) hooks each model chunk once. `write(i)`
    (at every checkpoint save; a collective) writes the window since the last write as
    `DIR/train_iter_XXXXXXX.npz` and the whole run as `DIR/train.npz` plus `DIR/train/*.png`.
    A run resumed at the iteration `DIR/train.npz` ends at continues that total.
    """

    def __init__(self, directory: str, *, heatmaps: bool = True):
        self.directory = directory
        self.heatmaps = heatmaps
        self.recorder = CoactivationRecorder(phase="train", entropy=False)
        self.total: Optional[Coactivation] = None
        self.window_start: Optional[int] = None
        self.last_iteration: Optional[int] = None
        self._chunks: set[int] = set()

    def observe(self, model, iteration: Optional[int] = None) -> None:
        if id(model) not in self._chunks:
            self._chunks.add(id(model))
            self.recorder.add(model).attach()
        if iteration is None or not model.training:
            return
        if self.window_start is None:
            self.window_start = iteration
            self.total = self._resumed_total(iteration)
        self.last_iteration = iteration

    def _resumed_total(self, start: int) -> Optional[Coactivation]:
        path = os.path.join(self.directory, f"{TRAIN_TAG}.npz")
        if not os.path.isfile(path):
            return None
        previous = load(path)
        return previous if previous.meta.get("iteration_end") == start else None

    def write(self, iteration: int) -> Optional[Coactivation]:
        """Reduce the window (every rank calls this) and write it on rank 0; returns the total."""
        if not self._chunks:
            return self.total
        window = self.recorder.reduce()
        self.recorder.reset()
        if not window.counts:
            return self.total
        window.meta.update(tag=f"{TRAIN_TAG}_iter_{iteration:07d}", iteration_end=iteration)
        if self.window_start is not None:
            window.meta["iteration_start"] = self.window_start
        if self.total is None:
            self.total = dataclasses.replace(window, meta=dict(window.meta))
        else:
            self.total = self.total.merged(window)
        self.total.meta["tag"] = TRAIN_TAG
        if _rank() == 0:
            save(window, self.directory, window.meta["tag"], heatmaps=False)
            save(self.total, self.directory, TRAIN_TAG, heatmaps=self.heatmaps)
        self.window_start = iteration
        return self.total

    def finish(self) -> Optional[Coactivation]:
        """Write what the last save missed (every rank calls this), then remove the hooks."""
        try:
            if self.last_iteration is not None:
                self.write(self.last_iteration + 1)
        finally:
            self.recorder.detach()
        return self.total


def writing_at_saves(save_checkpoint, collector: TrainingCollector):
    """Wrap Megatron's `save_checkpoint(iteration, ...)` so that each save also writes `collector`'s
    window (all ranks call `save_checkpoint`, so the reduction is safe there)."""

    @functools.wraps(save_checkpoint)
    def save_and_write(iteration, *args, **kwargs):
        result = save_checkpoint(iteration, *args, **kwargs)
        if not kwargs.get("release"):
            collector.write(iteration)
        return result

    return save_and_write


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def save(stats: Coactivation, directory: str, tag: str, *, heatmaps: bool = True,
         mode: str = DEFAULT_NORMALIZATION) -> str:
    """Write `<directory>/<tag>.npz` (and `<directory>/<tag>/layer_LL.png`); returns the npz path.

    Arrays: `layers` [L], `counts` [L, experts, experts] int64, `tokens` [L], `entropy` [L]
    (NaN when not recorded), and `meta` (a JSON string: phase, budget, iterations).
    """
    os.makedirs(directory, exist_ok=True)
    layers = stats.layers
    experts = stats.counts[layers[0]].shape[0] if layers else 0
    buffer = io.BytesIO()
    np.savez(
        buffer,
        layers=np.asarray(layers, dtype=np.int64),
        counts=np.stack([stats.counts[n].numpy() for n in layers]).astype(np.int64)
        if layers else np.zeros((0, experts, experts), dtype=np.int64),
        tokens=np.asarray([stats.tokens[n] for n in layers], dtype=np.int64),
        entropy=np.asarray([stats.entropy.get(n, math.nan) for n in layers], dtype=np.float64),
        meta=np.asarray(json.dumps(stats.meta, sort_keys=True)),
    )
    path = os.path.join(directory, f"{tag}.npz")
    write_bytes_atomically(path, buffer.getvalue())
    if heatmaps:
        save_heatmaps(stats, os.path.join(directory, tag), mode=mode)
    return path


def load(path: str) -> Coactivation:
    """Read a file written by `save`."""
    with np.load(path, allow_pickle=False) as data:
        layers = [int(n) for n in data["layers"]]
        counts = {n: torch.from_numpy(data["counts"][i].copy()) for i, n in enumerate(layers)}
        tokens = {n: int(data["tokens"][i]) for i, n in enumerate(layers)}
        entropy = {n: float(data["entropy"][i]) for i, n in enumerate(layers)}
        meta = json.loads(str(data["meta"]))
    return Coactivation(counts, tokens, entropy, meta)


def save_heatmaps(
    stats: Coactivation, directory: str, *, mode: str = DEFAULT_NORMALIZATION
) -> list[str]:
    """One heatmap PNG per layer of the normalised matrix: `<directory>/layer_LL.png`."""
    # The Agg canvas directly, not pyplot: no global figure state, no GUI backend.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    os.makedirs(directory, exist_ok=True)
    paths = []
    label = stats.meta.get("tag", "")
    for layer in stats.layers:
        matrix = stats.normalized(layer, mode).numpy()
        if mode == "pairs":  # the diagonal is not a pair: grey, outside the colour scale
            matrix = np.ma.masked_array(matrix, mask=np.eye(matrix.shape[0], dtype=bool))
        figure = Figure(figsize=(5.2, 4.4))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
        image = axes.imshow(matrix, cmap=cmap, interpolation="nearest")
        figure.colorbar(image, ax=axes, label=f"co-activation ({mode})")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("expert")
        axes.set_ylabel("expert")
        axes.set_title(f"{label} layer {layer} ({stats.tokens[layer]} tokens)", fontsize=10)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        path = os.path.join(directory, f"layer_{layer:02d}.png")
        write_bytes_atomically(path, buffer.getvalue())
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Train vs eval distances
# ---------------------------------------------------------------------------------------------
def distance_table(
    train: Coactivation, evals: Mapping[Any, Coactivation], mode: str = DEFAULT_NORMALIZATION
) -> dict:
    """Per-layer Frobenius distance between the training matrices and the eval ones at each
    budget k', both normalised with `mode` (None where a "pairs" matrix has no pairs, as at
    k' = 1); plus each side's tokens, load imbalance and entropy. JSON-ready: string keys."""
    def summary(stats: Coactivation, layers: Sequence[int]) -> dict:
        return {
            "meta": stats.meta,
            "tokens": {str(n): stats.tokens[n] for n in layers},
            "load_imbalance": {str(n): stats.load_imbalance(n) for n in layers},
            "router_entropy": {str(n): _json_float(stats.entropy.get(n, math.nan)) for n in layers},
        }

    table: dict[str, Any] = {
        "normalization": mode,
        "definition": "||normalize(train) - normalize(eval at k')||_F per MoE layer; "
        "M[i][j] = tokens routed to both experts i and j",
        "train": summary(train, train.layers),
        "frobenius": {},
        "mean_over_layers": {},
        "eval": {},
    }
    for budget, stats in evals.items():
        key = _budget_key(budget)
        distances = {
            str(n): _distance(train, stats, n, mode) for n in stats.layers if n in train.counts
        }
        defined = [d for d in distances.values() if d is not None]
        table["frobenius"][key] = distances
        table["mean_over_layers"][key] = sum(defined) / len(defined) if defined else None
        table["eval"][key] = summary(stats, stats.layers)
    return table


def _distance(train: Coactivation, other: Coactivation, layer: int, mode: str) -> Optional[float]:
    """Frobenius distance of one layer; None under "pairs" when a side has no pairs (k' = 1)."""
    if mode == "pairs" and not all(_has_pairs(s.counts[layer]) for s in (train, other)):
        return None
    return frobenius_distance(train.normalized(layer, mode), other.normalized(layer, mode))


def _has_pairs(counts: torch.Tensor) -> bool:
    return bool((counts.sum() - torch.diagonal(counts).sum()) > 0)


def _budget_key(budget) -> str:
    if hasattr(budget, "label"):
        return budget.label
    if isinstance(budget, (list, tuple)):
        return "-".join(str(int(k)) for k in budget)
    return str(budget)


def _json_float(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def write_distance_table(path: str, table: dict) -> None:
    """Write the table as JSON, atomically."""
    write_text_atomically(path, json.dumps(table, indent=2, sort_keys=False) + "\n")


def compare_directory(
    directory: str, mode: str = DEFAULT_NORMALIZATION, output: Optional[str] = None
) -> Optional[dict]:
    """Distance table between `<directory>/train.npz` and every `<directory>/eval_k*.npz`, written
    to `output` (default `<directory>/coactivation_distance.json`); None without both kinds."""
    train_path = os.path.join(directory, f"{TRAIN_TAG}.npz")
    if not os.path.isfile(train_path):
        return None
    evals = {}
    for path in glob.glob(os.path.join(directory, "eval_k*.npz")):
        stats = load(path)
        match = re.fullmatch(r"eval_k([\d-]+)\.npz", os.path.basename(path))
        budget = stats.meta.get("budget", match.group(1) if match else path)
        evals[_budget_key(budget)] = stats
    if not evals:
        return None
    ordered = dict(sorted(evals.items(), key=lambda item: [int(x) for x in item[0].split("-")]))
    table = distance_table(load(train_path), ordered, mode)
    write_distance_table(output or os.path.join(directory, DISTANCE_FILE), table)
    return table
