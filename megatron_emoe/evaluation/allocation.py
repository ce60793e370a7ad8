"""Per-layer budget allocation: which k' each MoE layer gets under a total expert-FLOPs budget.

Pure search over an expensive objective (the validation loss of a per-layer budget); no Megatron.
`search_allocation` evaluates every uniform budget that fits, climbs greedily (from k_min in every
layer, or from the best uniform budget when that ascent would not fit in the evaluation cap), then
refines the best allocation found with single-layer moves and pairwise swaps. Every
allocation is evaluated at most once (memoised), every evaluated allocation fits the budget, and
the result is the best one evaluated, so it is never worse than the best uniform budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

from megatron_emoe.errors import UsageError

Budgets = tuple[int, ...]
Objective = Callable[[Budgets], float]

# Relative slack on the FLOPs budget, so that a budget computed as a sum of floats (e.g. the
# training top-k's FLOPs) admits the allocations whose cost equals it up to rounding.
COST_RTOL = 1e-9

# Step kinds recorded in the history.
UNIFORM, GREEDY, REFINE = "uniform", "greedy", "refine"
# Where the greedy ascent starts: k_min everywhere, the best uniform budget, or "auto" (k_min when
# the whole ascent fits in max_evaluations, else the best uniform budget).
GREEDY_STARTS = ("auto", "min", "uniform")


class Evaluation(NamedTuple):
    """One evaluated allocation: (budgets, loss, cost, kind), kind = the search phase."""

    budgets: Budgets
    loss: float
    cost: float
    kind: str


@dataclass
class Allocation:
    """The best allocation found, and how the search got there."""

    budgets: Budgets
    loss: float
    cost: float
    evaluations: int
    history: list[Evaluation] = field(default_factory=list)  # every evaluation, in order
    path: list[Evaluation] = field(default_factory=list)  # the moves the search accepted
    best_uniform: Optional[Evaluation] = None  # the best allocation with one k in every layer
    exhausted: bool = False  # True when max_evaluations stopped the search early


@dataclass(frozen=True)
class SearchSpace:
    """Allocations with k_min <= k <= k_max per layer whose expert FLOPs stay within max_cost."""

    k_min: int
    k_max: int
    layer_cost: tuple[float, ...]
    max_cost: float

    @property
    def num_layers(self) -> int:
        return len(self.layer_cost)

    def cost(self, budgets: Budgets) -> float:
        """Expert FLOPs per token of an allocation: sum over layers of k times one expert's."""
        return math.fsum(k * c for k, c in zip(budgets, self.layer_cost))

    def fits(self, budgets: Budgets) -> bool:
        return (all(self.k_min <= k <= self.k_max for k in budgets)
                and self.cost(budgets) <= self.max_cost * (1 + COST_RTOL))

    def uniform(self) -> list[Budgets]:
        """Every allocation with the same k in all layers that fits, by increasing k."""
        candidates = (tuple([k] * self.num_layers) for k in range(self.k_min, self.k_max + 1))
        return [b for b in candidates if self.fits(b)]

    def moves(self, budgets: Budgets, delta: int) -> Iterator[tuple[int, Budgets]]:
        """(layer, allocation) for each layer changed by `delta` that stays in the space."""
        for layer in range(self.num_layers):
            moved = _shift(budgets, layer, delta)
            if self.fits(moved):
                yield layer, moved

    def swaps(self, budgets: Budgets) -> Iterator[tuple[int, int, Budgets]]:
        """(from_layer, to_layer, allocation): one expert moved from one layer to another."""
        for src in range(self.num_layers):
            for dst in range(self.num_layers):
                if src != dst:
                    moved = _shift(_shift(budgets, src, -1), dst, +1)
                    if self.fits(moved):
                        yield src, dst, moved


def _shift(budgets: Budgets, layer: int, delta: int) -> Budgets:
    return budgets[:layer] + (budgets[layer] + delta,) + budgets[layer + 1:]


class EvaluationLimit(Exception):
    """Raised inside the search when max_evaluations allocations have been evaluated."""


class MemoObjective:
    """The objective evaluated at most once per allocation, with a cap and a history.

    Non-finite losses count as +inf (that allocation is never chosen) and are kept as such in the
    history, so that a budget where the model diverges does not stop a long search.
    """

    def __init__(self, objective: Objective, space: SearchSpace, max_evaluations: Optional[int],
                 on_evaluation: Optional[Callable[[int, Evaluation], None]] = None):
        self.objective, self.space = objective, space
        self.max_evaluations, self.on_evaluation = max_evaluations, on_evaluation
        self.losses: dict[Budgets, float] = {}
        self.history: list[Evaluation] = []

    def __call__(self, budgets: Budgets, kind: str) -> float:
        if budgets in self.losses:
            return self.losses[budgets]
        if not self.space.fits(budgets):  # a bug in the search, never a user error
            raise AssertionError(f"allocation {budgets} is outside the search space")
        if self.max_evaluations is not None and len(self.history) >= self.max_evaluations:
            raise EvaluationLimit
        loss = float(self.objective(budgets))
        loss = loss if math.isfinite(loss) else math.inf
        self.losses[budgets] = loss
        self.history.append(Evaluation(budgets, loss, self.space.cost(budgets), kind))
        if self.on_evaluation is not None:
            self.on_evaluation(len(self.history), self.history[-1])
        return loss

    def best(self) -> Evaluation:
        """Lowest loss evaluated; ties go to the cheaper allocation, then to the earlier one."""
        return min(self.history, key=lambda e: (e.loss, e.cost))


