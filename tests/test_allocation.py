"""Per-layer budget allocation search on synthetic objectives (pure Python, no Megatron)."""

from __future__ import annotations

import collections
import itertools
import json
import math
import random
import re
import subprocess

import pytest

from megatron_emoe.evaluation.allocation import (
    GREEDY, REFINE, UNIFORM, MemoObjective, SearchSpace, greedy_ascent, search_allocation,
    validate_search,
)
from megatron_emoe.cli.search_budget_allocation import main as tool_main
from tests.training_runs import REPO, console_script, environment, usage_error


class Counted:
    """An objective that counts its calls per allocation."""

    def __init__(self, fn):
        self.fn, self.calls = fn, collections.Counter()

    def __call__(self, budgets):
        assert isinstance(budgets, tuple) and all(isinstance(k, int) for k in budgets)
        self.calls[budgets] += 1
        return self.fn(budgets)


def brute_force(fn, num_layers, k_min, k_max, layer_cost, max_cost):
    """(loss, budgets) of the best allocation, over all of them."""
    space = SearchSpace(k_min, k_max, tuple(layer_cost), max_cost)
    feasible = [b for b in itertools.product(range(k_min, k_max + 1), repeat=num_layers) if space.fits(b)]
    return min((fn(b), space.cost(b), b) for b in feasible)


def separable_convex(rng, num_layers, k_max):
    """sum_i g_i(k_i) with each g_i convex: decreasing, flattening, then possibly rising."""
    tables = []
    for _ in range(num_layers):
        steps = sorted(rng.uniform(-1.0, 0.2) for _ in range(k_max))  # increasing marginal changes
        tables.append(list(itertools.accumulate(steps, initial=rng.uniform(3, 5))))
    return lambda b: math.fsum(tables[i][k] for i, k in enumerate(b))


def non_separable(rng, num_layers, k_max):
    """A loss falling with the number of experts, plus random per-layer and pairwise terms."""
    unary = [[rng.uniform(0, 1) for _ in range(k_max + 1)] for _ in range(num_layers)]
    pair = {(i, j): [[rng.uniform(0, 0.5) for _ in range(k_max + 1)] for _ in range(k_max + 1)]
            for i in range(num_layers) for j in range(i + 1, num_layers)}
    return lambda b: (math.fsum(unary[i][k] - 0.4 * k for i, k in enumerate(b))
                      + math.fsum(t[b[i]][b[j]] for (i, j), t in pair.items()))


@pytest.mark.parametrize("seed", range(20))
def test_greedy_is_optimal_on_separable_convex_objectives(seed):
    """Marginal-gain greedy is exact for separable convex losses with equal layer costs."""
    rng = random.Random(seed)
    num_layers, k_max = rng.choice([(2, 5), (3, 4), (4, 3)])
    fn = separable_convex(rng, num_layers, k_max)
    cost = [rng.choice([0.5, 2.0, 3.0])] * num_layers
    max_cost = cost[0] * rng.randint(num_layers, num_layers * k_max)
    result = search_allocation(fn, num_layers, 1, k_max, cost, max_cost, greedy_start="min",
                               refinement=False)
    best_loss, _, best = brute_force(fn, num_layers, 1, k_max, cost, max_cost)
    assert result.loss == pytest.approx(best_loss, abs=1e-12), (result.budgets, best)
    assert result.cost <= max_cost


def test_refinement_finds_what_greedy_misses():
    """Layer 1 pays off only at k=3 (increasing returns), so greedy spends on layer 0 first;
    one swap then reaches the optimum, which no uniform budget and no greedy step visits."""
    layer0 = {1: 0.0, 2: -1.0, 3: -1.4}
    layer1 = {1: 0.0, 2: -0.5, 3: -3.0}
    fn = Counted(lambda b: layer0[b[0]] + layer1[b[1]] + 0.05 * b[0] * b[1])
    greedy = search_allocation(fn, 2, 1, 3, [1.0, 1.0], 4.0, refinement=False)
    full = search_allocation(fn, 2, 1, 3, [1.0, 1.0], 4.0)
    assert greedy.budgets == (2, 2) and [e.budgets for e in greedy.path] == [(2, 1), (2, 2)]
    assert full.budgets == (1, 3) == brute_force(fn, 2, 1, 3, [1.0, 1.0], 4.0)[2]
    assert full.loss < greedy.loss and full.path[-1].kind == REFINE
    assert full.best_uniform.budgets == (2, 2)
    assert [e.kind for e in full.history] == [UNIFORM, UNIFORM, GREEDY, GREEDY, GREEDY, REFINE]


