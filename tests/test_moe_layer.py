"""The elastic router inside Megatron-Core's real MoELayer and GPTModel, in real gloo processes."""

import dataclasses

import pytest
import torch
from distributed import run_distributed_test

import builders
from megatron_emoe import ElasticMoEConfig, elastic_routers, get_active_experts, set_active_experts
from megatron_emoe.routing import selection_scores

TOKENS = 24  # per rank, as [seq 12, batch 2]


# ---------------------------------------------------------------------------------------------
# Outputs at k' = 1, k, 2k, 3k against a dense per-expert reference; EMoE training constraints.
# ---------------------------------------------------------------------------------------------
def _layer_matches_reference(rank, dispatcher):
    config = builders.moe_config(moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2)
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
    x = builders.inputs(rank, config.hidden_size)
    fc1, fc2 = builders.all_expert_weights(layer)
    router_weight = layer.router.weight.detach()
    flat = x.reshape(-1, config.hidden_size)

    layer.eval()
    maps = builders.record_routing(layer.router)
    for k in (1, 2, 4, 6):
        layer.router.set_budget(k)
        with torch.no_grad():
            out, _ = layer(x)
        expected = builders.dense_reference(flat, router_weight, fc1, fc2, k)
        torch.testing.assert_close(out.reshape(-1, config.hidden_size), expected, rtol=1e-5, atol=1e-5)
        assert (maps[-1].sum(-1) == k).all()
        assert layer.token_dispatcher.config.moe_router_topk == k
    assert config.moe_router_topk == 2, "the shared config must not change"

    # Training: exactly k experts per token, all inside the top-k_ideal pool; grads flow.
    layer.train()
    out, _ = layer(x)
    out.square().sum().backward()
    routed = maps[-1]
    assert (routed.sum(-1) == 2).all()
    pool = (flat @ router_weight.t()).topk(4, dim=-1).indices
    in_pool = torch.zeros_like(routed).scatter(1, pool, True)
    assert not (routed & ~in_pool).any()
    assert layer.router.weight.grad.abs().sum() > 0
    for expert in layer.experts.local_experts:
        assert torch.isfinite(expert.linear_fc1.weight.grad).all()


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("ep", [1, 2])
def test_layer_matches_dense_reference(dispatcher, ep):
    run_distributed_test(_layer_matches_reference, world_size=ep, ep=ep, args=(dispatcher,))


# ---------------------------------------------------------------------------------------------
# Plain top-k mode is Megatron's TopKRouter, exactly.
# ---------------------------------------------------------------------------------------------
ROUTER_VARIANTS = {
    "softmax": {},
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid_bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
    ),
    "group_limited": dict(moe_router_num_groups=4, moe_router_group_topk=2),
}


def _same_as_megatron_topk(rank):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_emoe import ElasticRouter

    for name, overrides in ROUTER_VARIANTS.items():
        config = builders.moe_config(moe_aux_loss_coeff=1e-2, **overrides)
        reference = TopKRouter(config=config, pg_collection=get_default_pg_collection())
        for mode in ("topk", "emoe"):
            elastic = ElasticMoEConfig(mode=mode, k_ideal=2)  # k_ideal == k: no sampling
            router = ElasticRouter(config=config, elastic=elastic)
            router.load_state_dict(reference.state_dict())
            if reference.expert_bias is not None:
                bias = torch.linspace(-0.2, 0.2, config.num_moe_experts)
                reference.expert_bias.copy_(bias)
                router.expert_bias.copy_(bias)
            for training in (True, False):
                router.train(training)
                reference.train(training)
                x = builders.inputs(rank, config.hidden_size).requires_grad_()
                ours, ref = router(x), reference(x)
                for a, b in zip(ours, ref):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}/{mode}")


def test_topk_mode_is_megatron_topk_router():
    run_distributed_test(_same_as_megatron_topk, world_size=1)


