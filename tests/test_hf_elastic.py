"""Elastic routing on transformers models (`megatron_emoe.hf`), against the real transformers
classes: tiny random fp32 models of each family (tests/conversion_models.py)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_emoe import ElasticMoEConfig, routing
from megatron_emoe.budget import TopP
from megatron_emoe.errors import UsageError
from megatron_emoe.hf import (
    elasticize,
    from_pretrained,
    get_active_experts,
    last_hr_loss,
    set_active_experts,
)
from tests.conversion_models import hf_config, hf_logits, save_hf_model, tokens

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]
EMOE = ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=0.1)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, folder of a tiny random model saved with save_pretrained)."""
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    return request.param, save_hf_model(request.param, str(folder))


def elastic_model(folder: str, elastic: ElasticMoEConfig = EMOE):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return elasticize(model, elastic).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_eval_at_a_budget_is_the_model_loaded_with_that_k(saved):
    """Eval at k' gives the logits of the same weights loaded with num_experts_per_tok = k'
    (k' = 1, the training k = 2, and 4 = all experts a DeepSeek token's groups reach)."""
    _, folder = saved
    model, ids = elastic_model(folder), tokens()
    for k in (1, None, 4):
        set_active_experts(model, k)
        expected = hf_logits(folder, ids, k)
        assert (logits(model, ids) - expected).abs().max().item() <= 1e-6, k


