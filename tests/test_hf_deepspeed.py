"""DeepSpeed-MoE expert parallelism for elastic transformers models (`megatron_emoe.hf`):
conversion into `deepspeed.moe.layer.MoE` at EP = 2, logits, a few ZeRO-2 steps, and back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_emoe import ElasticMoEConfig
from tests.conversion_models import hf_config, tokens
from tests.distributed import run_distributed_test

# found, not imported: importing deepspeed here would set it up in every test's process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (make install adds it)")

ZERO2 = Path(__file__).resolve().parents[1] / "examples" / "configs" / "ds_zero2.json"
EMOE = ElasticMoEConfig(mode="emoe", k_ideal=4, hr_loss_coeff=1e-2)
# per-token budgets: DeepSpeed gets the routes past a token's budget as evicted ones
MMOE_TOKEN = ElasticMoEConfig(mode="mmoe", mmoe_k_choices=(1, 2, 4), mmoe_sample_level="token")


def _logits(model, ids, budget):
    from megatron_emoe.hf import set_active_experts

    model.eval()
    set_active_experts(model, budget)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return parts


def _expert_parallel_finetune(rank, family, results):
    import copy
    import os

    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from transformers import AutoModelForCausalLM

    from megatron_emoe.hf import elasticize, set_training_step
    from megatron_emoe.hf.deepspeed_moe import (
        DeepSpeedMoEBlock, from_deepspeed_moe, init_distributed, to_deepspeed_moe)

    os.environ["LOCAL_RANK"] = str(rank)  # what torchrun would set; DeepSpeed's engine reads it
    init_distributed()
    torch.manual_seed(0)
    model = elasticize(AutoModelForCausalLM.from_config(hf_config(family)), EMOE)
    ids = tokens(seed=10 + rank)  # each rank its own data
    before = {budget: _logits(model, ids, budget) for budget in (None, 4)}
    experts = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    to_deepspeed_moe(model, ep_size=2)
    block = model.model.layers[1].mlp
    assert isinstance(block, DeepSpeedMoEBlock) and block.moe.num_local_experts == 4
    local = torch.stack([e.gate_up.weight for e in block.moe.deepspeed_moe.experts.deepspeed_experts])
    assert torch.equal(local, experts[4 * rank: 4 * rank + 4])
    diffs = {budget: (_logits(model, ids, budget) - want).abs().max().item()
             for budget, want in before.items()}

    # training-mode forwards draw the same per-token budgets and experts on both sides
    torch.manual_seed(0)
    plain = elasticize(AutoModelForCausalLM.from_config(hf_config(family)), MMOE_TOKEN).train()
    converted = to_deepspeed_moe(copy.deepcopy(plain), ep_size=2).train()
    outputs = []
    for candidate in (plain, converted):
        torch.manual_seed(5)
        outputs.append(candidate(input_ids=ids).logits.detach())
    diffs["mmoe-token training"] = (outputs[0] - outputs[1]).abs().max().item()

    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    config = json.loads(ZERO2.read_text())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = []
    for step in range(3):
        engine.train()
        set_training_step(model, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    trained = _logits(model, ids, 3)
    from_deepspeed_moe(model)
    back = _logits(model, ids, 3)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach()
    results[rank] = {
        "diffs": diffs, "losses": losses, "round_trip": (back - trained).abs().max().item(),
        "experts_moved": not torch.equal(gate_up, experts),
        "same_experts_on_ranks": all(torch.equal(p, gate_up) for p in _gathered(gate_up)),
        "same_router_on_ranks": all(torch.equal(p, model.model.layers[1].mlp.gate.weight.detach())
                                    for p in _gathered(model.model.layers[1].mlp.gate.weight.detach())),
    }
    if rank == 0:
        torch.save(results[rank], results["path"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_expert_parallel_deepspeed_moe_finetunes_and_converts_back(family, tmp_path):
    """EP = 2 on 2 gloo ranks: the converted model's logits equal the transformers model's at k
    and at k' = 4, and in training with M-MoE per-token budgets (1e-5, fp32); three ZeRO-2 EMoE
    steps train experts and router; gathered back into transformers experts, the model computes
    what the DeepSpeed model computed."""
    results = {"path": str(tmp_path / "rank0.pt")}
    run_distributed_test(_expert_parallel_finetune, world_size=2, args=(family, results), timeout=300)
    found = torch.load(results["path"])
    assert max(found["diffs"].values()) <= 1e-5, found["diffs"]
    assert all(torch.isfinite(torch.tensor(found["losses"]))), found["losses"]
    assert found["experts_moved"] and found["same_experts_on_ranks"] and found["same_router_on_ranks"]
    assert found["round_trip"] <= 1e-5
