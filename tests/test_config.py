"""ElasticMoEConfig validation, the Megatron CLI flags, and spec rewriting (no processes needed)."""

import argparse
import dataclasses
import json
import functools

import pytest

import builders
from megatron_emoe import ElasticMoEConfig, add_elastic_moe_args, elastic_config_from_args
from megatron_emoe.budget import Budget
from megatron_emoe.runtime.saved_args import saved_over_defaults


def config(**overrides):
    return builders.moe_config(**overrides)  # 8 experts, top-2, alltoall, 2 MoE layers


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the flag and the allowed range, when the config is built.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "elastic, tc_overrides, message",
    [
        (dict(mode="emoe", k_ideal=1), {}, r"--emoe-k-ideal must be in \[moe-router-topk=2, 8\]"),
        (dict(mode="emoe", k_ideal=9), {}, r"--emoe-k-ideal must be in \[moe-router-topk=2, 8\]"),
        (dict(mode="emoe", k_ideal_factor=5.0), {}, r"--emoe-k-ideal .*from --emoe-k-ideal-factor"),
        (
            dict(mode="emoe", k_ideal=6),
            dict(moe_router_num_groups=4, moe_router_group_topk=2),
            r"\[moe-router-topk=2, 4\] \(moe-router-group-topk=2 groups of 2 experts\)",
        ),
        (dict(active_experts=0), {}, r"--moe-active-experts must be in \[1, 8\]"),
        (dict(active_experts=9), {}, r"--moe-active-experts must be in \[1, 8\]"),
        (dict(active_experts=(1, 2, 3)), {}, r"--moe-active-experts per-layer list .* \(2 for"),
        (dict(mode="mmoe", mmoe_k_choices=(1, 9)), {}, r"--mmoe-k-choices must lie in \[1, 8\]"),
        (dict(mode="mmoe", mmoe_k_min=0, mmoe_k_max=2), {}, r"--mmoe-k-min/max must lie in \[1, 8\]"),
        (
            dict(mode="mmoe", mmoe_sample_level="token"),
            dict(moe_token_dispatcher_type="alltoall"),
            r"--moe-token-dispatcher-type alltoall cannot take",
        ),
        (
            dict(mode="emoe", k_ideal=4),
            dict(moe_router_load_balancing_type="sinkhorn"),
            r"--moe-router-load-balancing-type sinkhorn is not supported",
        ),
        (dict(mode="mmoe", mmoe_k_choices=(1, 2, 2), mmoe_k_weights=(1.0, 2.0, 3.0)), {},
         r"--mmoe-k-weights pairs with each of --mmoe-k-choices, which repeats"),
        (dict(mode="mmoe", mmoe_k_choices=(1, 2), mmoe_k_weights=(1.0, 2.0, 3.0)), {},
         r"--mmoe-k-weights needs one weight per budget \[1, 2\] \(2\), got 3"),
        (dict(mode="mmoe", mmoe_sample_level="token"),
         dict(moe_token_dispatcher_type="allgather", moe_expert_capacity_factor=1.0,
              moe_pad_expert_input_to_capacity=True),
         r"--moe-pad-expert-input-to-capacity .* --mmoe-sample-level token"),
        (dict(mode="emoe", k_ideal=4, k_ideal_start=1, k_ideal_ramp_iters=10), {},
         r"--emoe-k-ideal-start must be in \[moe-router-topk=2, 8\] .*got 1"),
        (dict(mode="emoe", k_ideal=4, k_ideal_start=9, k_ideal_ramp_iters=10), {},
         r"--emoe-k-ideal-start must be in \[moe-router-topk=2, 8\]"),
        (dict(mode="emoe", k_ideal=4, k_ideal_start=6, k_ideal_ramp_iters=10),
         dict(moe_router_num_groups=4, moe_router_group_topk=2),
         r"--emoe-k-ideal-start must be in \[moe-router-topk=2, 4\] \(moe-router-group-topk=2"),
    ],
)
def test_bad_input_names_flag_and_range(elastic, tc_overrides, message):
    with pytest.raises(ValueError, match=message):
        ElasticMoEConfig(**elastic).validate(config(**tc_overrides))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="dense"), r"--moe-router-mode must be one of"),
        (dict(mmoe_sample_level="sequence"), r"--mmoe-sample-level must be one of"),
        (dict(k_ideal_factor=0.5), r"--emoe-k-ideal-factor must be >= 1"),
        (dict(hr_loss_coeff=-1.0), r"--emoe-hr-loss-coeff must be >= 0"),
        (dict(mmoe_k_choices=(1,), mmoe_k_max=2), r"either --mmoe-k-choices or"),
        (dict(mmoe_sample_level="step"),
         r"--mmoe-sample-level step was split in two: --mmoe-sample-level model .* "
         r"--mmoe-resample-every micro-batch"),
        (dict(mmoe_sample_level="token", mmoe_resample_every="global-batch"),
         r"--mmoe-resample-every global-batch needs --mmoe-sample-level model or layer"),
        (dict(mmoe_resample_every="step"), r"--mmoe-resample-every must be one of"),
        (dict(mmoe_k_weighting="zipf"), r"--mmoe-k-weighting must be one of"),
        (dict(mmoe_capacity_temperature=2.0), r"--mmoe-capacity-temperature .* no effect"),
        (dict(mmoe_k_weighting="capacity", mmoe_capacity_temperature=0.0),
         r"--mmoe-capacity-temperature must be > 0"),
        (dict(mmoe_k_weighting="capacity", mmoe_k_weights=(1.0, 2.0)),
         r"either --mmoe-k-weights or --mmoe-k-weighting capacity"),
        (dict(mmoe_k_weights=(1.0, -2.0)), r"--mmoe-k-weights must be non-negative"),
        (dict(k_ideal_start=4, k_ideal_ramp_iters=10),
         r"--emoe-k-ideal-start schedules EMoE .* needs --moe-router-mode emoe, got .* topk"),
        (dict(mode="mmoe", k_ideal_ramp_iters=10),
         r"--emoe-k-ideal-ramp-iters schedules EMoE .* got --moe-router-mode mmoe"),
        (dict(emoe_start_iter=0), r"--emoe-start-iter schedules EMoE .* --moe-router-mode emoe"),
        (dict(mode="emoe", k_ideal_start=4),
         r"--emoe-k-ideal-start needs --emoe-k-ideal-ramp-iters: give both flags or neither"),
        (dict(mode="emoe", k_ideal_ramp_iters=10),
         r"--emoe-k-ideal-ramp-iters needs --emoe-k-ideal-start: give both flags or neither"),
        (dict(mode="emoe", k_ideal_start=4, k_ideal_ramp_iters=0),
         r"--emoe-k-ideal-ramp-iters must be >= 1, got 0"),
        (dict(mode="emoe", emoe_start_iter=-1), r"--emoe-start-iter must be >= 0, got -1"),
    ],
)
def test_bad_standalone_values_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticMoEConfig(**kwargs)


