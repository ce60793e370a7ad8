"""The elastic router on Megatron-Core's GPU path: Transformer Engine specs with grouped GEMM
(`TEGroupedMLP`), FP8 with routing-map padding for quantization, fused permutation, and the flex
(DeepEP / HybridEP) dispatcher.

Two kinds of tests live here:

- CPU tests (not marked `gpu`), which run everywhere: the spec rewrite of Megatron's Transformer
  Engine spec tree, FP8 routing-map padding through the real alltoall dispatcher, and an audit that
  every dispatcher attribute derived from `moe_router_topk` at construction follows
  `set_dispatcher_topk`.
- GPU tests (marked `gpu`), which skip with a stated reason without CUDA, without Transformer
  Engine, without FP8 support for a recipe, or without deep_ep / hybrid_ep and 2 GPUs.

FP8 tolerance (`FP8_REL_TOL`): FP8 E4M3 keeps 3 mantissa bits, so one rounding has a relative error
of at most 2^-4 = 6.25% and about 2-3% RMS. A GEMM on FP8 inputs and FP8 weights with independent
rounding errors has an output error of about sqrt(2) times that, roughly 3-5% (it does not grow with
the reduction length for random-sign data: signal and error both grow like its square root). The
expert MLP chains two such GEMMs (fc1 -> GELU -> fc2), so about 4-7% normwise is expected; BF16
itself contributes about 0.4%. The bound 0.1 on ||out_fp8 - out_bf16|| / ||out_bf16|| leaves about
1.5-2.5x headroom while still failing on real defects (a wrong or dropped expert moves the output by
O(1)). A lower bound (`FP8_MIN_ERR`) checks that FP8 really ran (BF16 against itself gives 0).
Delayed scaling is calibrated by a few grad-enabled FP8 forwards first: Transformer Engine updates
its amax history and scales only when grad is enabled, and starts from scale 1, which would push
0.02-scale weights into E4M3's subnormal range.
"""

from __future__ import annotations

import contextlib
import fnmatch
from unittest import mock

import pytest
import torch
from distributed import run_distributed_test

import builders
import gpu
from megatron_emoe import ElasticMoEConfig, ElasticMoELayer, ElasticRouter, with_elastic_router
from megatron_emoe.layer import set_dispatcher_topk
from megatron_emoe.spec import map_spec

TOPK = 2
FP8_REL_TOL = 0.1
FP8_MIN_ERR = 1e-3

_MISSING = [reason for missing, reason in ((not gpu.CUDA, gpu.NO_CUDA_REASON),
                                           (not gpu.HAVE_TE, gpu.NO_TE_REASON)) if missing]
needs_gpu_and_te = pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING) or "-")


# =================================================================================================
# CPU: with_elastic_router on Megatron's Transformer Engine spec tree
# =================================================================================================
@contextlib.contextmanager
def _te_spec_functions():
    """Megatron's TE spec builders as they are, or, without Transformer Engine, with its real
    `TESpecProvider` put back and stand-ins for the two TE grouped-linear classes (Megatron's
    gpt_layer_specs sets `TESpecProvider = None` and the TE classes to placeholders when TE is
    missing; everything else in the spec code path is Megatron's own)."""
    if gpu.HAVE_TE:
        yield "transformer_engine"
        return
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    stand_ins = {
        name: type(name, (), {"__doc__": "stand-in: Transformer Engine is not installed"})
        for name in ("TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")
    }
    with mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider), \
            mock.patch.multiple(provider, **stand_ins):
        yield "stand-ins"


