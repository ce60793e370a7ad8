"""Training draws at scale: recomputes route as their forwards under every schedule, ranks that
hold different tokens draw independently, and M-MoE's granularities and weights, in real gloo
processes with Megatron's own checkpointing and pipeline schedules."""

import math

import pytest
import scipy.stats
import torch
from distributed import run_distributed_test

import builders
from megatron_emoe import ElasticMoEConfig, elastic_routers, set_training_step

# Statistical tests reject at p = 0.001; agreement fractions are checked within 4 standard errors.
P_VALUE = 1e-3
SIGMAS = 4.0


def _chi_square_p(counts: dict[int, int], choices, weights) -> float:
    observed = [counts.get(k, 0) for k in choices]
    total = sum(observed)
    return scipy.stats.chisquare(observed, [w * total for w in weights]).pvalue


# ---------------------------------------------------------------------------------------------
# Several checkpointed forwards in flight before their backwards (as in a 1F1B warm-up).
# ---------------------------------------------------------------------------------------------
IN_FLIGHT = {
    "emoe": dict(config={}, elastic=ElasticMoEConfig(mode="emoe", k_ideal=6)),
    "mmoe-layer": dict(config={}, elastic=ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level="layer")),
    "mmoe-model": dict(config={}, elastic=ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level="model")),
    "mmoe-token": dict(config=dict(moe_token_dispatcher_type="allgather"), elastic=ElasticMoEConfig(
        mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level="token")),
}


def _forwards_in_flight(rank, case):
    from megatron.core import tensor_parallel

    setting = IN_FLIGHT[case]
    config = builders.moe_config(**setting["config"])
    layer = builders.moe_layer(config, setting["elastic"])
    calls = builders.record_router_calls(layer.router)
    layer.router.begin_step(0)
    outputs = []
    for microbatch in range(4):  # four forwards without grad, as checkpointing runs them ...
        x = builders.inputs(microbatch, config.hidden_size).requires_grad_()
        outputs.append(tensor_parallel.checkpoint(lambda h: layer(h)[0], False, x))
    for out in outputs:  # ... then the four backwards, each recomputing its forward
        out.square().sum().backward()
    forwards = [m for grad, m in calls if not grad]
    recomputes = [m for grad, m in calls if grad]
    assert len(forwards) == len(recomputes) == 4
    for microbatch, (forward, recompute) in enumerate(zip(forwards, recomputes)):
        assert torch.equal(forward, recompute), f"{case}: micro-batch {microbatch} rerouted"
    if case.startswith("mmoe-") and case != "mmoe-token":
        ks = {int(m.sum(-1).unique()) for m in forwards}
        assert len(ks) > 1, f"{case}: every micro-batch drew k = {ks}"


@pytest.mark.parametrize("case", sorted(IN_FLIGHT))
def test_recompute_after_later_forwards_routes_as_its_forward(case):
    run_distributed_test(_forwards_in_flight, world_size=1, args=(case,))


# ---------------------------------------------------------------------------------------------
# Megatron's own schedules (1F1B with warm-up forwards, interleaved) with full and selective
# recompute: each router's recomputes replay its forwards, micro-batch by micro-batch.
# ---------------------------------------------------------------------------------------------
SCHEDULE_MODES = {
    "emoe": ElasticMoEConfig(mode="emoe", k_ideal=6),
    "mmoe": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level="layer"),
}
RECOMPUTE = {
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}
MICROBATCHES = 4


def _schedule_replays(rank, vpp):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_emoe.runtime import cpu_loop

    cpu_loop.enable()  # the schedules count tokens on the device
    for mode, elastic in SCHEDULE_MODES.items():
        for recompute, overrides in RECOMPUTE.items():
            builders.reseed(0)
            config = builders.moe_config(
                num_layers=4, pipeline_model_parallel_size=2,
                virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32, **overrides)
            chunks = builders.gpt_model_chunks(config, elastic)
            routers = elastic_routers(chunks)
            calls = {r.layer_number: builders.record_router_calls(r) for r in routers}
            batches = [builders.gpt_batch(seed=m) for m in range(MICROBATCHES)]

            def step(data_iterator, model):
                tokens, positions, mask, labels = next(data_iterator)
                set_training_step(model, 0)
                out = model(tokens, positions, mask, labels=labels)
                return out, lambda o: (o.float().mean(), {"loss": o.detach().float().mean()})

            get_forward_backward_func()(
                forward_step_func=step, data_iterator=[iter(batches) for _ in chunks],
                model=chunks, num_microbatches=MICROBATCHES, seq_length=builders.SEQ,
                micro_batch_size=2, forward_only=False,
            )
            for layer, layer_calls in calls.items():
                forwards = [m for grad, m in layer_calls if not grad]
                recomputes = [m for grad, m in layer_calls if grad]
                where = f"{mode}, {recompute} recompute, vpp={vpp}, layer {layer}"
                assert len(forwards) == len(recomputes) == MICROBATCHES, where
                for forward, again in zip(forwards, recomputes):
                    assert torch.equal(forward, again), f"{where}: a recompute rerouted"
                if mode == "mmoe":
                    assert len({int(m.sum(-1).unique()) for m in forwards}) > 1, where


@pytest.mark.slow
@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pipeline_schedules_recompute_route_as_forwards(vpp):
    run_distributed_test(_schedule_replays, world_size=2, pp=2, vpp=vpp, args=(vpp,), timeout=300)


# ---------------------------------------------------------------------------------------------
# Independent draws on ranks holding different tokens; TP ranks holding the same tokens agree.
# ---------------------------------------------------------------------------------------------
K, K_IDEAL, TOKEN_CHOICES = 2, 4, (1, 2, 3)


