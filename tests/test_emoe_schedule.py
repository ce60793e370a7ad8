"""EMoE training schedules: the k_ideal ramp (--emoe-k-ideal-start/--emoe-k-ideal-ramp-iters)
and Top-k first, then EMoE (--emoe-start-iter), in the pure maths, the config, the Megatron
router (one gloo process on CPU) and the transformers gate."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from distributed import run_distributed_test
from transformers import AutoModelForCausalLM

import builders
from megatron_emoe import ElasticMoEConfig, ElasticRouter, set_training_step
from megatron_emoe.hf import elasticize
from megatron_emoe.hf import set_training_step as set_hf_training_step
from megatron_emoe.routing import scheduled_k_ideal
from tests.conversion_models import hf_config

# k = 2 of 8 experts; Top-k before step 3, then k_ideal 2 -> 8 over 4 steps: 2, 4, 5, 7, 8, 8...
SCHEDULED = ElasticMoEConfig(mode="emoe", k_ideal=8, k_ideal_start=2, k_ideal_ramp_iters=4,
                             emoe_start_iter=3, hr_loss_coeff=1e-3)
TOPK = ElasticMoEConfig(mode="topk", hr_loss_coeff=1e-3)
POOLS = {3: 2, 4: 4, 5: 5, 6: 7, 7: 8, 50: 8}  # step -> k_ideal of SCHEDULED at k = 2


# ---------------------------------------------------------------------------------------------
# The pure schedule and the config's reading of it.
# ---------------------------------------------------------------------------------------------
def test_schedule_widens_and_narrows_linearly_rounding_halves_up():
    assert [scheduled_k_ideal(s, 2, 8, 4) for s in range(6)] == [2, 4, 5, 7, 8, 8]
    assert [scheduled_k_ideal(s, 8, 2, 4) for s in range(6)] == [8, 7, 5, 4, 2, 2]
    # 2.5 -> 3 in both directions, where Python's round() would give 2
    assert scheduled_k_ideal(1, 2, 3, 2) == 3 and scheduled_k_ideal(1, 3, 2, 2) == 3
    assert scheduled_k_ideal(0, 5, 5, 1) == scheduled_k_ideal(9, 5, 5, 1) == 5


def test_schedule_begins_at_its_offset_and_clamps_outside_the_ramp():
    assert [scheduled_k_ideal(s, 2, 8, 4, begin=10) for s in (0, 9, 10, 11, 13, 14, 1000)] == [
        2, 2, 2, 4, 7, 8, 8]
    assert scheduled_k_ideal(-5, 8, 2, 4) == 8
    with pytest.raises(ValueError, match="ramp_iters must be >= 1"):
        scheduled_k_ideal(0, 2, 8, 0)


def test_schedule_is_exact_round_half_up_of_the_line():
    for start in range(1, 7):
        for final in range(1, 7):
            for ramp in range(1, 8):
                for step in range(-2, ramp + 3):
                    done = min(max(step, 0), ramp)
                    line = start + Fraction(final - start) * done / ramp
                    expected = math.floor(line + Fraction(1, 2))
                    assert scheduled_k_ideal(step, start, final, ramp) == expected


def test_config_reads_the_schedule_and_the_topk_phase():
    assert [SCHEDULED.k_ideal_at(s, 2) for s in POOLS] == list(POOLS.values())
    assert SCHEDULED.k_ideal_at(None, 2) == 8  # no training loop: the final k_ideal
    assert [SCHEDULED.routes_topk_at(s) for s in (None, 0, 2, 3, 100)] == [
        False, True, True, False, False]
    factor = ElasticMoEConfig(mode="emoe", k_ideal_factor=3, k_ideal_start=10, k_ideal_ramp_iters=2)
    assert [factor.k_ideal_at(s, 2) for s in (0, 1, 2)] == [10, 8, 6]  # narrows to 3 * topk
    plain = ElasticMoEConfig(mode="emoe", k_ideal=6)
    assert plain.k_ideal_at(0, 2) == 6 and not plain.routes_topk_at(0) and plain.emoe_begin == 0
    start_zero = dataclasses.replace(plain, emoe_start_iter=0)
    assert not start_zero.routes_topk_at(0) and start_zero.k_ideal_at(0, 2) == 6
    assert TOPK.routes_topk_at(None) and TOPK.routes_topk_at(7)


# ---------------------------------------------------------------------------------------------
# The Megatron router on CPU.
# ---------------------------------------------------------------------------------------------
def _in_pool(routing_map: torch.Tensor, logits: torch.Tensor, k_ideal: int) -> torch.Tensor:
    """`[tokens]`: whether every routed expert lies within the token's top-k_ideal logits."""
    pool = torch.zeros_like(routing_map).scatter(1, logits.topk(k_ideal, dim=-1).indices, True)
    return ~(routing_map & ~pool).any(-1)