def _moe_builders(spec) -> list:
    """The MoE layer builders (partials or ModuleSpecs of MoELayer / ElasticMoELayer) in a spec tree."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    found = []

    def visit(node):
        module = node.func if hasattr(node, "func") else getattr(node, "module", None)
        if isinstance(node, ModuleSpec) or hasattr(node, "func"):
            if isinstance(module, type) and issubclass(module, MoELayer):
                found.append(node)
        return None

    map_spec(spec, visit)
    return found


def _te_spec_rewrite(rank):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    config = builders.moe_config(
        num_layers=3, moe_layer_freq=[1, 0, 1], moe_grouped_gemm=True, mtp_num_layers=1
    )
    elastic = ElasticMoEConfig(mode="emoe", k_ideal=4)
    with _te_spec_functions():
        block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True)
        layer = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=True
        )
        mtp = gpt_layer_specs.get_gpt_mtp_block_spec(config, block, use_transformer_engine=True)

    for name, spec, count in (("block", block, 2), ("layer", layer, 1), ("mtp", mtp, 1)):
        before = repr(spec)
        originals = _moe_builders(spec)
        assert len(originals) == count, f"{name}: {len(originals)} MoE layers"
        rewritten = _moe_builders(with_elastic_router(spec, elastic))
        assert repr(spec) == before, f"{name}: with_elastic_router modified its input"
        assert len(rewritten) == count
        for original, new in zip(originals, rewritten, strict=True):
            assert original.func is MoELayer and new.func is ElasticMoELayer
            old_sub, new_sub = original.keywords["submodules"], new.keywords["submodules"]
            assert old_sub.router is TopKRouter
            assert new_sub.router.func is ElasticRouter
            assert new_sub.router.keywords == {"elastic": elastic}
            # Grouped GEMM experts and shared experts are Megatron's, untouched.
            assert old_sub.experts.func is TEGroupedMLP and new_sub.experts.func is TEGroupedMLP
            assert new_sub.experts.keywords == old_sub.experts.keywords
            assert new_sub.shared_experts.func is old_sub.shared_experts.func
            assert new_sub.shared_experts.keywords == old_sub.shared_experts.keywords
    # The dense middle layer of the block is left alone.
    rewritten_block = with_elastic_router(block, elastic)
    dense = block.layer_specs[1].submodules.mlp
    assert rewritten_block.layer_specs[1].submodules.mlp.func is dense.func


def test_with_elastic_router_rewrites_transformer_engine_spec_tree():
    """TE block, layer and MTP specs with moe_grouped_gemm=True: MoELayer -> ElasticMoELayer and
    TopKRouter -> ElasticRouter; TEGroupedMLP experts, shared experts and dense layers untouched.
    Without Transformer Engine the TE grouped-linear classes are stand-ins (building modules from
    the spec needs TE and a GPU: see test_te_gpt_model_trains_and_serves_budgets)."""
    run_distributed_test(_te_spec_rewrite, world_size=1)


# =================================================================================================
# CPU: FP8 routing-map padding through the real alltoall dispatcher
# =================================================================================================
def _emulate_fp8_dispatch(dispatcher, on: bool) -> None:
    """Give the layer's private dispatcher config FP8 routing-map padding (or take it away).

    TransformerConfig refuses fp8 without Transformer Engine, so on CPU only the dispatcher's own
    config (the private copy ElasticMoELayer made) says fp8: the dispatcher pads the routing map
    exactly as it would under FP8, and the CPU experts compute in fp32 without quantizing."""
    dispatcher.config.fp8 = "e4m3" if on else None
    dispatcher.config.moe_router_padding_for_quantization = on


def _padding_on_cpu(rank):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    group = parallel_state.get_expert_model_parallel_group()
    config = builders.moe_config(moe_aux_loss_coeff=1e-2)
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
    dispatcher = layer.token_dispatcher
    recorder = gpu.DispatchRecorder(layer)
    # 32 x 2 = 64 tokens per rank, a multiple of the alignment: padding always has rows to use.
    x = torch.randn(32, 2, config.hidden_size, generator=torch.Generator().manual_seed(10 + rank))
    tokens = x.shape[0] * x.shape[1]

    layer.eval()
    padded_somewhere = False
    for k in range(1, 2 * TOPK + 1):
        layer.router.set_budget(k)
        _emulate_fp8_dispatch(dispatcher, on=False)
        with torch.no_grad():
            plain, _ = layer(x)
        gpu.check_exact_budget(recorder, k, group)
        assert gpu._sum_over(group, recorder.rows[-1]) == group.size() * tokens * k

        _emulate_fp8_dispatch(dispatcher, on=True)
        align = get_align_size_for_quantization(dispatcher.config)
        assert align == 16
        with torch.no_grad():
            padded, _ = layer(x)
        gpu.check_padded_dispatch(recorder, k, align, group, dispatcher)
        padded_somewhere |= gpu._sum_over(group, recorder.rows[-1]) > group.size() * tokens * k
        # Padding rows carry zero gates: the layer output is unchanged.
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
        assert dispatcher.config.moe_router_topk == k
    assert padded_somewhere, "no budget needed padding: the test did not exercise it"

    # Training with padding: the training k, finite gradients.
    layer.train()
    out, _ = layer(x)
    out.square().sum().backward()
    gpu.check_padded_dispatch(recorder, TOPK, align, group, dispatcher)
    assert layer.router.weight.grad.abs().sum() > 0
    for param in layer.parameters():
        assert param.grad is None or torch.isfinite(param.grad).all()
    assert config.fp8 is None and not config.moe_router_padding_for_quantization, (
        "the shared config must not change"
    )


@pytest.mark.skipif(
    gpu.CUDA, reason="CPU variant (gloo); on a GPU test_fp8_emoe_matches_bf16_with_padded_routing covers it"
)
@pytest.mark.parametrize("ep", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_router_padding_for_quantization_keeps_exact_budgets_on_cpu(ep):
    """moe_router_padding_for_quantization with the elastic router at k' = 1..2k: each expert's
    count is padded to a multiple of 16, padding rows have zero gates, the weighted work is exactly
    k' experts per token, and the output equals the unpadded one."""
    run_distributed_test(_padding_on_cpu, world_size=ep, ep=ep)