def validate_search(num_layers: int, k_min: int, k_max: int, layer_cost: Sequence[float],
                    max_cost: float, max_evaluations: Optional[int] = None,
                    min_improvement: float = 0.0, greedy_start: str = "auto",
                    names: Optional[Mapping[str, str]] = None) -> SearchSpace:
    """Check the search inputs and return their space; `ValueError` names the bad one and its range.

    `names` maps parameter names to the names the caller's users know (e.g. CLI flags).
    """
    name = lambda key: (names or {}).get(key, key)  # noqa: E731
    if not isinstance(num_layers, int) or num_layers < 1:
        raise UsageError(f"{name('num_layers')} must be an int >= 1, got {num_layers!r}")
    if not isinstance(k_min, int) or k_min < 1:
        raise UsageError(f"{name('k_min')} must be an int >= 1, got {k_min!r}")
    if not isinstance(k_max, int) or k_max < k_min:
        raise UsageError(f"{name('k_max')} must be an int >= {name('k_min')} ({k_min}), got {k_max!r}")
    costs = tuple(float(c) for c in layer_cost)
    if len(costs) != num_layers:
        raise UsageError(f"{name('layer_cost')} must have one entry per layer ({num_layers}), "
                         f"got {len(costs)}")
    if not all(math.isfinite(c) and c > 0 for c in costs):
        raise UsageError(f"{name('layer_cost')} must be finite and > 0, got {list(costs)}")
    floor = k_min * math.fsum(costs)
    if not (math.isfinite(max_cost) and max_cost > 0):
        raise UsageError(f"{name('max_cost')} must be finite and > 0, got {max_cost!r}")
    space = SearchSpace(k_min, k_max, costs, float(max_cost))
    if not space.fits(tuple([k_min] * num_layers)):
        raise UsageError(f"{name('max_cost')} ({max_cost:.6g}) is below the cost of "
                         f"{name('k_min')}={k_min} in every layer ({floor:.6g}); allowed: >= {floor:.6g}")
    needed = len(space.uniform())
    if max_evaluations is not None and (not isinstance(max_evaluations, int) or max_evaluations < needed):
        raise UsageError(f"{name('max_evaluations')} must be >= {needed} (the uniform budgets "
                         f"{k_min}..{k_min + needed - 1} that fit are always evaluated), "
                         f"got {max_evaluations!r}")
    if not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise UsageError(f"{name('min_improvement')} must be finite and >= 0, got {min_improvement!r}")
    if greedy_start not in GREEDY_STARTS:
        raise UsageError(f"{name('greedy_start')} must be one of {GREEDY_STARTS}, got {greedy_start!r}")
    return space


def ascent_evaluations(space: SearchSpace) -> int:
    """About how many evaluations a greedy ascent from k_min takes to fill the budget: one per
    layer for each expert added (fewer when layers reach k_max or the loss stops falling)."""
    room = space.max_cost - space.cost(tuple([space.k_min] * space.num_layers))
    mean_cost = math.fsum(space.layer_cost) / space.num_layers
    steps = min(int(room / mean_cost), (space.k_max - space.k_min) * space.num_layers)
    return steps * space.num_layers


def greedy_start_point(f: MemoObjective, greedy_start: str) -> Budgets:
    """k_min everywhere, or the best uniform budget evaluated (see GREEDY_STARTS)."""
    if greedy_start == "auto":
        left = math.inf if f.max_evaluations is None else f.max_evaluations - len(f.history)
        greedy_start = "min" if ascent_evaluations(f.space) <= left else "uniform"
    if greedy_start == "min":
        return tuple([f.space.k_min] * f.space.num_layers)
    return min((e for e in f.history if e.kind == UNIFORM), key=lambda e: (e.loss, e.cost)).budgets


def greedy_ascent(f: MemoObjective, start: Budgets, min_improvement: float = 0.0) -> Iterator[Evaluation]:
    """Add one expert at a time to the layer with the best loss decrease per FLOP, from `start`.

    Stops when no +1 move fits the budget or none lowers the loss by more than `min_improvement`:
    spending compute that does not buy loss is not taken, since a cheaper allocation at the same
    loss is the better one (the refinement still explores trades). Yields the accepted moves.
    """
    space, current = f.space, start
    loss = f(current, GREEDY)
    while True:
        best, best_rate = None, -math.inf
        for layer, moved in space.moves(current, +1):
            decrease = loss - f(moved, GREEDY)
            rate = decrease / space.layer_cost[layer]
            if decrease > min_improvement and rate > best_rate:
                best, best_rate = moved, rate
        if best is None:
            return
        current, loss = best, f.losses[best]
        yield Evaluation(current, loss, space.cost(current), GREEDY)