def _megatron_router_follows_the_schedule(rank):
    config = builders.moe_config(moe_aux_loss_coeff=1e-2)
    scheduled = ElasticRouter(config=config, elastic=SCHEDULED).train()
    reference = ElasticRouter(config=config, elastic=TOPK).train()
    generator = torch.Generator().manual_seed(7)
    tokens = 256

    # Before --emoe-start-iter: topk mode's routing, bit for bit, and no training key taken.
    for step in (0, 1, 2):
        set_training_step(scheduled, step)
        set_training_step(reference, step)
        assert scheduled.draws.step == step
        logits = torch.randn(64, 4, config.num_moe_experts, generator=generator, requires_grad=True)
        rng = torch.get_rng_state()
        ours = scheduled.routing(logits)
        assert torch.equal(torch.get_rng_state(), rng), "the Top-k phase took a training key"
        for a, b in zip(ours, reference.routing(logits)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")

    # From it on: EMoE, k of each token's top-k_ideal(step), with k_ideal(step) from the ramp.
    for step, k_ideal in POOLS.items():
        set_training_step(scheduled, step)
        assert scheduled.draws.step == step
        logits = torch.randn(64, 4, config.num_moe_experts, generator=generator, requires_grad=True)
        rng = torch.get_rng_state()
        _, routing_map = scheduled.routing(logits)
        logits = logits.detach()
        assert not torch.equal(torch.get_rng_state(), rng), f"step {step} took no training key"
        flat = logits.reshape(tokens, -1)
        assert (routing_map.sum(-1) == 2).all()
        assert _in_pool(routing_map, flat, k_ideal).all(), f"step {step}: outside top-{k_ideal}"
        beyond_topk = ~_in_pool(routing_map, flat, 2)
        assert beyond_topk.any() == (k_ideal > 2), f"step {step}"

    # Never told a step (a model driven outside a training loop): EMoE at the final k_ideal.
    fresh = ElasticRouter(config=config, elastic=SCHEDULED).train()
    assert fresh.draws.step is None
    logits = torch.randn(64, 4, config.num_moe_experts, generator=generator)
    _, routing_map = fresh.routing(logits)
    assert (~_in_pool(routing_map, logits.reshape(tokens, -1), 5)).any(), "not the final pool"


def test_megatron_router_routes_topk_then_samples_the_scheduled_pool():
    run_distributed_test(_megatron_router_follows_the_schedule, world_size=1)


def _recompute_replays_the_scheduled_routing(rank):
    config = builders.moe_config(recompute_granularity="selective", recompute_modules=["moe"])
    layer = builders.moe_layer(config, SCHEDULED)
    calls = builders.record_router_calls(layer.router)
    x = builders.inputs(rank, config.hidden_size, seq=32, batch=4).requires_grad_()
    for step in (1, 5):  # the Top-k phase, then the middle of the ramp
        set_training_step(layer, step)
        calls.clear()
        out, _ = layer(x)
        out.square().sum().backward()
        assert [grad for grad, _ in calls] == [False, True], "expected a forward and its recompute"
        assert torch.equal(calls[0][1], calls[1][1]), f"step {step}: recompute changed the experts"


def test_activation_recompute_replays_the_scheduled_routing():
    run_distributed_test(_recompute_replays_the_scheduled_routing, world_size=1)


# ---------------------------------------------------------------------------------------------
# The transformers gate.
# ---------------------------------------------------------------------------------------------
def test_transformers_gate_routes_topk_then_samples_the_scheduled_pool():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(hf_config("mixtral"))
    scheduled = elasticize(base, SCHEDULED).train()
    torch.manual_seed(0)
    reference = elasticize(AutoModelForCausalLM.from_config(hf_config("mixtral")), TOPK).train()
    gate, reference_gate = scheduled.model.layers[0].mlp.gate, reference.model.layers[0].mlp.gate
    assert torch.equal(gate.weight, reference_gate.weight)
    hidden = torch.randn(256, gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    for step in (0, 2):
        set_hf_training_step(scheduled, step)
        set_hf_training_step(reference, step)
        rng = torch.get_rng_state()
        ours = gate(hidden)
        assert torch.equal(torch.get_rng_state(), rng), "the Top-k phase took a training key"
        for a, b in zip(ours, reference_gate(hidden)):
            assert torch.equal(a, b), f"step {step}"
    selection = gate.elastic_state.selection
    for step, k_ideal in POOLS.items():
        set_hf_training_step(scheduled, step)
        assert selection.draws.step == step
        logits, _, chosen = gate(hidden)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        scores = selection.ranking_scores(logits, None)
        assert _in_pool(routing_map, scores, k_ideal).all(), f"step {step}: outside top-{k_ideal}"
        assert (~_in_pool(routing_map, scores, 2)).any() == (k_ideal > 2), f"step {step}"