# =================================================================================================
# CPU: every dispatcher attribute derived from moe_router_topk follows set_dispatcher_topk
# =================================================================================================
DISPATCHER_VARIANTS = {
    "alltoall": dict(moe_token_dispatcher_type="alltoall"),
    "alltoall_capacity": dict(
        moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=1.5,
        moe_pad_expert_input_to_capacity=True,
    ),
    "allgather": dict(moe_token_dispatcher_type="allgather"),
}


def _audit_layers(overrides: dict, build=None):
    """Two elastic layers built alike except for moe_router_topk (2 and 5)."""
    elastic = ElasticMoEConfig(mode="emoe", k_ideal=8)
    build = build or (lambda config: builders.moe_layer(config, elastic))
    return [build(builders.moe_config(moe_router_topk=k, **overrides)) for k in (2, 5)]


def _audit(rank):
    problems = {}
    for variant, overrides in DISPATCHER_VARIANTS.items():
        layer_2, layer_5 = _audit_layers(overrides)
        found = gpu.topk_audit(layer_2, layer_5, set_dispatcher_topk)
        if found:
            problems[variant] = found
        assert layer_2.config.moe_router_topk == 2, "the shared config must not change"
    assert not problems, f"not refreshed by set_dispatcher_topk: {problems}"