def _router(config, elastic):
    builders.reseed(0)  # the same router weights on every rank and for every mode
    return builders.moe_layer(config, elastic).router.train()


def _agreement(rank, sequence_parallel, expected):
    config = builders.moe_config(moe_token_dispatcher_type="allgather", moe_router_topk=K,
                                 **({} if sequence_parallel is None
                                    else {"sequence_parallel": sequence_parallel}))
    emoe = _router(config, ElasticMoEConfig(mode="emoe", k_ideal=K_IDEAL))
    mmoe = _router(config, ElasticMoEConfig(mode="mmoe", mmoe_k_choices=TOKEN_CHOICES,
                                            mmoe_sample_level="token"))
    x = builders.inputs(0, config.hidden_size, seq=512, batch=8)  # the same tokens on every rank
    pool = (x.reshape(-1, x.shape[-1]) @ emoe.weight.detach().t()).topk(K_IDEAL, dim=-1).indices
    drawn = {
        "emoe": emoe(x)[1].gather(1, pool),  # which of its top-k_ideal each token got [tokens, 4]
        "mmoe": mmoe(x)[1].sum(-1, keepdim=True),  # each token's budget [tokens, 1]
    }
    chance = {"emoe": 1 / math.comb(K_IDEAL, K), "mmoe": 1 / len(TOKEN_CHOICES)}
    for name, mine in drawn.items():
        both = [torch.empty_like(mine) for _ in range(2)]
        torch.distributed.all_gather(both, mine)
        agree = (both[0] == both[1]).all(-1).float().mean().item()
        where = f"{name}, sequence parallel {sequence_parallel}"
        if expected == "same":
            assert agree == 1.0, f"{where}: ranks with the same tokens drew differently ({agree})"
        else:
            p, tokens = chance[name], mine.shape[0]
            error = SIGMAS * math.sqrt(p * (1 - p) / tokens)
            assert abs(agree - p) < error, f"{where}: agreement {agree:.4f}, independent {p:.4f}"


def _tp_agreement(rank):
    _agreement(rank, False, "same")  # TP ranks hold the same tokens: they must agree
    _agreement(rank, True, "independent")  # sequence parallel: each holds its own tokens


def test_data_and_expert_parallel_ranks_draw_independently():
    """EP = 2 on 2 ranks: the ranks are also DP ranks (they hold different tokens)."""
    run_distributed_test(_agreement, world_size=2, ep=2, args=(None, "independent"))


def test_context_parallel_ranks_draw_independently():
    run_distributed_test(_agreement, world_size=2, cp=2, args=(None, "independent"))


def test_tensor_parallel_ranks_agree_unless_sequence_parallel():
    run_distributed_test(_tp_agreement, world_size=2, tp=2)


# ---------------------------------------------------------------------------------------------
# M-MoE granularities: what shares one k, and how often it is drawn.
# ---------------------------------------------------------------------------------------------
def _ks(rank, level, every, steps, microbatches):
    """k of each layer `[step][micro-batch][layer]` for three layers driven like a training run."""
    config = builders.moe_config(num_layers=3)
    elastic = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level=level,
                               mmoe_resample_every=every)
    layers = [builders.moe_layer(config, elastic, layer_number=n) for n in (1, 2, 3)]
    maps = [builders.record_routing(layer.router) for layer in layers]
    table = []
    for step in range(steps):
        rows = []
        for microbatch in range(microbatches):
            x = builders.inputs(microbatch, config.hidden_size)
            for layer in layers:
                layer.router.begin_step(step)
                x = layer(x)[0]
            rows.append([int(m[-1].sum(-1).unique()) for m in maps])
        table.append(rows)
    return table


def _granularity(rank):
    model_micro = _ks(rank, "model", "micro-batch", steps=3, microbatches=4)
    assert all(len(set(row)) == 1 for rows in model_micro for row in rows)
    assert len({row[0] for rows in model_micro for row in rows}) > 1

    layer_global = _ks(rank, "layer", "global-batch", steps=4, microbatches=3)
    for rows in layer_global:  # one k per layer for all micro-batches of a step
        assert all(row == rows[0] for row in rows)
    assert any(len(set(rows[0])) > 1 for rows in layer_global), "layers never differed"
    assert len({tuple(rows[0]) for rows in layer_global}) > 1, "steps never differed"

    model_global = _ks(rank, "model", "global-batch", steps=4, microbatches=3)
    for rows in model_global:
        assert len({k for row in rows for k in row}) == 1
    assert len({rows[0][0] for rows in model_global}) > 1


def test_mmoe_granularities():
    run_distributed_test(_granularity, world_size=1)


def _token_budget_weights(rank):
    config = builders.moe_config(moe_token_dispatcher_type="allgather")
    elastic = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 4), mmoe_sample_level="token",
                               mmoe_k_weighting="capacity")
    layer = builders.moe_layer(config, elastic)
    maps = builders.record_routing(layer.router)
    for microbatch in range(8):
        layer.router(builders.inputs(microbatch, config.hidden_size, seq=256, batch=4))
    drawn = torch.cat([m.sum(-1) for m in maps]).tolist()
    counts = {k: drawn.count(k) for k in (1, 2, 4)}
    weights = elastic.mmoe_weights(config.moe_router_topk)
    assert weights == pytest.approx([k ** 0.5 / sum(j ** 0.5 for j in (1, 2, 4)) for k in (1, 2, 4)])
    assert _chi_square_p(counts, (1, 2, 4), weights) > P_VALUE, counts


def test_router_draws_per_token_budgets_with_their_weights():
    run_distributed_test(_token_budget_weights, world_size=1)