def test_valid_combinations_pass():
    ElasticMoEConfig(mode="emoe", k_ideal=8, active_experts=(1, 6)).validate(config())
    ElasticMoEConfig(mode="mmoe", mmoe_sample_level="token").validate(
        config(moe_token_dispatcher_type="allgather")
    )
    # Token dropping makes the alltoall output size dynamic, so per-token budgets are fine there.
    ElasticMoEConfig(mode="mmoe", mmoe_sample_level="token").validate(
        config(moe_expert_capacity_factor=1.5)
    )
    # Both schedule directions, and Top-k first with a ramp that narrows.
    ElasticMoEConfig(mode="emoe", k_ideal=8, k_ideal_start=2,
                     k_ideal_ramp_iters=1).validate(config())
    ElasticMoEConfig(mode="emoe", k_ideal=2, k_ideal_start=8, k_ideal_ramp_iters=5,
                     emoe_start_iter=100).validate(config())
    # Plain top-k keeps every Megatron balancing type.
    ElasticMoEConfig(mode="topk").validate(
        config(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0)
    )


def test_mmoe_weights_resolve_from_the_flags():
    assert ElasticMoEConfig(mode="mmoe").mmoe_weights(4) is None  # uniform: plain draws
    capacity = ElasticMoEConfig(mode="mmoe", mmoe_k_weighting="capacity").mmoe_weights(4)
    roots = [k ** 0.5 for k in (1, 2, 3, 4)]  # the paper's τ = 2 by default
    assert capacity == pytest.approx([r / sum(roots) for r in roots])
    hot = ElasticMoEConfig(mode="mmoe", mmoe_k_weighting="capacity", mmoe_capacity_temperature=1.0)
    assert hot.mmoe_weights(4) == pytest.approx([k / 10 for k in (1, 2, 3, 4)])
    explicit = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(4, 1), mmoe_k_weights=(3, 1))
    assert explicit.mmoe_weights(4) == pytest.approx([0.25, 0.75])  # for budgets (1, 4)
    ranged = ElasticMoEConfig(mode="mmoe", mmoe_k_min=2, mmoe_k_max=3, mmoe_k_weights=(1, 3))
    assert ranged.mmoe_weights(4) == pytest.approx([0.25, 0.75])