@pytest.mark.parametrize("ep", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_set_dispatcher_topk_refreshes_every_topk_attribute(ep):
    """For each dispatcher (alltoall dropless and drop-and-pad, allgather), build it at top-k 2
    and 5; every attribute (its config's, its own, and those of objects it owns) that differs
    between the two builds must equal the k=5 build after set_dispatcher_topk(dispatcher, 5), every
    config it holds must be its private copy, and no other attribute may change."""
    run_distributed_test(_audit, world_size=ep, ep=ep)


@contextlib.contextmanager
def _flex_constructible():
    """Let Megatron's flex dispatcher be *constructed* without deep_ep / hybrid_ep (no forward):
    stand-ins for the kernel entry points it checks for, and on CPU, tensors it asks for on "cuda"
    made on the CPU."""
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_emoe import cpu

    patches = {
        "fused_dispatch": token_dispatcher.fused_dispatch or object(),
        "set_deepep_num_sms": token_dispatcher.set_deepep_num_sms or (lambda num_sms: None),
        "hybrid_ep_dispatch": token_dispatcher.hybrid_ep_dispatch or object(),
    }
    if not gpu.CUDA:
        patches["torch"] = cpu._cpu_torch()
    with mock.patch.multiple(token_dispatcher, **patches):
        yield


def _flex_audit(rank):
    problems = {}
    for backend in ("deepep", "hybridep"):
        with _flex_constructible():
            layer_2, layer_5 = _audit_layers(
                dict(moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend=backend)
            )
        found = gpu.topk_audit(layer_2, layer_5, set_dispatcher_topk)
        if found:
            problems[backend] = found
    assert not problems, f"flex: not refreshed by set_dispatcher_topk: {problems}"


@pytest.mark.slow
def test_set_dispatcher_topk_refreshes_flex_dispatcher():
    """The same audit for the flex dispatcher with the deepep and hybridep backends (EP=2: DeepEP
    needs TP x EP > 1), constructed with stand-ins for the deep_ep / hybrid_ep kernels: DeepEP's
    router_topk is refreshed, but the communication manager keeps the shared config."""
    run_distributed_test(_flex_audit, world_size=2, ep=2)


# =================================================================================================
# GPU: building blocks
# =================================================================================================
DEVICE = "cuda"  # the GPU tests' device (a name, so the test bodies can be dry-run elsewhere)
TE_HIDDEN, TE_FFN = 256, 512  # multiples of 128: every FP8 recipe's block size
TE_SEQ, TE_BATCH = 64, 2  # 128 tokens: a multiple of every FP8 alignment, so padding always fits
TE_SETTINGS = dict(
    num_layers=2,
    hidden_size=TE_HIDDEN,
    ffn_hidden_size=TE_FFN,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=TOPK,
    moe_grouped_gemm=True,
    moe_token_dispatcher_type="alltoall",
    moe_router_dtype="fp32",
    moe_aux_loss_coeff=1e-2,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bf16=True,
    params_dtype=torch.bfloat16,
    # TE caches quantized weights across "microbatches" otherwise; requantize on every forward.
    disable_parameter_transpose_cache=True,
)


def _te_config(**overrides):
    return builders.moe_config(**{**TE_SETTINGS, **overrides})


def _te_layer(config, elastic: ElasticMoEConfig, layer_number: int = 1):
    """An ElasticMoELayer from Megatron's TE layer spec with grouped GEMM, on the GPU."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    spec = get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=True
    )
    layer = with_elastic_router(spec, elastic).submodules.mlp(config=config)
    layer.set_layer_number(layer_number)
    assert isinstance(layer, ElasticMoELayer) and isinstance(layer.router, ElasticRouter)
    assert isinstance(layer.experts, TEGroupedMLP), type(layer.experts)
    return layer.to(DEVICE)


def _te_inputs(rank: int, seed: int = 100) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(TE_SEQ, TE_BATCH, TE_HIDDEN, generator=generator)
    return x.to(device=DEVICE, dtype=torch.bfloat16)


def _te_expert_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 `[experts, ffn, hidden]` and fc2 `[experts, hidden, ffn]` of a TEGroupedMLP, in fp32."""
    experts = layer.experts
    fc1 = torch.stack([getattr(experts.linear_fc1, f"weight{i}").detach().float()
                       for i in range(experts.num_local_experts)])
    fc2 = torch.stack([getattr(experts.linear_fc2, f"weight{i}").detach().float()
                       for i in range(experts.num_local_experts)])
    return fc1, fc2


ROUTER_GRAD, FC1_GRAD, FC2_GRAD = "*router.weight", "*experts*linear_fc1*", "*experts*linear_fc2*"


def _assert_finite_grads(module: torch.nn.Module, *nonzero: str) -> None:
    """All gradients finite; for each fnmatch pattern, some matching parameter got a non-zero one."""
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert grads, "no parameter got a gradient"
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
    for pattern in nonzero:
        matching = [g for name, g in grads.items() if fnmatch.fnmatch(name, pattern)]
        assert matching and any(g.abs().sum() > 0 for g in matching), f"no gradient reached {pattern}"


# =================================================================================================
# GPU (a): a GPTModel from the TE block spec trains and serves every budget, in every mode
# =================================================================================================
GPT_VOCAB, GPT_SEQ, GPT_BATCH = 256, 64, 2
GPT_MODES = {
    "topk": ElasticMoEConfig(mode="topk"),
    "emoe": ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=1e-3),
    "mmoe": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3), mmoe_sample_level="layer"),
}