@pytest.mark.parametrize("seed", range(30))
def test_random_objectives_respect_the_budget_and_beat_uniform(seed):
    rng = random.Random(seed)
    num_layers, k_min, k_max = rng.choice([(2, 1, 5), (3, 1, 4), (4, 2, 4), (5, 1, 3)])
    fn = Counted(non_separable(rng, num_layers, k_max))
    cost = [rng.choice([1.0, 1.5, 2.0, 3.0]) for _ in range(num_layers)]
    space = SearchSpace(k_min, k_max, tuple(cost), 1.0)
    max_cost = rng.uniform(k_min * sum(cost), k_max * sum(cost))
    space = SearchSpace(k_min, k_max, tuple(cost), max_cost)
    result = search_allocation(fn, num_layers, k_min, k_max, cost, max_cost)
    greedy = search_allocation(fn, num_layers, k_min, k_max, cost, max_cost, refinement=False)

    assert all(space.fits(e.budgets) for e in result.history)
    assert result.cost == space.cost(result.budgets) <= max_cost
    assert result.loss == fn.fn(result.budgets) == min(e.loss for e in result.history)
    uniform = [fn.fn(b) for b in space.uniform()]
    assert result.best_uniform.loss == min(uniform) >= result.loss
    assert result.loss <= greedy.loss
    assert brute_force(fn.fn, num_layers, k_min, k_max, cost, max_cost)[0] <= result.loss
    # A local optimum: no single move or swap that fits improves on it.
    neighbours = [m for d in (1, -1) for _, m in space.moves(result.budgets, d)]
    neighbours += [m for *_, m in space.swaps(result.budgets)]
    assert all(fn.fn(m) >= result.loss for m in neighbours)
    # Memoised: each allocation evaluated once per search (two searches here).
    assert max(fn.calls.values()) <= 2 and sum(fn.calls.values()) == result.evaluations + greedy.evaluations
    assert len({e.budgets for e in result.history}) == result.evaluations == len(result.history)


def test_each_allocation_is_evaluated_once():
    rng = random.Random(7)
    fn = Counted(non_separable(rng, 4, 4))
    result = search_allocation(fn, 4, 1, 4, [1.0, 2.0, 1.0, 3.0], 16.0)
    assert set(fn.calls.values()) == {1} and len(fn.calls) == result.evaluations > 10


def test_path_is_a_chain_of_improving_moves():
    rng = random.Random(3)
    fn = non_separable(rng, 4, 4)
    result = search_allocation(fn, 4, 1, 4, [1.0] * 4, 11.0)
    losses = [e.loss for e in result.path]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)
    for before, after in zip(result.path, result.path[1:]):
        assert 1 <= sum(abs(a - b) for a, b in zip(before.budgets, after.budgets)) <= 2


def test_max_evaluations_stops_early_with_the_best_so_far():
    rng = random.Random(1)
    fn = Counted(non_separable(rng, 5, 4))
    seen = []
    result = search_allocation(fn, 5, 1, 4, [1.0] * 5, 12.0, max_evaluations=9,
                               on_evaluation=lambda n, e: seen.append((n, e)))
    assert result.exhausted and result.evaluations == 9 == sum(fn.calls.values())
    assert [n for n, _ in seen] == list(range(1, 10)) and [e for _, e in seen] == result.history
    assert result.loss == min(e.loss for e in result.history)
    assert not search_allocation(fn, 5, 1, 4, [1.0] * 5, 12.0).exhausted


def test_many_layers_few_evaluations_start_from_the_best_uniform_budget():
    """24 layers: an ascent from k=1 takes ~2900 evaluations, more than the cap, so the search
    starts from the best uniform budget and trades experts between layers instead."""
    rng = random.Random(0)
    weights = [rng.uniform(0.5, 2.0) for _ in range(24)]
    fn = lambda b: math.fsum(w / k ** 0.7 for w, k in zip(weights, b))  # noqa: E731
    args = (fn, 24, 1, 16, [1.0] * 24, 6.0 * 24)
    exact = search_allocation(*args, greedy_start="min", refinement=False)  # separable convex
    assert exact.evaluations > 2000
    auto = search_allocation(*args, max_evaluations=1000)
    from_min = search_allocation(*args, max_evaluations=1000, greedy_start="min")
    assert from_min.exhausted and from_min.loss == from_min.best_uniform.loss  # ascent cut short
    assert not auto.exhausted and auto.evaluations < 1000
    assert auto.loss == pytest.approx(exact.loss, abs=1e-9)
    assert auto.loss < auto.best_uniform.loss - 0.1
    assert all(e.kind == REFINE for e in auto.path) and sum(auto.budgets) == 6 * 24
    few = search_allocation(*args, max_evaluations=150)  # still better than uniform
    assert few.exhausted and few.loss < few.best_uniform.loss - 0.05