def test_cuda_graphs_that_capture_the_router_are_refused_outside_topk():
    from megatron.core.transformer.enums import CudaGraphModule

    def graphed(impl, modules):
        tc = config()
        tc.cuda_graph_impl, tc.cuda_graph_modules = impl, modules
        return tc

    for impl, modules in (("local", []), ("transformer_engine", [CudaGraphModule.moe_router]),
                          ("local", [CudaGraphModule.attn, CudaGraphModule.moe]),
                          ("full_iteration", [])):
        for mode in ("emoe", "mmoe"):
            with pytest.raises(ValueError, match=rf"--cuda-graph-impl {impl} would capture the router"):
                ElasticMoEConfig(mode=mode, k_ideal=4).validate(graphed(impl, modules))
        ElasticMoEConfig(mode="topk").validate(graphed(impl, modules))
    ElasticMoEConfig(mode="emoe", k_ideal=4).validate(graphed("local", [CudaGraphModule.attn]))


def test_budget_lists_may_cover_mtp_layers():
    tc = config(mtp_num_layers=1)
    assert Budget((1, 2, 3)).validate(tc) == Budget((1, 2, 3))
    assert Budget((1, 2)).validate(tc) == Budget((1, 2))
    with pytest.raises(ValueError, match=r"\(2 or 3 for this model\)"):
        Budget((1, 2, 3, 4)).validate(tc)
    # MTP layers take their own entry, or the last decoder layer's when the list has none.
    assert Budget((1, 2, 3)).for_layer(tc, 1, is_mtp_layer=True) == 3
    assert Budget((1, 2)).for_layer(tc, 1, is_mtp_layer=True) == 2
    assert Budget((1, 2)).for_layer(tc, 2, is_mtp_layer=False) == 2