# ---------------------------------------------------------------------------------------------
# Gradients through the gates and through L_HR.
# ---------------------------------------------------------------------------------------------
def _router_gradients(rank):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_emoe.routing import hierarchical_router_loss

    config = builders.moe_config()
    coeff = 0.3
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=coeff))
    x = builders.inputs(rank, config.hidden_size)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    # 1. Main loss only reaches the router through the gates (HR loss off for this pass).
    layer.router.elastic = dataclasses.replace(layer.router.elastic, hr_loss_coeff=0.0)
    out, _ = layer(x)
    out.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0, "no gradient through the gates"

    # 2. With the main loss multiplied by 0, the router gradient is exactly d(coeff * L_HR)/dW.
    layer.zero_grad()
    layer.router.weight.grad = None
    layer.router.elastic = dataclasses.replace(layer.router.elastic, hr_loss_coeff=coeff)
    out, _ = layer(x)
    (out.sum() * 0).backward()
    weight = layer.router.weight.detach().clone().requires_grad_()
    flat = x.reshape(-1, config.hidden_size)
    (coeff * hierarchical_router_loss(torch.softmax(flat @ weight.t(), -1))).backward()
    torch.testing.assert_close(layer.router.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)

    # 3. The HR loss is logged in Megatron's MoE metrics tracker.
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    assert "hierarchical_router_loss" in get_moe_metrics_tracker()._metrics


def test_router_gradients_through_gates_and_hr_loss():
    run_distributed_test(_router_gradients, world_size=1)


# ---------------------------------------------------------------------------------------------
# Activation recompute replays the same sampled experts.
# ---------------------------------------------------------------------------------------------
def _recompute_replays(rank, mode):
    grads, routings = {}, {}
    for recompute in (False, True):
        overrides = dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}
        config = builders.moe_config(moe_aux_loss_coeff=1e-2, **overrides)
        builders.reseed(0)
        elastic = ElasticMoEConfig(mode=mode, k_ideal=6, mmoe_k_choices=(1, 2, 3, 4))
        layer = builders.moe_layer(config, elastic)
        maps = builders.record_routing(layer.router)
        x = builders.inputs(rank, config.hidden_size).requires_grad_()
        torch.manual_seed(1)
        out, _ = layer(x)
        out.square().sum().backward()
        grads[recompute] = [p.grad.clone() for p in layer.parameters()]
        routings[recompute] = maps
    assert len(routings[True]) == 2, "recompute should run the router twice"
    assert torch.equal(routings[True][0], routings[True][1]), "recompute changed the experts"
    assert torch.equal(routings[True][0], routings[False][0])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["emoe", "mmoe"])
def test_recompute_replays_the_same_experts(mode):
    run_distributed_test(_recompute_replays, world_size=1, args=(mode,))


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: ranks that route the same tokens choose the same experts.
# ---------------------------------------------------------------------------------------------
def _tp_agreement(rank):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    config = builders.moe_config(sequence_parallel=False)
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=6))
    x = builders.inputs(0, config.hidden_size)  # the same tokens on both TP ranks
    torch.manual_seed(1000 + rank)  # deliberately different RNG states
    layer.router.train()
    _, routing_map = layer.router(x)
    gathered = [torch.empty_like(routing_map) for _ in range(group.size())]
    torch.distributed.all_gather(gathered, routing_map, group=group)
    assert torch.equal(gathered[0], gathered[1]), "TP ranks chose different experts"
    assert (routing_map.sum(-1) == 2).all()

    # A whole layer in eval at k' = 2k with the same tokens gives the same output on both ranks.
    layer.eval()
    layer.router.set_budget(4)
    with torch.no_grad():
        out, _ = layer(x)
    outs = [torch.empty_like(out) for _ in range(group.size())]
    torch.distributed.all_gather(outs, out, group=group)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_tensor_parallel_ranks_agree():
    run_distributed_test(_tp_agreement, world_size=2, tp=2)


