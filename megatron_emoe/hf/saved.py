"""Reload a folder written by `save_pretrained` of an elastic model, with its elastic settings.

`set_active_experts` keeps the `elastic_moe` entry of config.json current (the config, the
training k and the budget); plain transformers ignores the entry and routes top-k at the saved
`num_experts_per_tok`.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_emoe.budget import Budget
from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.errors import UsageError
from megatron_emoe.hf.elasticize import CONFIG_KEY, elasticize, set_active_experts


def from_pretrained(folder: str, **kwargs) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(folder, **kwargs)`, made elastic with the saved
    config and set to the saved budget. A folder without the entry is refused (`UsageError`)."""
    config = AutoConfig.from_pretrained(folder)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or "config" not in entry:
        raise UsageError(f"{folder}: config.json has no {CONFIG_KEY!r} entry; load it with "
                         "transformers and call megatron_emoe.hf.elasticize")
    settings = {key: tuple(value) if isinstance(value, list) else value
                for key, value in entry["config"].items()}
    elastic = ElasticMoEConfig(**settings)
    config.num_experts_per_tok = entry["train_topk"]
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, **kwargs)
    delattr(model.config, CONFIG_KEY)
    elasticize(model, elastic)
    set_active_experts(model, Budget.from_json(entry.get("budget"), flag=f"{folder} {CONFIG_KEY}.budget"))
    return model
