"""The training entry's forward step: the shared `runtime.step.forward_step`, plus the state a
training run owns — M-MoE budget draws numbered on after a resume, and the co-activation collector."""

from __future__ import annotations

from typing import Optional

from megatron.training import get_args

from megatron_emoe.routers import elastic_routers
from megatron_emoe.coactivation import TrainingCollector
from megatron_emoe.runtime.step import forward_step


class TrainingForwardStep:
    """Megatron's `forward_step_func` for one training run (the entry builds one per run)."""

    def __init__(self, collector: Optional[TrainingCollector] = None):
        self.collector = collector
        self._resumed: set[int] = set()  # model chunks whose draw counters are numbered on

    def __call__(self, data_iterator, model):
        self._resume_budget_draws(model)
        if self.collector is not None:
            self.collector.observe(model, getattr(get_args(), "curr_iteration", None))
        return forward_step(data_iterator, model)

    def _resume_budget_draws(self, model) -> None:
        """Number M-MoE step/layer budget draws on from the micro-batches already trained, once per
        model chunk: every router draws once per training micro-batch, so after a resume the counter
        is `consumed_train_samples / (micro_batch_size * data_parallel_size)` (ramps included)."""
        if id(model) in self._resumed or not model.training:
            return
        self._resumed.add(id(model))
        args = get_args()
        draws = args.consumed_train_samples // (args.micro_batch_size * args.data_parallel_size)
        for router in elastic_routers(model):
            router.budget_draws = draws