# ---------------------------------------------------------------------------------------------
# GPTModel: two training steps in every mode at EP=2, then per-layer budgets at inference.
# ---------------------------------------------------------------------------------------------
MODES = {
    "topk": ElasticMoEConfig(mode="topk"),
    "emoe": ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=1e-3),
    "mmoe": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3), mmoe_sample_level="layer"),
}


def _gpt_two_steps_then_budgets(rank):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    for name, elastic in MODES.items():
        builders.reseed(0)
        config = builders.moe_config(moe_aux_loss_coeff=1e-2)
        model = builders.gpt_model(config, elastic)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        tokens, positions, mask, labels = builders.gpt_batch(seed=rank)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(tokens, positions, mask, labels=labels).float().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))), f"{name}: {losses}"

    # Per-layer budgets on the last (M-MoE) model: each layer routes to its own k'.
    model.eval()
    maps = {r.layer_number: builders.record_routing(r) for r in elastic_routers(model)}
    set_active_experts(model, [1, 3])
    assert get_active_experts(model) == [1, 3]
    with torch.no_grad():
        per_layer = model(tokens, positions, mask)
    assert [int(maps[n][-1].sum(-1).unique()) for n in (1, 2)] == [1, 3]
    set_active_experts(model, 3)
    with torch.no_grad():
        uniform = model(tokens, positions, mask)
    assert not torch.allclose(per_layer, uniform)
    set_active_experts(model, None)
    assert get_active_experts(model) == [None, None]


def test_gpt_model_trains_in_every_mode_and_takes_per_layer_budgets():
    run_distributed_test(_gpt_two_steps_then_budgets, world_size=2, ep=2)


# ---------------------------------------------------------------------------------------------
# M-MoE per-token budgets with the allgather dispatcher.
# ---------------------------------------------------------------------------------------------
def _per_token_budgets(rank):
    config = builders.moe_config(moe_token_dispatcher_type="allgather")
    elastic = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 3), mmoe_sample_level="token")
    layer = builders.moe_layer(config, elastic)
    maps = builders.record_routing(layer.router)
    x = builders.inputs(rank, config.hidden_size)
    out, _ = layer(x)
    out.sum().backward()
    per_token = maps[-1].sum(-1)
    assert set(per_token.unique().tolist()) == {1, 3}
    # Each token's experts are its own top-k_t.
    logits = x.reshape(-1, config.hidden_size) @ layer.router.weight.detach().t()
    ranks = logits.argsort(-1, descending=True).argsort(-1)
    assert ((ranks < per_token[:, None]) == maps[-1]).all()


def test_mmoe_per_token_budgets_with_allgather():
    run_distributed_test(_per_token_budgets, world_size=2, ep=2)


