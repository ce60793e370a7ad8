"""Training-time co-activation (`--coactivation-dir`): the training entry owns one
`TrainingCollector`, the forward step feeds it, and each checkpoint save writes it."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

from megatron_emoe.coactivation.recorder import CoactivationRecorder
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.coactivation.storage import TRAIN_TAG, load, write_reduced


class TrainingCollector:
    """Training-time co-activation for `--coactivation-dir DIR`.

    `observe(model, iteration)` (from the forward step) hooks each model chunk once. `write(i)`
    (at every checkpoint save; a collective) writes the window since the last write as
    `DIR/train_iter_XXXXXXX.npz` and the whole run as `DIR/train.npz` plus `DIR/train/*.png`.
    A run resumed at the iteration `DIR/train.npz` ends at continues that total.
    """

    def __init__(self, directory: str, *, heatmaps: bool = True):
        self.directory = directory
        self.heatmaps = heatmaps
        self.recorder = CoactivationRecorder(phase="train", entropy=False)
        self.total: Optional[Coactivation] = None
        self.window_start: Optional[int] = None
        self.last_iteration: Optional[int] = None
        self._chunks: set[int] = set()

    def observe(self, model, iteration: Optional[int] = None) -> None:
        if id(model) not in self._chunks:
            self._chunks.add(id(model))
            self.recorder.add(model).attach()
        if iteration is None or not model.training:
            return
        if self.window_start is None:
            self.window_start = iteration
            self.total = self._resumed_total(iteration)
        self.last_iteration = iteration

    def _resumed_total(self, start: int) -> Optional[Coactivation]:
        path = os.path.join(self.directory, f"{TRAIN_TAG}.npz")
        if not os.path.isfile(path):
            return None
        previous = load(path)
        return previous if previous.meta.get("iteration_end") == start else None

    def write(self, iteration: int) -> Optional[Coactivation]:
        """Reduce the window (every rank calls this) and write it on rank 0; returns the total."""
        if not self._chunks:
            return self.total
        window = self.recorder.reduce()
        self.recorder.reset()
        if not window.counts:
            return self.total
        window.meta.update(tag=f"{TRAIN_TAG}_iter_{iteration:07d}", iteration_end=iteration)
        if self.window_start is not None:
            window.meta["iteration_start"] = self.window_start
        if self.total is None:
            self.total = dataclasses.replace(window, meta=dict(window.meta))
        else:
            self.total = self.total.merged(window)
        write_reduced(window, self.directory, window.meta["tag"], heatmaps=False)
        write_reduced(self.total, self.directory, TRAIN_TAG, heatmaps=self.heatmaps)
        self.window_start = iteration
        return self.total

    def finish(self) -> Optional[Coactivation]:
        """Write what the last save missed (every rank calls this), then remove the hooks."""
        try:
            if self.last_iteration is not None:
                self.write(self.last_iteration + 1)
        finally:
            self.recorder.detach()
        return self.total


def writing_at_saves(save_checkpoint, collector: TrainingCollector):
    """Wrap Megatron's `save_checkpoint(iteration, ...)` so that each save also writes `collector`'s
    window (all ranks call `save_checkpoint`, so the reduction is safe there)."""

    @functools.wraps(save_checkpoint)
    def save_and_write(iteration, *args, **kwargs):
        result = save_checkpoint(iteration, *args, **kwargs)
        if not kwargs.get("release"):
            collector.write(iteration)
        return result

    return save_and_write
