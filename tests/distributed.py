"""The one helper tests use to run a function in N real gloo processes (see `megatron_emoe.runtime.launch`).

`run_distributed_test(fn, world_size=2, ep=2, args=(...))` calls `fn(rank, *args)` on every rank
with Megatron's parallel state initialised, and fails the test with the failing rank's traceback.
"""

from megatron_emoe.runtime.launch import run_gloo as run_distributed_test

__all__ = ["run_distributed_test"]