def _te_gpt_model(rank, mode):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from megatron_emoe import elastic_routers, get_active_experts, set_active_experts, set_training_step

    config = _te_config(hidden_size=128, ffn_hidden_size=256)
    elastic = GPT_MODES[mode]
    spec = with_elastic_router(get_gpt_decoder_block_spec(config, use_transformer_engine=True), elastic)
    builders.reseed(0)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=GPT_VOCAB,
        max_sequence_length=GPT_SEQ,
        position_embedding_type="rope",
    ).to(DEVICE)
    moe_layers = [layer.mlp for layer in model.decoder.layers]
    for moe in moe_layers:
        assert isinstance(moe, ElasticMoELayer), type(moe)
        assert isinstance(moe.router, ElasticRouter) and isinstance(moe.experts, TEGroupedMLP)

    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(GPT_VOCAB, (GPT_BATCH, GPT_SEQ + 1), generator=generator).to(DEVICE)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(GPT_SEQ, device=DEVICE).expand(GPT_BATCH, GPT_SEQ)
    recorders = [gpu.DispatchRecorder(moe) for moe in moe_layers]

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        set_training_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs, positions, None, labels=labels).float().mean()
        assert torch.isfinite(loss), f"{mode} step {step}: loss {loss.item()}"
        loss.backward()
        _assert_finite_grads(model, ROUTER_GRAD, FC1_GRAD, FC2_GRAD)
        for moe, recorder in zip(moe_layers, recorders, strict=True):
            per_token = recorder.maps[-1].sum(-1)
            assert (per_token == moe.router.dispatch_topk).all()
            assert recorder.rows[-1] == GPT_SEQ * GPT_BATCH * moe.router.dispatch_topk
        optimizer.step()
    if mode == "mmoe":  # one micro-batch per step, each seen once
        assert all(router.draws.step == 1 and router.draws.microbatches_seen == 1
                   for router in elastic_routers(model))

    model.eval()
    for k in range(1, 2 * TOPK + 1):
        set_active_experts(model, k)
        with torch.no_grad():
            logits = model(inputs, positions, None)
        assert torch.isfinite(logits.float()).all(), f"k'={k}: non-finite logits"
        for recorder in recorders:
            gpu.check_exact_budget(recorder, k)
            assert recorder.rows[-1] == GPT_SEQ * GPT_BATCH * k
    set_active_experts(model, [1, 2 * TOPK])
    assert get_active_experts(model) == [1, 2 * TOPK]
    with torch.no_grad():
        model(inputs, positions, None)
    gpu.check_exact_budget(recorders[0], 1)
    gpu.check_exact_budget(recorders[1], 2 * TOPK)
    assert config.moe_router_topk == TOPK, "the shared config must not change"


@pytest.mark.gpu
@needs_gpu_and_te
@pytest.mark.parametrize("mode", list(GPT_MODES))
def test_te_gpt_model_trains_and_serves_budgets(mode):
    """(a) get_gpt_decoder_block_spec(use_transformer_engine=True) with moe_grouped_gemm=True,
    rewritten by with_elastic_router: a bf16 GPTModel (TEGroupedMLP experts) runs two training
    steps (forward + backward + Adam) and then eval forwards at k' = 1..2k and per-layer budgets."""
    gpu.run_nccl(_te_gpt_model, args=(mode,))


# =================================================================================================
# GPU (b): EMoE in FP8 against BF16, same batch, weights and experts; padded routing maps
# =================================================================================================
FP8_CASES = [
    ("hybrid", "delayed"),
    ("hybrid", "tensorwise"),
    ("e4m3", "tensorwise"),
    ("e4m3", "blockwise"),
    ("e4m3", "mxfp8"),
]