def test_min_improvement_stops_buying_small_gains():
    fn = lambda b: 10.0 - 0.001 * sum(b)  # noqa: E731  each extra expert helps a little
    cheap = search_allocation(fn, 3, 1, 4, [1.0] * 3, 12.0, min_improvement=0.01, refinement=False)
    assert cheap.path == []
    # ...but the uniform budgets are always evaluated, so the best of them still wins.
    assert cheap.budgets == (4, 4, 4)


def test_non_finite_losses_are_never_chosen():
    fn = lambda b: math.nan if b[0] == 3 else -float(sum(b))  # noqa: E731
    result = search_allocation(fn, 2, 1, 3, [1.0, 1.0], 6.0)
    assert result.budgets[0] != 3 and result.budgets == (2, 3)
    assert any(e.loss == math.inf for e in result.history)


def test_greedy_prefers_loss_per_flop():
    """Layer 1 lowers the loss more per step, but layer 0 more per FLOP."""
    f = MemoObjective(lambda b: -1.0 * b[0] - 1.5 * b[1], SearchSpace(1, 3, (1.0, 2.0), 5.0), None)
    path = list(greedy_ascent(f, (1, 1)))
    assert [e.budgets for e in path] == [(2, 1), (3, 1)]


def test_uniform_budgets_that_fit():
    space = SearchSpace(1, 6, (1.0, 2.0, 3.0), 6.0 * 3 + 1e-12)
    assert space.uniform() == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    # A budget equal to the cost up to float rounding still fits.
    assert SearchSpace(1, 3, (0.1,) * 3, 0.1 * 3 * 2 * (1 - 1e-12)).uniform()[-1] == (2, 2, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=0), r"num_layers must be an int >= 1, got 0"),
        (dict(k_min=0), r"k_min must be an int >= 1, got 0"),
        (dict(k_max=1, k_min=2), r"k_max must be an int >= k_min \(2\), got 1"),
        (dict(layer_cost=[1.0]), r"layer_cost must have one entry per layer \(2\), got 1"),
        (dict(layer_cost=[1.0, 0.0]), r"layer_cost must be finite and > 0"),
        (dict(max_cost=math.nan), r"max_cost must be finite and > 0"),
        (dict(max_cost=3.0, k_min=2),
         r"max_cost \(3\) is below the cost of k_min=2 in every layer \(4\); allowed: >= 4"),
        (dict(max_evaluations=2), r"max_evaluations must be >= 3 \(the uniform budgets 1..3"),
        (dict(min_improvement=-1.0), r"min_improvement must be finite and >= 0"),
        (dict(greedy_start="max"), r"greedy_start must be one of \('auto', 'min', 'uniform'\)"),
    ],
)
def test_bad_inputs_name_the_parameter_and_range(kwargs, message):
    args = dict(num_layers=2, k_min=1, k_max=4, layer_cost=[1.0, 1.0], max_cost=6.0,
                max_evaluations=None, min_improvement=0.0, greedy_start="auto")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        validate_search(**args)
    with pytest.raises(ValueError, match=message):
        search_allocation(lambda b: 0.0, **args)


def test_error_messages_can_use_flag_names():
    with pytest.raises(ValueError, match=r"--expert-flops-budget \(3\) is below the cost of "
                                         r"--min-active-experts=2"):
        validate_search(2, 2, 4, [1.0, 1.0], 3.0,
                        names={"max_cost": "--expert-flops-budget", "k_min": "--min-active-experts"})


# ---------------------------------------------------------------------------------------------
# emoe-search-budget-allocation on a tiny trained checkpoint (2 MoE layers, 4 experts, top-2).
# ---------------------------------------------------------------------------------------------
TOOL = console_script("emoe-search-budget-allocation")


@pytest.fixture(scope="module")
def checkpoint(emoe_checkpoint):
    """The session's tiny EMoE checkpoint (4 steps of the training entry)."""
    return emoe_checkpoint.path


def _search(checkpoint, output, *flags):
    command = [TOOL, "--load", str(checkpoint), "--output", str(output), *flags]
    return subprocess.run(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, check=False)


def _val_loss(evaluator, budgets):
    return evaluator.evaluate(tuple(budgets)).val_loss