def test_per_layer_budget_routes_each_layer_at_its_own_k():
    """One budget per MoE layer: the model whose gate of layer i keeps top-k_i."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(hf_config("qwen3_moe")).eval()
    model = AutoModelForCausalLM.from_config(hf_config("qwen3_moe")).eval()
    model.load_state_dict(reference.state_dict())
    elasticize(model, EMOE)
    for layer, k in zip(reference.model.layers, (1, 3)):
        layer.mlp.gate.top_k = k
    set_active_experts(model, [1, 3])
    assert get_active_experts(model) == [1, 3]
    assert torch.equal(logits(model, tokens()), logits(reference, tokens()))


def test_refusals_name_what_is_allowed():
    torch.manual_seed(0)
    model = elasticize(AutoModelForCausalLM.from_config(hf_config("deepseek_v3")), EMOE)
    with pytest.raises(UsageError, match="already elastic"):
        elasticize(model, EMOE)
    for bad, message in ((0, r"\[1, 4\]"), (5, r"\[1, 4\]"), ([2, 2], "one entry per MoE layer"),
                         (TopP(1.5, 2), r"\(0, 1\]"), ("two", "int")):
        with pytest.raises(UsageError, match=message):
            set_active_experts(model, bad)
    with pytest.raises(UsageError, match="emoe-k-ideal"):
        elasticize(AutoModelForCausalLM.from_config(hf_config("qwen3_moe")),
                   ElasticMoEConfig(mode="emoe", k_ideal=9))
    from transformers import LlamaConfig
    dense = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(UsageError, match="model_type 'llama'|supports MoE model types"):
        elasticize(dense, EMOE)


def test_training_adds_hierarchical_router_loss_next_to_the_aux_loss():
    """Loss = LM loss + router_aux_loss_coef * aux + coeff * Σ_layers L_HR, the last computed from
    the recorded router logits over non-padding tokens; top-k routing is unchanged by it."""
    ids, mask = tokens(), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    losses = {}
    for coeff in (0.0, 0.5):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config("olmoe"))
        elasticize(model, ElasticMoEConfig(mode="topk", hr_loss_coeff=coeff)).train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        assert out.aux_loss is not None
        losses[coeff] = out
    keep = mask.reshape(-1).bool()
    expected = sum(routing.hierarchical_router_loss(torch.softmax(layer_logits[keep], -1))
                   for layer_logits in losses[0.5].router_logits)
    torch.testing.assert_close(losses[0.5].loss - losses[0.0].loss, 0.5 * expected)
    torch.testing.assert_close(losses[0.5].aux_loss, losses[0.0].aux_loss)


def test_emoe_training_samples_k_of_the_top_k_ideal():
    torch.manual_seed(0)
    model = elasticize(AutoModelForCausalLM.from_config(hf_config("mixtral")), EMOE).train()
    gate = model.model.layers[0].mlp.gate
    hidden = torch.randn(64, 32)
    _, gates, chosen = gate(hidden)
    pool = gate.elastic_state.selection.ranking_scores(hidden @ gate.weight.t(), None).topk(4).indices
    assert chosen.shape == (64, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    assert all(set(c.tolist()) <= set(p.tolist()) for c, p in zip(chosen, pool))
    assert not torch.equal(chosen.sort().values, pool[:, :2].sort().values)  # not plain top-k
    torch.testing.assert_close(gates.sum(-1), torch.ones(64))  # Mixtral renormalises


def test_save_pretrained_loads_in_plain_transformers_and_back_elastic(tmp_path):
    torch.manual_seed(0)
    model = elasticize(AutoModelForCausalLM.from_config(hf_config("qwen2_moe")), EMOE).eval()
    set_active_experts(model, 3)
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert saved["num_experts_per_tok"] == 3 and saved["elastic_moe"]["train_topk"] == 2
    ids = tokens()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.model.layers[0].mlp.gate.top_k == 3
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=0, atol=1e-6)
    again = from_pretrained(str(tmp_path)).eval()
    assert get_active_experts(again) == [3, 3]
    assert again.model.layers[0].mlp.gate.elastic_state.selection.elastic == EMOE
    assert again.model.layers[0].mlp.gate.top_k == 2  # trains at its own k again
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
    set_active_experts(again, None)
    again.train()
    again(input_ids=ids, labels=ids).loss.backward()
    assert last_hr_loss(again) is not None
    replain = elasticize(AutoModelForCausalLM.from_pretrained(tmp_path), EMOE)  # plain load, elastic again
    assert replain.num_experts_per_tok == 2 and replain.model.layers[0].mlp.gate.top_k == 2
    assert replain.config.num_experts_per_tok == 2 and get_active_experts(replain) == [None, None]
    with pytest.raises(UsageError, match="elastic_moe"):
        from_pretrained(save_hf_model("olmoe", str(tmp_path / "plain")))


def test_gradient_checkpointing_replays_the_emoe_draws():
    """Recompute in backward draws the forward's experts again: the same gradients as without
    activation checkpointing, and Σ L_HR counted once."""
    grads, totals = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = elasticize(AutoModelForCausalLM.from_config(hf_config("qwen3_moe")), EMOE).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(1)
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        totals.append(last_hr_loss(model))
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(*grads))
    torch.testing.assert_close(totals[0], totals[1])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_gates_keep_the_family_dtype(family, tmp_path):
    """In bf16, Mixtral's gates stay fp32 and Qwen's are cast to bf16, as their routers do: the
    elastic model at k' = 3 equals the model loaded with k = 3 bit for bit."""
    folder = save_hf_model(family, str(tmp_path / "hf"))
    ids = tokens()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, num_experts_per_tok=3).eval()
    model = elasticize(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), EMOE).eval()
    set_active_experts(model, 3)
    assert torch.equal(logits(model, ids), logits(plain, ids))


def test_a_deep_copy_routes_and_adds_its_own_hierarchical_router_loss():
    torch.manual_seed(0)
    model = elasticize(AutoModelForCausalLM.from_config(hf_config("olmoe")),
                       ElasticMoEConfig(mode="topk", hr_loss_coeff=0.5)).train()
    twin = copy.deepcopy(model)
    ids, mask = tokens(), torch.ones(2, 12, dtype=torch.long)
    mask[0, 6:] = 0
    original = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    copied = twin(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(original, copied)
    assert last_hr_loss(twin) is not None and twin.elastic_moe.shared is not model.elastic_moe.shared
    set_active_experts(twin, 4)
    assert get_active_experts(model) == [None, None]