def _fp8_vs_bf16(rank, fp8_format, recipe):
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    config = _te_config(fp8=fp8_format, fp8_recipe=recipe, moe_router_padding_for_quantization=True)
    align = get_align_size_for_quantization(config)
    builders.reseed(0)
    # One layer: without fp8_autocast its TE GEMMs run in BF16, inside it in FP8 -- the same
    # weights for both by construction.
    layer = _te_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
    recorder = gpu.DispatchRecorder(layer)
    dispatcher = layer.token_dispatcher
    x = _te_inputs(rank)

    def forward(fp8: bool, grad: bool = False) -> torch.Tensor:
        context = get_fp8_context(config) if fp8 else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), context:
            out, _ = layer(x)
        return out.detach().float()

    # Eval budgets k' = 1..2k: deterministic top-k' routing, identical in both precisions.
    layer.eval()
    errors = {}
    for k in range(1, 2 * TOPK + 1):
        layer.router.set_budget(k)
        reference = forward(fp8=False)
        gpu.check_padded_dispatch(recorder, k, align, dispatcher=dispatcher)
        reference_map = recorder.maps[-1]
        for _ in range(2):  # calibrate delayed scaling (harmless for the other recipes)
            forward(fp8=True, grad=True)
        out = forward(fp8=True)
        assert torch.equal(recorder.maps[-1], reference_map), f"k'={k}: FP8 pass routed differently"
        gpu.check_padded_dispatch(recorder, k, align, dispatcher=dispatcher)
        assert dispatcher.config.moe_router_topk == k
        errors[k] = gpu.relative_error(out, reference)
    assert all(FP8_MIN_ERR < error < FP8_REL_TOL for error in errors.values()), (
        f"{fp8_format}/{recipe}: relative error by k' {errors} (want in ({FP8_MIN_ERR}, {FP8_REL_TOL}))"
    )

    # Training-mode EMoE: the same RNG seed samples the same experts in both precisions.
    layer.train()
    layer.router.set_budget(None)
    outputs, maps = {}, {}
    for fp8 in (False, True):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        context = get_fp8_context(config) if fp8 else contextlib.nullcontext()
        with context:
            out, _ = layer(x)
        # sum(): O(1) output gradients, which delayed scaling's first backward (scale 1) keeps
        # out of E5M2's underflow; a mean over 32k elements would flush them to zero.
        out.float().sum().backward()
        outputs[fp8], maps[fp8] = out.detach().float(), recorder.maps[-1]
        gpu.check_padded_dispatch(recorder, TOPK, align, dispatcher=dispatcher)
        _assert_finite_grads(layer, ROUTER_GRAD, FC1_GRAD)
    assert torch.equal(maps[True], maps[False]), "training-mode sampling differed between precisions"
    error = gpu.relative_error(outputs[True], outputs[False])
    assert error < FP8_REL_TOL, f"{fp8_format}/{recipe} training forward: relative error {error}"
    assert config.moe_router_topk == TOPK


@pytest.mark.gpu
@needs_gpu_and_te
@pytest.mark.parametrize("fp8_format,recipe", FP8_CASES)
def test_fp8_emoe_matches_bf16_with_padded_routing(fp8_format, recipe):
    """(b) EMoE layer (TE spec, grouped GEMM) with moe_router_padding_for_quantization: at eval
    budgets k' = 1..2k the FP8 output is within FP8_REL_TOL of the BF16 output of the same layer on
    the same batch with the same experts; tokens_per_expert is padded to the recipe's alignment
    while the non-zero-gate work is exactly k' experts per token; a training step with the same
    sampled experts agrees too and has finite gradients."""
    ok, reason = gpu.fp8_recipe_support(recipe)
    if not ok:
        pytest.skip(reason)
    gpu.run_nccl(_fp8_vs_bf16, args=(fp8_format, recipe))


def _mmoe_tokens_fp8(rank, recipe):
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    config = _te_config(fp8="hybrid", fp8_recipe=recipe, moe_router_padding_for_quantization=True)
    align = get_align_size_for_quantization(config)
    elastic = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 3), mmoe_sample_level="token")
    builders.reseed(0)
    layer = _te_layer(config, elastic)
    recorder = gpu.DispatchRecorder(layer)
    x = _te_inputs(rank)
    layer.train()
    with get_fp8_context(config):
        out, _ = layer(x)
    out.float().sum().backward()  # O(1) output gradients (see _fp8_vs_bf16)
    per_token = recorder.maps[-1].sum(-1)
    assert set(per_token.unique().tolist()) == {1, 3}
    assert layer.token_dispatcher.config.moe_router_topk == 3
    gpu.check_padded_dispatch(recorder, None, align, dispatcher=layer.token_dispatcher)
    _assert_finite_grads(layer, ROUTER_GRAD, FC1_GRAD)