def test_selection_scores_used_by_router_match_megatron_ranking():
    """Sanity link between the pure maths and Megatron's score functions."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-1, 1, 8)
    _, ref_map = topk_routing_with_score_function(logits, 3, score_function="sigmoid", expert_bias=bias)
    ours = selection_scores(logits, "sigmoid", expert_bias=bias).topk(3, -1).indices
    assert torch.equal(torch.zeros_like(ref_map).scatter(1, ours, True), ref_map)


# ---------------------------------------------------------------------------------------------
# Capacity factor: token dropping and pad-to-capacity at every budget.
# ---------------------------------------------------------------------------------------------
def _capacity(rank):
    import math

    for pad in (False, True):
        config = builders.moe_config(
            moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=pad,
            moe_token_drop_policy="probs",
        )
        layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
        maps = builders.record_routing(layer.router)
        x = builders.inputs(rank, config.hidden_size)
        layer.train()
        out, _ = layer(x)
        out.sum().backward()
        layer.eval()
        for k in (1, 4):
            layer.router.set_budget(k)
            with torch.no_grad():
                layer(x)
            capacity = math.ceil(TOKENS * k / config.num_moe_experts * 1.0)
            per_expert = maps[-1].sum(0)
            # With padding every expert gets exactly `capacity` tokens; the dispatcher sized its
            # buffers from the same k, or the forward above would have failed.
            assert (per_expert == capacity).all() if pad else (per_expert <= capacity).all()
            assert layer.token_dispatcher.config.moe_router_topk == k


def test_capacity_factor_and_pad_to_capacity_follow_the_budget():
    run_distributed_test(_capacity, world_size=1)


# ---------------------------------------------------------------------------------------------
# Multi-token prediction layers route elastically too.
# ---------------------------------------------------------------------------------------------
def _mtp(rank):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_mtp_block_spec,
    )

    from megatron_emoe import with_elastic_router

    config = builders.moe_config(mtp_num_layers=1, mtp_loss_scaling_factor=0.1)
    elastic = ElasticMoEConfig(mode="emoe", k_ideal=4)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=with_elastic_router(block, elastic),
        mtp_block_spec=with_elastic_router(mtp, elastic),
        vocab_size=builders.VOCAB,
        max_sequence_length=builders.SEQ,
    )
    routers = elastic_routers(model)
    assert [r.is_mtp_layer for r in routers] == [False, False, True]
    tokens, positions, mask, labels = builders.gpt_batch(seed=rank)
    model(tokens, positions, mask, labels=labels).float().mean().backward()
    assert routers[-1].weight.grad.abs().sum() > 0, "MTP router got no gradient"

    model.eval()
    set_active_experts(model, [1, 2, 3])
    assert get_active_experts(model) == [1, 2, 3]
    set_active_experts(model, [1, 2])  # MTP takes the last decoder layer's budget
    assert get_active_experts(model) == [1, 2, 2]
    maps = builders.record_routing(routers[-1])
    with torch.no_grad():
        model(tokens, positions, mask, labels=labels)
    assert (maps[-1].sum(-1) == 2).all()


def test_mtp_layers_route_elastically():
    run_distributed_test(_mtp, world_size=1)


# ---------------------------------------------------------------------------------------------
# Token-adaptive top-p budgets at inference (allgather dispatcher; alltoall refuses them).
# ---------------------------------------------------------------------------------------------
def _top_p_budgets(rank):
    from megatron_emoe import TopP

    config = builders.moe_config(moe_token_dispatcher_type="allgather")
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
    maps = builders.record_routing(layer.router)
    x = builders.inputs(rank, config.hidden_size)
    flat = x.reshape(-1, config.hidden_size)
    fc1, fc2 = builders.all_expert_weights(layer)
    router_weight = layer.router.weight.detach()
    probs = (flat @ router_weight.t()).softmax(-1)
    layer.eval()
    seen = set()
    for p, k_max in ((0.3, 4), (0.6, 3), (0.99, 8), (1.0, 2)):
        layer.router.set_budget(TopP(p, k_max))
        with torch.no_grad():
            out, _ = layer(x)
        per_token = maps[-1].sum(-1)
        # Reference: the fewest best experts whose probability mass reaches p, capped at k_max.
        ranked = probs.sort(-1, descending=True).values
        needed = ((ranked.cumsum(-1) - ranked) < p).sum(-1).clamp(max=k_max)
        assert torch.equal(per_token, needed), (p, per_token, needed)
        ranks = probs.argsort(-1, descending=True).argsort(-1)
        assert ((ranks < per_token[:, None]) == maps[-1]).all()
        out = out.reshape(-1, config.hidden_size)
        for k in per_token.unique().tolist():
            rows = per_token == k
            expected = builders.dense_reference(flat[rows], router_weight, fc1, fc2, k)
            torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
        seen.update(per_token.unique().tolist())
    assert len(seen) >= 3, "the budgets should vary between tokens"

    alltoall = builders.moe_layer(builders.moe_config(), ElasticMoEConfig(mode="emoe", k_ideal=4))
    with pytest.raises(ValueError, match="allgather"):
        alltoall.router.set_budget(TopP(0.5, 4))


def test_top_p_budgets_vary_per_token_and_match_dense_reference():
    run_distributed_test(_top_p_budgets, world_size=2, ep=2)