@pytest.mark.slow
def test_cli_writes_an_allocation_within_budget_that_reproduces(tmp_path, checkpoint):
    from megatron_emoe.evaluation.checkpoint_eval import EvalOptions, run_on_ranks

    output = tmp_path / "allocation.json"
    proc = _search(checkpoint, output, "--nproc", "2", "--expert-model-parallel-size", "2",
                   "--expert-flops-budget-ratio", "1.25", "--max-evaluations", "7")
    assert proc.returncode == 0, proc.stdout[-3000:]
    record = json.loads(output.read_text())
    allocation = record["allocation"]
    assert len(allocation) == 2 and all(1 <= k <= 4 for k in allocation)  # default k_max 3k -> 4
    assert record["moe_active_experts_flag"] == "--moe-active-experts " + " ".join(map(str, allocation))
    budget = record["budget"]
    per_expert = budget["layer_expert_flops"]
    assert budget["expert_flops"] == pytest.approx(1.25 * 2 * sum(per_expert))
    cost = sum(k * c for k, c in zip(allocation, per_expert))
    assert record["expert_flops"] == cost <= budget["expert_flops"]
    history = record["search"]["history"]
    assert 1 <= len(history) <= 7 and record["search"]["evaluations"] == len(history)
    assert all(sum(k * c for k, c in zip(h["allocation"], per_expert)) <= budget["expert_flops"]
               for h in history)
    assert record["val_loss"] == min(h["val_loss"] for h in history) <= record["best_uniform"]["val_loss"]
    assert record["best_uniform"]["active_experts"] in (1, 2)  # uniform 3 costs 1.5x training
    assert record["result"]["active_experts_per_layer"] == pytest.approx(allocation)
    assert proc.stdout.count("expert FLOPs/token") >= len(history)  # one progress line each
    # A fresh evaluator, at another layout, gives the same loss for the written allocation.
    options = EvalOptions(load=str(checkpoint), nproc=1).validate()
    assert run_on_ranks(options, _val_loss, allocation) == pytest.approx(record["val_loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--expert-flops-budget-ratio", "0"], "--expert-flops-budget-ratio must be a finite number > 0"),
        (["--expert-flops-budget", "-5"], "--expert-flops-budget must be a finite number > 0"),
        (["--expert-flops-budget-ratio", "1", "--min-active-experts", "0"],
         "--min-active-experts must be >= 1"),
        (["--expert-flops-budget-ratio", "1", "--min-active-experts", "3", "--max-active-experts", "2"],
         r"--max-active-experts must be >= --min-active-experts \(3\)"),
        (["--expert-flops-budget-ratio", "1", "--max-active-experts", "5"],
         r"--max-active-experts must be in \[1, 4\]"),
        (["--expert-flops-budget-ratio", "1", "--min-active-experts", "5"],
         r"--min-active-experts must be in \[1, 4\]"),
        (["--expert-flops-budget-ratio", "0.25"],
         (r"--expert-flops-budget-ratio is below the cost of --min-active-experts=1 in every MoE "
          r"layer; allowed: >= 0.5 ")),
        (["--expert-flops-budget", "100"], r"--expert-flops-budget is below the cost of"),
        (["--expert-flops-budget-ratio", "1", "--max-evaluations", "1"],
         r"--max-evaluations must be >= 2 \(the uniform budgets 1..2"),
        (["--expert-flops-budget-ratio", "1", "--max-evaluations", "0"], "--max-evaluations must be >= 1"),
        (["--expert-flops-budget-ratio", "1", "--nproc", "3", "--expert-model-parallel-size", "2"],
         "--expert-model-parallel-size"),
    ],
)
def test_cli_bad_flags_exit_2_before_building(tmp_path, checkpoint, capsys, flags, message):
    err = usage_error(tool_main, ["--load", str(checkpoint), "--output", str(tmp_path / "a.json"), *flags],
                      capsys)
    assert re.search(message, err), err
    assert not (tmp_path / "a.json").exists()


@pytest.mark.slow
def test_cli_refuses_to_overwrite_and_needs_one_budget(tmp_path, checkpoint, capsys):
    existing = tmp_path / "a.json"
    existing.write_text("{}")
    err = usage_error(tool_main, ["--load", str(checkpoint), "--output", str(existing),
                                  "--expert-flops-budget-ratio", "1"], capsys)
    assert "--output" in err and existing.read_text() == "{}"
    for flags in ([], ["--expert-flops-budget-ratio", "1", "--expert-flops-budget", "1e6"]):
        # argparse: exactly one of the two
        err = usage_error(tool_main, ["--load", str(checkpoint), "--output", str(tmp_path / "b.json"),
                                      *flags], capsys)
        assert "--expert-flops-budget" in err
    err = usage_error(tool_main, ["--load", str(tmp_path), "--output", str(tmp_path / "b.json"),
                                  "--expert-flops-budget-ratio", "1"], capsys)
    assert "--load" in err