def test_top_p_budgets_are_validated():
    from megatron_emoe import TopP

    tc = config(moe_token_dispatcher_type="allgather")
    assert Budget(TopP(0.5, 4)).validate(tc) == Budget(TopP(0.5, 4))
    for bad, message in [
        (TopP(0.0, 4), r"top-p must be in \(0, 1\], got 0.0"),
        (TopP(1.5, 4), r"top-p must be in \(0, 1\]"),
        (TopP(0.5, 9), r"top-p max experts must be in \[1, 8\] \(num-experts=8\), got 9"),
        (TopP(0.5, 0), r"top-p max experts must be in \[1, 8\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            Budget(bad).validate(tc, flag="--top-p")
    with pytest.raises(ValueError, match="--moe-token-dispatcher-type alltoall.*allgather"):
        Budget(TopP(0.5, 4)).validate(config())  # dropless alltoall: exactly top-k per token


def test_budget_parse_label_json_round_trip():
    from megatron_emoe import TopP

    for budget in (Budget(2), Budget((1, 2, 4, 4)), Budget(TopP(0.5, 4))):
        assert Budget.parse(budget.label) == budget
        assert Budget.from_json(json.loads(json.dumps(budget.to_json()))) == budget
    assert Budget.parse("1,2,4,4") == Budget((1, 2, 4, 4)) and Budget.parse(" 3 ") == Budget(3)
    assert Budget.parse("") is None and Budget.parse("default") is None and Budget.of(None) is None
    assert Budget.of([3]) == Budget(3) and Budget.of(Budget(3)) == Budget(3)
    for bad in ("two", "1-x", "top_p", True, 1.5, [1, 2.5], [], "1.5"):
        with pytest.raises(ValueError, match="--layer-budgets"):
            Budget.parse(bad, flag="--layer-budgets")
    with pytest.raises(ValueError, match="top_p and max_experts"):
        Budget.from_json({"top_p": 0.5})


def test_derived_values():
    assert ElasticMoEConfig(mode="emoe").resolved_k_ideal(2) == 4
    assert ElasticMoEConfig(mode="emoe", k_ideal_factor=3).resolved_k_ideal(2) == 6
    assert ElasticMoEConfig(mode="mmoe").mmoe_budgets(4) == (1, 2, 3, 4)
    assert ElasticMoEConfig(mode="mmoe", mmoe_k_min=2, mmoe_k_max=6).mmoe_budgets(4) == (2, 3, 4, 5, 6)
    assert ElasticMoEConfig(mode="mmoe", mmoe_k_choices=[4, 1, 4]).mmoe_budgets(2) == (1, 4)


# ---------------------------------------------------------------------------------------------
# CLI: the flags extend Megatron's own parser and map 1:1 to the dataclass fields.
# ---------------------------------------------------------------------------------------------
def test_flags_extend_megatron_parser_one_to_one():
    from megatron.training.arguments import add_megatron_arguments

    parser = add_elastic_moe_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(
        "--moe-router-mode emoe --emoe-k-ideal 6 --emoe-hr-loss-coeff 5e-4 "
        "--mmoe-k-choices 1 2 4 --mmoe-sample-level token --moe-active-experts 1 3 "
        "--num-experts 8 --moe-router-topk 2".split()
    )
    elastic = elastic_config_from_args(args)
    assert elastic == ElasticMoEConfig(
        mode="emoe", k_ideal=6, hr_loss_coeff=5e-4, mmoe_k_choices=(1, 2, 4),
        mmoe_sample_level="token", active_experts=(1, 3),
    )
    flags = {f.metadata["flag"] for f in dataclasses.fields(ElasticMoEConfig)}
    assert len(flags) == len(dataclasses.fields(ElasticMoEConfig))
    assert elastic_config_from_args(parser.parse_args([])) == ElasticMoEConfig()


def test_schedule_flags_parse_to_their_fields():
    parser = add_elastic_moe_args(argparse.ArgumentParser())
    args = parser.parse_args(
        "--moe-router-mode emoe --emoe-k-ideal 6 --emoe-k-ideal-start 2 "
        "--emoe-k-ideal-ramp-iters 100 --emoe-start-iter 50".split()
    )
    assert elastic_config_from_args(args, config()) == ElasticMoEConfig(
        mode="emoe", k_ideal=6, k_ideal_start=2, k_ideal_ramp_iters=100, emoe_start_iter=50
    )
    defaults = elastic_config_from_args(parser.parse_args([]))
    assert (defaults.k_ideal_start, defaults.k_ideal_ramp_iters, defaults.emoe_start_iter) == (
        None, None, None)


def test_checkpoints_saved_before_the_schedule_flags_load_with_the_defaults():
    old_run = argparse.Namespace(moe_router_mode="emoe", emoe_k_ideal=4, num_experts=8,
                                 moe_router_topk=2)
    elastic = elastic_config_from_args(saved_over_defaults(old_run))
    assert elastic == ElasticMoEConfig(mode="emoe", k_ideal=4)
    assert elastic.k_ideal_at(10, 2) == 4 and not elastic.routes_topk_at(0)
    # transformers folders keep the config as a dict: an old one lacks the new keys
    settings = dataclasses.asdict(ElasticMoEConfig(mode="emoe", k_ideal=4))
    for name in ("k_ideal_start", "k_ideal_ramp_iters", "emoe_start_iter"):
        del settings[name]
    assert ElasticMoEConfig(**settings) == elastic


def test_from_args_validates_against_the_model():
    parser = add_elastic_moe_args(argparse.ArgumentParser())
    args = parser.parse_args("--moe-router-mode emoe --emoe-k-ideal 12".split())
    with pytest.raises(ValueError, match="--emoe-k-ideal"):
        elastic_config_from_args(args, config())


# ---------------------------------------------------------------------------------------------
# Spec rewriting.
# ---------------------------------------------------------------------------------------------
def _moe_specs(spec):
    from megatron_emoe import ElasticMoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    found = []

    def walk(node):
        if isinstance(node, functools.partial):
            if node.func is ElasticMoELayer:
                found.append(node.keywords["submodules"])
            for value in [*node.args, *node.keywords.values()]:
                walk(value)
        elif isinstance(node, ModuleSpec):
            if node.module is ElasticMoELayer:
                found.append(node.submodules)
            walk(node.submodules)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(spec)
    return found


def test_rewrites_layer_and_block_specs_without_touching_input():
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
    )
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_emoe import ElasticRouter, with_elastic_router

    elastic = ElasticMoEConfig(mode="emoe", k_ideal=4)
    layer = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    rewritten = with_elastic_router(layer, elastic)
    assert layer.submodules.mlp.func is MoELayer, "input spec was modified"
    (moe,) = _moe_specs(rewritten)
    assert moe.router.func is ElasticRouter
    assert moe.router.keywords == {"elastic": elastic}

    tc = config(num_layers=4, moe_layer_freq=[1, 0, 1, 1], mtp_num_layers=1)
    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False, pp_rank=0)
    assert len(_moe_specs(with_elastic_router(block, elastic))) == 3
    # Rewriting twice is harmless.
    assert len(_moe_specs(with_elastic_router(with_elastic_router(block, elastic), elastic))) == 3


