"""Elastic MoE routing for Hugging Face transformers models (Qwen2/3-MoE, OLMoE, Mixtral,
DeepSeek-V2/V3): the same `ElasticMoEConfig`, routing maths and training draws as the Megatron
path, on the model's own `block.gate` modules.

    model = elasticize(AutoModelForCausalLM.from_pretrained(...), ElasticMoEConfig(mode="emoe"))
    set_active_experts(model, 4)        # eval at k' = 4; None: the training k
"""

from megatron_emoe.hf.elasticize import (
    elasticize,
    get_active_experts,
    last_hr_loss,
    set_active_experts,
    set_training_step,
)
from megatron_emoe.hf.saved import from_pretrained

__all__ = [
    "elasticize",
    "from_pretrained",
    "get_active_experts",
    "last_hr_loss",
    "set_active_experts",
    "set_training_step",
]
