"""The router's losses when k varies: Megatron's load-balancing losses stay normalised (Σ f_i = 1)
at every micro-batch, capacity follows the budgets drawn, and Top-k trains with L_HR.

Each test runs one real gloo rank in this process, so Megatron's loss functions can be watched.
"""

import inspect
import math

import pytest
import torch
from distributed import run_distributed_test
from megatron.core.transformer.moe import router as megatron_router
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

import builders
from megatron_emoe import ElasticMoEConfig, routing
from megatron_emoe import router as elastic_router

BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss")
VARYING_K = {
    "layer": dict(config={}, elastic=ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 4), mmoe_sample_level="layer")),
    "token": dict(config=dict(moe_token_dispatcher_type="allgather"), elastic=ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 4), mmoe_sample_level="token")),
}


def _watch(monkeypatch, module, name, record):
    """Call `record(arguments)` on every call of `module.name`, then the real function."""
    original = getattr(module, name)
    signature = inspect.signature(original)

    def watched(*args, **kwargs):
        record(signature.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, watched)


def _fraction_sums(rank, balancing, level, sums):
    setting = VARYING_K[level]
    config = builders.moe_config(moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=1e-2,
                                 **setting["config"])
    layer = builders.moe_layer(config, setting["elastic"])
    maps = builders.record_routing(layer.router)
    layer.router.begin_step(0)
    for microbatch in range(6):
        out, _ = layer(builders.inputs(microbatch, config.hidden_size).requires_grad_())
        out.square().sum().backward()
    if level == "layer":
        assert len({int(m.sum(-1).unique()) for m in maps}) == 2, "k never varied"


@pytest.mark.parametrize("level", sorted(VARYING_K))
@pytest.mark.parametrize("balancing", BALANCING)
def test_load_balancing_fractions_sum_to_one_when_k_varies(balancing, level, monkeypatch):
    """f_i = tokens_i / (T k) sums to 1 over experts (per sequence for seq-aux) whatever k each
    micro-batch or token drew; Megatron's global loss divided the step's counts by the current k."""
    sums = []

    def record(arguments):
        groups = arguments["tokens_per_expert"].numel() // arguments["num_experts"]
        total = arguments["total_num_tokens"] * arguments["topk"] * groups
        sums.append(float(arguments["tokens_per_expert"].sum() / total))

    for module in (megatron_router, elastic_router):
        _watch(monkeypatch, module, "switch_load_balancing_loss_func", record)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    run_distributed_test(_fraction_sums, world_size=1, args=(balancing, level, sums))
    assert len(sums) == 6
    assert sums == pytest.approx([1.0] * 6, rel=1e-5)


def _capacity(rank, calls):
    config = builders.moe_config(moe_token_dispatcher_type="allgather", moe_expert_capacity_factor=1.0)
    layer = builders.moe_layer(config, ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 4), mmoe_sample_level="token"))
    maps = builders.record_routing(layer.router)
    out, _ = layer(builders.inputs(0, config.hidden_size, seq=64, batch=4))
    out.sum().backward()
    calls.append(maps[-1])


def test_capacity_follows_the_per_token_budgets_drawn(monkeypatch):
    """Capacity is sized from the experts per token actually drawn (their mean), not k_max."""
    calls = []
    _watch(monkeypatch, elastic_router, "apply_router_token_dropping",
           lambda arguments: calls.append(arguments))
    run_distributed_test(_capacity, world_size=1, args=(calls,))
    arguments, kept = calls
    drawn = arguments["routing_map"]
    tokens, experts = drawn.shape
    mean_k = drawn.sum().item() / tokens
    assert arguments["router_topk"] == pytest.approx(mean_k) and 1 < mean_k < 4
    capacity = math.ceil(tokens * mean_k / experts * arguments["capacity_factor"])
    per_expert = kept.sum(0)
    assert per_expert.max() == capacity, "the busiest experts are cut at the drawn capacity"
    assert (per_expert <= drawn.sum(0)).all()


def _topk_with_hr(rank, coeff, result):
    config = builders.moe_config()
    builders.reseed(0)
    router = builders.moe_layer(config, ElasticMoEConfig(mode="topk", hr_loss_coeff=coeff)).router
    x = builders.inputs(0, config.hidden_size)
    probs, routing_map = router(x)
    probs.sum().backward()
    result[coeff] = (probs.detach(), routing_map, router.weight.grad.clone(), router.weight.detach(), x)


def test_topk_trains_with_the_hierarchical_router_loss():
    """--emoe-hr-loss-coeff in topk mode: the same experts and gates as Megatron's top-k, and
    the router's gradient gains exactly coeff * ∂L_HR/∂W (the EMoE paper's Top-k + L_HR)."""
    coeff, result = 0.5, {}
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    for c in (0.0, coeff):
        run_distributed_test(_topk_with_hr, world_size=1, args=(c, result))
    (probs0, map0, grad0, weight, x), (probs1, map1, grad1, _, _) = result[0.0], result[coeff]
    assert torch.equal(map0, map1) and torch.equal(probs0, probs1)
    weight = weight.clone().requires_grad_()
    logits = x.reshape(-1, x.shape[-1]) @ weight.t()
    routing.hierarchical_router_loss(torch.softmax(logits, dim=-1)).backward()
    torch.testing.assert_close(grad1 - grad0, coeff * weight.grad, rtol=1e-4, atol=1e-7)
    assert not torch.equal(grad0, grad1)