def test_transformer_engine_spec_is_rewritten():
    pytest.importorskip("transformer_engine")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron_emoe import with_elastic_router

    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=8, moe_grouped_gemm=True)
    assert len(_moe_specs(with_elastic_router(spec, ElasticMoEConfig(mode="emoe")))) == 1


def test_spec_without_moe_is_rejected():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_emoe import with_elastic_router

    with pytest.raises(ValueError, match="no MoE layer"):
        with_elastic_router(get_gpt_layer_local_spec(), ElasticMoEConfig())


def test_ncclep_flex_backend_refuses_varying_experts_per_token():
    tc = builders.moe_config(moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="ncclep")
    with pytest.raises(ValueError, match="ncclep"):
        ElasticMoEConfig(mode="emoe").validate(tc)
    ElasticMoEConfig(mode="topk").validate(tc)
    assert Budget(1).validate(tc) == Budget(1)
    with pytest.raises(ValueError, match=r"\[1, 2\].*ncclep"):
        Budget(3).validate(tc)


def test_inference_router_spec_is_refused():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router import InferenceTopKRouter

    from megatron_emoe import with_elastic_router

    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    moe = spec.submodules.mlp
    moe = moe.keywords["submodules"] if hasattr(moe, "keywords") else moe.submodules
    inference = dataclasses.replace(moe, router=InferenceTopKRouter)
    layer = spec.submodules.mlp
    if hasattr(layer, "keywords"):
        layer = functools.partial(layer.func, *layer.args, **{**layer.keywords, "submodules": inference})
    else:
        layer = dataclasses.replace(layer, submodules=inference)
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=layer))
    with pytest.raises(ValueError, match="InferenceTopKRouter"):
        with_elastic_router(spec, ElasticMoEConfig(mode="emoe"))