def refine(f: MemoObjective, start: Budgets, min_improvement: float = 0.0) -> Iterator[Evaluation]:
    """Local search from `start` until no neighbour lowers the loss by more than `min_improvement`.

    Each round evaluates the single-layer moves (+1 that fits, -1); if one improves, the best is
    taken. Otherwise it tries the pairwise swaps (one layer -1, another +1, within budget),
    most promising first by the measured -1 penalties and the +1 gains already known, and takes
    the first that improves. Yields the accepted moves.
    """
    space, current = f.space, start
    loss = f(current, REFINE)
    while True:
        singles = [(moved, f(moved, REFINE)) for delta in (+1, -1)
                   for _, moved in space.moves(current, delta)]
        improving = [(new_loss, moved) for moved, new_loss in singles if loss - new_loss > min_improvement]
        if improving:
            loss, current = min(improving, key=lambda item: (item[0], space.cost(item[1])))
        else:
            for moved in _ordered_swaps(f, current):
                new_loss = f(moved, REFINE)
                if loss - new_loss > min_improvement:
                    current, loss = moved, new_loss
                    break
            else:
                return
        yield Evaluation(current, loss, space.cost(current), REFINE)


def _ordered_swaps(f: MemoObjective, budgets: Budgets) -> list[Budgets]:
    """The swaps of `budgets`, best first by a separable estimate: the measured loss change of -1
    in the source layer minus the gain of +1 in the destination. That gain is the one measured
    nearest (see `_known_gain`), else the destination's -1 change stands in for it (with
    diminishing returns, layers that lose most from -1 gain most from +1)."""
    base = f.losses[budgets]
    down = [f.losses.get(_shift(budgets, layer, -1), base) - base for layer in range(len(budgets))]
    gain = [_known_gain(f, budgets, layer) for layer in range(len(budgets))]
    gain = [d if g is None else g for g, d in zip(gain, down)]
    estimates = []
    for src, dst, moved in f.space.swaps(budgets):
        estimate = down[src] - gain[dst]
        estimates.append((0.0 if math.isnan(estimate) else estimate, src, dst, moved))
    return [moved for *_, moved in sorted(estimates)]


def _known_gain(f: MemoObjective, budgets: Budgets, layer: int) -> Optional[float]:
    """Loss decrease of +1 expert in `layer` at its current k, from the evaluated allocation
    closest to `budgets` where that step was measured (None when it never was)."""
    best_gain, best_distance = None, math.inf
    for other, loss in f.losses.items():
        if other[layer] != budgets[layer]:
            continue
        stepped = f.losses.get(_shift(other, layer, +1))
        if stepped is None or not math.isfinite(loss - stepped):
            continue
        distance = sum(abs(a - b) for a, b in zip(other, budgets))
        if distance < best_distance:
            best_gain, best_distance = loss - stepped, distance
    return best_gain


def search_allocation(objective: Objective, num_layers: int, k_min: int, k_max: int,
                      layer_cost: Sequence[float], max_cost: float, *,
                      max_evaluations: Optional[int] = None, min_improvement: float = 0.0,
                      greedy_start: str = "auto", refinement: bool = True,
                      on_evaluation: Optional[Callable[[int, Evaluation], None]] = None,
                      names: Optional[Mapping[str, str]] = None) -> Allocation:
    """The per-layer budgets (one k per layer) with the lowest objective found under max_cost.

    objective: loss of an allocation (a tuple of ints, one per layer), called at most once each.
    layer_cost: expert FLOPs per token of one active expert in each layer; max_cost: the total.
    Phases: every uniform budget that fits, greedy ascent (from k_min, or from the best uniform
    budget when the ascent from k_min would not fit in max_evaluations: `greedy_start`), then
    (with `refinement`) local refinement from the best allocation so far. `max_evaluations` caps
    the objective calls (the search then returns the best evaluated, with `exhausted=True`); it
    must allow the uniform budgets. `on_evaluation(n, evaluation)` is called after each new
    evaluation (progress).
    """
    space = validate_search(num_layers, k_min, k_max, layer_cost, max_cost, max_evaluations,
                            min_improvement, greedy_start, names)
    f = MemoObjective(objective, space, max_evaluations, on_evaluation)
    uniform = space.uniform()
    path: list[Evaluation] = []
    exhausted = False
    for budgets in uniform:
        f(budgets, UNIFORM)
    try:  # the phases are generators, so moves accepted before the cap stay in `path`
        path.extend(greedy_ascent(f, greedy_start_point(f, greedy_start), min_improvement))
        if refinement:
            path.extend(refine(f, f.best().budgets, min_improvement))
    except EvaluationLimit:
        exhausted = True
    best = f.best()
    best_uniform = min((e for e in f.history if e.budgets in set(uniform)), key=lambda e: (e.loss, e.cost))
    return Allocation(best.budgets, best.loss, best.cost, len(f.history), list(f.history), path,
                      best_uniform, exhausted)
