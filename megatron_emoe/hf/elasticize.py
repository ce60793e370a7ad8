"""`elasticize` a transformers MoE model in place, and set its inference budget.

Every MoE block's `gate` becomes an elastic gate (`elastic_gate`); one `ElasticModel` record on
the model holds the config, the Megatron-named view used for validation, and two hooks: one
reads the attention mask (padding is left out of L_HR), one adds coeff * Σ_layers L_HR to the
loss in training, as Megatron attaches each layer's coeff * L_HR.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch

from megatron_emoe.budget import Budget, BudgetLike
from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.errors import UsageError
from megatron_emoe.hf.elastic_gate import GateState, ModelRouting, is_elastic, make_elastic
from megatron_emoe.hf.gate_styles import GateStyle, style_of
from megatron_emoe.hf.moe_view import MoEView, moe_view
from megatron_emoe.hf.selection import ElasticSelection

CONFIG_KEY = "elastic_moe"  # the config.json entry holding the elastic settings
_GATE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate$")


@dataclasses.dataclass
class ElasticModel:
    """The elastic settings of one elasticized model."""

    elastic: ElasticMoEConfig
    style: GateStyle
    view: MoEView
    gates: list  # the elastic gates, in layer order
    shared: ModelRouting
    budget: Optional[Budget] = None


def elasticize(model: torch.nn.Module, elastic: ElasticMoEConfig) -> torch.nn.Module:
    """Make every MoE gate of the transformers `model` elastic (in place) and return the model.

    Raises `UsageError` for an unsupported family, a model without MoE gates, a second call, or
    an `elastic` config that does not fit the model (the same rules as on the Megatron path).
    """
    if getattr(model, "elastic_moe", None) is not None or any(is_elastic(m) for m in model.modules()):
        raise UsageError("this model is already elastic: elasticize() it once")
    config = model.config
    entry = getattr(config, CONFIG_KEY, None)
    if isinstance(entry, dict) and "train_topk" in entry:
        _restore_training_k(model, int(entry["train_topk"]))
    style = style_of(config)
    found = sorted((int(m[1]), module) for name, module in model.named_modules()
                   if (m := _GATE_NAME.search(name)) and hasattr(module, "weight"))
    if not found:
        raise UsageError(f"found no MoE gate (layers.N.mlp.gate) in this {config.model_type} model")
    view = moe_view(style, config.num_hidden_layers, [index + 1 for index, _ in found])
    elastic.validate(view)
    shared = ModelRouting()
    gates = [
        make_elastic(gate, GateState(ElasticSelection(style, elastic, index + 1), index + 1, shared))
        for index, gate in found
    ]
    record = ElasticModel(elastic, style, view, gates, shared)
    model.elastic_moe = record  # a plain attribute: not a module, not in the state dict
    model.register_forward_pre_hook(_read_padding, with_kwargs=True)
    model.register_forward_hook(_add_hr_loss)
    set_active_experts(model, elastic.inference_budget)
    return model


def _restore_training_k(model: torch.nn.Module, topk: int) -> None:
    """A folder saved at a budget k' loaded by plain transformers routes at k': put the training k
    back (config, the causal LM's aux-loss k, every gate) before making it elastic again."""
    model.config.num_experts_per_tok = topk
    for name, module in model.named_modules():
        if hasattr(module, "num_experts_per_tok"):
            module.num_experts_per_tok = topk
        if hasattr(module, "top_k") and _GATE_NAME.search(name):
            module.top_k = topk


def elastic_record(model: torch.nn.Module) -> ElasticModel:
    """The `ElasticModel` of an elasticized model (a DeepSpeed engine's too), else `UsageError`."""
    record = getattr(getattr(model, "module", model), "elastic_moe", None)
    if record is None:
        record = getattr(model, "elastic_moe", None)
    if not isinstance(record, ElasticModel):
        raise UsageError("the model is not elastic: call megatron_emoe.hf.elasticize(model, config)")
    return record


def set_active_experts(model: torch.nn.Module, budget: BudgetLike) -> None:
    """Route every MoE layer to its top-k' experts in eval mode: an int, one per MoE layer, a
    `TopP`, a `Budget`, or None (the training top-k). Training forwards keep their routing.

    The config's `num_experts_per_tok` follows an int budget, so `save_pretrained` writes a folder
    that plain transformers runs at that budget (other budgets keep the training k there)."""
    record = elastic_record(model)
    parsed = Budget.of(budget, flag="set_active_experts k")
    if parsed is not None:
        parsed = parsed.validate(record.view, flag="set_active_experts k")
    record.budget = parsed
    for gate in record.gates:
        state = gate.elastic_state
        state.eval_budget = (None if parsed is None
                             else parsed.for_layer(record.view, state.layer_number, False))
    config = getattr(model, "module", model).config
    fixed = parsed is not None and isinstance(parsed.value, int)
    config.num_experts_per_tok = parsed.value if fixed else record.style.topk
    setattr(config, CONFIG_KEY, {
        "config": dataclasses.asdict(record.elastic),
        "train_topk": record.style.topk,
        "budget": None if parsed is None else parsed.to_json(),
    })


def get_active_experts(model: torch.nn.Module) -> list:
    """The eval-time k' (or `TopP`) of each MoE layer, None where the training top-k applies."""
    return [gate.elastic_state.eval_budget for gate in elastic_record(model).gates]


def set_training_step(model: torch.nn.Module, step: int) -> None:
    """Tell every gate which optimizer step the next micro-batches belong to (M-MoE budgets are
    drawn per step or per (step, micro-batch), see `TrainingDraws.begin_step`)."""
    for gate in elastic_record(model).gates:
        gate.elastic_state.selection.draws.begin_step(step)


def last_hr_loss(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """Σ_layers L_HR of the last training forward (without the coefficient), None if not computed
    (taken when the forward ended, so activation recompute in backward does not count twice)."""
    return elastic_record(model).shared.hr_total


def _read_padding(module, args, kwargs) -> None:
    """Forward pre-hook: start this forward's L_HR list and read its padding from the mask.
    Hooks find the record on the module they run for, so a deep copy uses its own."""
    shared = module.elastic_moe.shared
    shared.hr_losses, shared.hr_total = [], None
    mask = kwargs.get("attention_mask")
    shared.padding = mask.reshape(-1) == 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _add_hr_loss(module, args, output):
    """Forward hook: add coeff * Σ_layers L_HR to the loss of a training forward."""
    record = module.elastic_moe
    coeff = record.elastic.hr_loss_coeff
    losses = record.shared.hr_losses
    if not (module.training and coeff and losses):
        return output
    total = torch.stack(losses).sum()
    record.shared.hr_total = total.detach()
    if getattr(output, "loss", None) is not None:
        output.loss = output.loss + coeff * total
    return output