@pytest.mark.gpu
@needs_gpu_and_te
def test_fp8_mmoe_per_token_budgets_with_padded_alltoall():
    """M-MoE per-token budgets are allowed with dropless alltoall only because FP8 routing-map
    padding makes its output size dynamic: one FP8 training step with k in {1, 3} per token."""
    for recipe in ("tensorwise", "delayed"):
        ok, reason = gpu.fp8_recipe_support(recipe)
        if ok:
            break
    else:
        pytest.skip(reason)
    gpu.run_nccl(_mmoe_tokens_fp8, args=(recipe,))


# =================================================================================================
# GPU (c): fused permutation at k' != k
# =================================================================================================
def _permute_fusion(rank, dispatcher):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    elastic = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4))
    layers = {}
    for fused in (False, True):
        builders.reseed(0)
        config = _te_config(moe_token_dispatcher_type=dispatcher, moe_permute_fusion=fused)
        layers[fused] = _te_layer(config, elastic)
    layers[False].load_state_dict(layers[True].state_dict())
    recorders = {fused: gpu.DispatchRecorder(layer) for fused, layer in layers.items()}
    x = _te_inputs(rank)
    tokens = TE_SEQ * TE_BATCH
    flat = x.reshape(-1, TE_HIDDEN).float()
    fc1, fc2 = _te_expert_weights(layers[True])
    router_weight = layers[True].router.weight.detach().float()

    # Eval at k' = 1..3k: the fused kernels permute exactly tokens * k' rows (nothing sized from the
    # training k), the same rows as the unfused path, and the outputs match a dense reference.
    for layer in layers.values():
        layer.eval()
    for k in range(1, 3 * TOPK + 1):
        outputs = {}
        for fused, layer in layers.items():
            layer.router.set_budget(k)
            with torch.no_grad():
                out, _ = layer(x)
            outputs[fused] = out.float().reshape(-1, TE_HIDDEN)
            gpu.check_exact_budget(recorders[fused], k)
            assert recorders[fused].rows[-1] == tokens * k, f"k'={k} fused={fused}"
            assert layer.token_dispatcher.config.moe_router_topk == k
        assert torch.equal(recorders[True].maps[-1], recorders[False].maps[-1])
        assert torch.equal(recorders[True].tokens_per_expert[-1], recorders[False].tokens_per_expert[-1])
        fused_vs_unfused = gpu.relative_error(outputs[True], outputs[False])
        assert fused_vs_unfused < 1e-2, f"k'={k}: fused vs unfused {fused_vs_unfused}"
        expected = builders.dense_reference(flat, router_weight, fc1, fc2, k)
        assert gpu.relative_error(outputs[True], expected) < 3e-2, f"k'={k}: fused vs dense reference"

    # Training with M-MoE layer budgets (k changes between steps) through the fused kernels.
    layer = layers[True]
    layer.train()
    for _ in range(4):
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.float().square().mean().backward()
        k = layer.router.dispatch_topk
        gpu.check_exact_budget(recorders[True], k)
        assert recorders[True].rows[-1] == tokens * k
        _assert_finite_grads(layer, ROUTER_GRAD, FC1_GRAD)
    assert layers[True].config.moe_router_topk == TOPK

    # EMoE training through the fused kernels.
    builders.reseed(0)
    emoe = _te_layer(_te_config(moe_token_dispatcher_type=dispatcher, moe_permute_fusion=True),
                     ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=1e-3))
    out, _ = emoe(x)
    out.float().square().mean().backward()
    _assert_finite_grads(emoe, ROUTER_GRAD, FC1_GRAD)

    # The audit on the fused, TE-built dispatcher (construction-time attributes vs set_dispatcher_topk).
    def build(config):
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=8, moe_grouped_gemm=True)
        return with_elastic_router(spec, ElasticMoEConfig(mode="emoe", k_ideal=8)).submodules.mlp(
            config=config
        )

    layer_2, layer_5 = [
        build(_te_config(moe_token_dispatcher_type=dispatcher, moe_permute_fusion=True,
                         moe_router_topk=k))
        for k in (2, 5)
    ]
    problems = gpu.topk_audit(layer_2, layer_5, set_dispatcher_topk)
    assert not problems, problems


