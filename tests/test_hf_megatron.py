"""The transformers elastic gate and Megatron's `ElasticRouter` make the same choices.

Both routers get the same router weights (as `megatron_emoe.conversion` maps them), the same
hidden states and the same default-RNG state; in every mode they must pick the same experts with
the same gates. Then a converted checkpoint's logits at a budget k' are compared end to end.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_emoe import ElasticMoEConfig
from megatron_emoe.budget import TopP
from megatron_emoe.conversion.convert import HFToMegatron, hf_to_megatron
from megatron_emoe.conversion.families import family_for
from megatron_emoe.hf import elasticize, set_active_experts, set_training_step
from tests import builders
from tests.conversion_models import hf_config, megatron_logits, save_hf_model, tokens
from tests.distributed import run_distributed_test

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]
MODES = {
    "topk+hr": ElasticMoEConfig(mode="topk", hr_loss_coeff=0.1),
    "emoe": ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=0.1),
    "mmoe-layer": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4)),
    "mmoe-model": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 3, 4), mmoe_sample_level="model",
                                   mmoe_resample_every="global-batch"),
    "mmoe-token": ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 4), mmoe_sample_level="token",
                                   mmoe_k_weights=(1.0, 3.0)),
}
EVAL_BUDGETS = (1, 3, TopP(0.6, 4))
LAYER = 2  # the second decoder layer: MoE in every family (DeepSeek's first is dense)
TOKENS = 48


def megatron_router_config(family: str):
    """The Megatron TransformerConfig fields of the router that the conversion would set."""
    hf = hf_config(family)
    flags = family_for(hf).megatron_flags(hf)
    settings = dict(
        hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_moe_experts=flags["num-experts"], moe_router_topk=flags["moe-router-topk"],
        moe_router_pre_softmax=flags.get("moe-router-pre-softmax", False),
        moe_router_score_function=flags.get("moe-router-score-function", "softmax"),
        moe_router_enable_expert_bias=flags.get("moe-router-enable-expert-bias", False),
        moe_router_topk_scaling_factor=flags.get("moe-router-topk-scaling-factor"),
        moe_router_num_groups=flags.get("moe-router-num-groups"),
        moe_router_group_topk=flags.get("moe-router-group-topk"),
        moe_token_dispatcher_type="allgather",  # takes per-token budgets (M-MoE token, top-p)
    )
    return builders.moe_config(**settings)


def dense(gates: torch.Tensor, chosen: torch.Tensor, experts: int):
    """`[tokens, experts]` gates and map from `[tokens, k]` ones (zero gates are not routed)."""
    probs = torch.zeros(gates.shape[0], experts).scatter_add(1, chosen, gates.float())
    return probs, probs != 0


def _compare(rank, family, results):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config(family))
    gate_weight = hf_model.model.layers[LAYER - 1].mlp.gate.weight.detach()
    bias = 0.1 * torch.randn(gate_weight.shape[0])
    hidden = torch.randn(TOKENS, hf_model.config.hidden_size)
    config = megatron_router_config(family)
    found = {}
    for mode, elastic in MODES.items():
        builders.reseed(0)
        router = builders.moe_layer(config, elastic, layer_number=LAYER).router
        model = AutoModelForCausalLM.from_config(hf_config(family))
        elasticize(model, elastic)
        gate = model.model.layers[LAYER - 1].mlp.gate
        with torch.no_grad():
            router.weight.copy_(gate_weight)
            gate.weight.copy_(gate_weight)
            if hasattr(gate, "e_score_correction_bias"):
                router.expert_bias.copy_(bias)
                gate.e_score_correction_bias.copy_(bias)
        router.train()
        gate.train()
        pairs = []
        for step in (0, 0, 1):  # two micro-batches of one step, then the next step
            router.begin_step(step)
            set_training_step(model, step)
            state = torch.get_rng_state()
            probs, routing_map = router(hidden.unsqueeze(1))
            torch.set_rng_state(state)
            _, gates, chosen = gate(hidden)
            theirs = (probs.detach(), routing_map)
            pairs.append((theirs, dense(gates.detach(), chosen, config.num_moe_experts)))
        router.eval()
        gate.eval()
        for budget in EVAL_BUDGETS:
            router.set_budget(budget)
            set_active_experts(model, budget)
            with torch.no_grad():
                probs, routing_map = router(hidden.unsqueeze(1))
                _, gates, chosen = gate(hidden)
            pairs.append(((probs, routing_map), dense(gates, chosen, config.num_moe_experts)))
        found[mode] = pairs
    results[family] = found


@pytest.mark.parametrize("family", FAMILIES)
def test_same_experts_and_gates_as_the_megatron_router(family):
    """Training (three forwards: draws per micro-batch and per step) in every mode, then eval at
    k' = 1, 3 and top-p: identical expert maps, gates within 1e-6."""
    results = {}
    run_distributed_test(_compare, world_size=1, args=(family, results))
    for mode, pairs in results[family].items():
        for index, ((m_probs, m_map), (h_probs, h_map)) in enumerate(pairs):
            where = f"{family} {mode} forward {index}"
            assert torch.equal(m_map, h_map), where
            torch.testing.assert_close(m_probs.float(), h_probs, rtol=1e-6, atol=1e-6, msg=where)
        if mode == "emoe":  # the sampled experts differ from plain top-k and between micro-batches
            assert not torch.equal(pairs[0][0][1], pairs[1][0][1])


def test_converted_checkpoint_gives_the_same_logits_at_a_budget(tmp_path):
    """HF elastic model and its converted Megatron checkpoint (emoe-convert-checkpoint's code) at
    k' = 3, eval, fp32: logits within 1e-4 (the conversion tests' tolerance)."""
    hf = save_hf_model("deepseek_v3", str(tmp_path / "hf"), seed=2)
    hf_to_megatron(HFToMegatron(hf_path=hf, output=str(tmp_path / "megatron")))
    model = elasticize(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                       MODES["emoe"]).eval()
    ids = tokens(seed=4)
    set_active_experts(model, 3)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    theirs = megatron_logits(str(tmp_path / "megatron"), ids, 3)
    assert (ours - theirs).abs().max().item() <= 1e-4
