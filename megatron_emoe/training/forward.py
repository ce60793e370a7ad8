"""The training entry's forward step: the shared `runtime.step.forward_step`, plus the state a
training run owns — the optimizer step the routers draw M-MoE budgets for, and the co-activation
collector."""

from __future__ import annotations

from typing import Optional

from megatron.training import get_args

from megatron_emoe.coactivation import TrainingCollector
from megatron_emoe.routers import set_training_step
from megatron_emoe.runtime.step import forward_step


class TrainingForwardStep:
    """Megatron's `forward_step_func` for one training run (the entry builds one per run)."""

    def __init__(self, collector: Optional[TrainingCollector] = None):
        self.collector = collector

    def __call__(self, data_iterator, model):
        iteration = getattr(get_args(), "curr_iteration", None)
        if model.training and iteration is not None:
            # Megatron's iteration counter, restored on resume: budgets continue where they were.
            set_training_step(model, iteration)
        if self.collector is not None:
            self.collector.observe(model, iteration)
        return forward_step(data_iterator, model)