@pytest.mark.gpu
@needs_gpu_and_te
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_permute_fusion_follows_the_budget(dispatcher):
    """(c) moe_permute_fusion=True with the elastic router at k' = 1..3k (eval) and with M-MoE
    budgets changing between training steps: TE's fused permute/unpermute get tokens * k' rows,
    agree with the unfused path and with a dense per-expert reference."""
    if not gpu.fused_permute_available():
        pytest.skip("moe_permute_fusion needs Transformer Engine's fused permutation (TE >= 2.1)")
    gpu.run_nccl(_permute_fusion, args=(dispatcher,))


# =================================================================================================
# GPU (d): the flex dispatcher (DeepEP / HybridEP) at k' != k, against alltoall
# =================================================================================================
FLEX_BUDGETS = (1, 2, 4, 6)


def _flex(rank, backend):
    from megatron.core import parallel_state

    group = parallel_state.get_expert_model_parallel_group()
    fused = gpu.fused_permute_available()
    layers = {}
    for dispatcher in ("flex", "alltoall"):
        overrides = dict(moe_token_dispatcher_type=dispatcher, moe_permute_fusion=fused)
        if dispatcher == "flex":
            overrides["moe_flex_dispatcher_backend"] = backend
        builders.reseed(0)
        layers[dispatcher] = _te_layer(_te_config(**overrides), ElasticMoEConfig(mode="emoe", k_ideal=4))
    layers["alltoall"].load_state_dict(layers["flex"].state_dict())
    recorders = {name: gpu.DispatchRecorder(layer) for name, layer in layers.items()}
    x = _te_inputs(rank)
    tokens = TE_SEQ * TE_BATCH
    manager = layers["flex"].token_dispatcher._comm_manager

    for layer in layers.values():
        layer.eval()
    for k in FLEX_BUDGETS:
        outputs = {}
        for name, layer in layers.items():
            layer.router.set_budget(k)
            with torch.no_grad():
                out, _ = layer(x)
            outputs[name] = out.float()
            gpu.check_exact_budget(recorders[name], k, group)
            received = gpu._sum_over(group, recorders[name].rows[-1])
            assert received == group.size() * tokens * k, f"{name} k'={k}: {received} rows"
        if hasattr(manager, "router_topk"):
            assert manager.router_topk == k
        error = gpu.relative_error(outputs["flex"], outputs["alltoall"])
        assert error < 1e-2, f"flex/{backend} vs alltoall at k'={k}: {error}"

    # Training: EMoE sampling, then M-MoE layer budgets changing between steps (same k on all ranks).
    layer = layers["flex"]
    layer.train()
    torch.manual_seed(1000 + rank)
    out, _ = layer(x)
    out.float().square().mean().backward()
    gpu.check_exact_budget(recorders["flex"], TOPK, group)
    _assert_finite_grads(layer, ROUTER_GRAD)

    builders.reseed(0)
    mmoe = _te_layer(
        _te_config(moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend=backend,
                   moe_permute_fusion=fused),
        ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4)),
    )
    recorder = gpu.DispatchRecorder(mmoe)
    mmoe.train()
    for _ in range(3):
        mmoe.zero_grad(set_to_none=True)
        out, _ = mmoe(x)
        out.float().square().mean().backward()
        gpu.check_exact_budget(recorder, mmoe.router.dispatch_topk, group)
        _assert_finite_grads(mmoe, ROUTER_GRAD)


@pytest.mark.gpu
@needs_gpu_and_te
@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_flex_dispatcher_follows_the_budget(backend):
    """(d) The flex dispatcher at EP=2 (2 GPUs): at k' = 1, k, 2k, 3k it dispatches exactly k'
    experts per token and matches the alltoall dispatcher with the same weights; EMoE and M-MoE
    training steps run. Skips unless deep_ep (or its HybridEP) is importable and 2 GPUs exist."""
    ok, reason = gpu.flex_backend_status(backend)
    if not ok:
        pytest.skip(reason)
    gpu.run_nccl(_flex, world_size=2, ep=2, args=(backend,))
