"""Where an elastic router's training-time random choices come from: one `TrainingDraws` per
router, shared by the Megatron router and any other router built on `megatron_emoe.routing`.

- Every training forward takes a key from torch's default CPU generator. Activation checkpointing
  (Megatron's, Transformer Engine's and torch's) saves that generator with the forward and restores
  it for the recompute, so a recompute gets its forward's key back however many forwards ran in
  between (1F1B warm-up, interleaved stages), just as dropout replays.
- EMoE samples and per-token budgets come from a generator seeded by (key, data rank): ranks that
  hold different tokens draw independently, ranks that hold the same tokens agree.
- Model- and layer-level M-MoE budgets are a pure function of (seed, stream, step, micro-batch),
  the same on every rank; the micro-batch index is the order of first sight within the step,
  remembered under the key for the recompute.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_emoe import routing

# Keys remembered without `begin_step` (a model driven outside a training loop).
MAX_REMEMBERED_KEYS = 4096
RESAMPLE_EVERY = ("global-batch", "micro-batch")


class TrainingDraws:
    """One router's training draws: keys, per-rank generators and M-MoE budget counters."""

    def __init__(self, seed: int, resample_every: str = "micro-batch"):
        if resample_every not in RESAMPLE_EVERY:
            raise ValueError(f"resample_every must be one of {RESAMPLE_EVERY}, got {resample_every!r}")
        self.seed = seed
        self.resample_every = resample_every
        self.step: Optional[int] = None  # the optimizer step (`begin_step`); None: not told
        self.microbatches_seen = 0  # micro-batches first seen in this step
        self._microbatch_of_key: dict[int, int] = {}
        self._generator: Optional[torch.Generator] = None

    def begin_step(self, step: int) -> None:
        """Enter optimizer step `step` (call before each micro-batch; a no-op within a step).
        Without it every forward counts as a step of its own."""
        if step != self.step:
            self.step = step
            self.microbatches_seen = 0
            self._microbatch_of_key.clear()

    def next_key(self) -> tuple[int, int]:
        """(key, micro-batch index) of this training forward; a recompute gets its forward's."""
        key = int(torch.randint(2**62, (1,)))
        microbatch = self._microbatch_of_key.get(key)
        if microbatch is None:
            microbatch = self._microbatch_of_key[key] = self.microbatches_seen
            self.microbatches_seen += 1
            if len(self._microbatch_of_key) > MAX_REMEMBERED_KEYS:
                del self._microbatch_of_key[next(iter(self._microbatch_of_key))]
        return key, microbatch

    def generator(self, key: int, data_rank: int, device) -> torch.Generator:
        """A generator on `device` seeded by the key and the rank's data position (the global
        rank of the first of the ranks that hold the same tokens)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(routing.mix_seed(key, data_rank))

    def budget(self, choices: Sequence[int], weights: Optional[Sequence[float]], stream: int,
               microbatch: int) -> int:
        """The model- (stream 0) or layer-level (stream = layer slot) M-MoE budget: per
        optimizer step with "global-batch" resampling, else per (step, micro-batch)."""
        if self.step is None:
            counter = microbatch
        elif self.resample_every == "global-batch":
            counter = self.step
        else:
            counter = routing.mix_seed(self.step, microbatch)
        return routing.budget_draw(choices, self.seed, stream, counter, weights)
