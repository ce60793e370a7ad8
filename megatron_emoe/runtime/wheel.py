"""Gaps of the megatron-core wheel's `megatron.training` that hit every machine, GPU or CPU."""

from __future__ import annotations

import functools
import importlib.util

from megatron.core.datasets import utils


def _compile_helpers_if_missing(compile_helpers):
    """The wheel ships `helpers_cpp` prebuilt but not the Makefile that `compile_helpers` runs:
    compile only when the built module is absent (a source checkout)."""

    @functools.wraps(compile_helpers)
    def maybe_compile():
        if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
            compile_helpers()

    maybe_compile.patched_by_megatron_emoe = True
    return maybe_compile


def apply() -> None:
    """Patch the wheel's gaps (idempotent: a patched function is recognised and left alone)."""
    if not getattr(utils.compile_helpers, "patched_by_megatron_emoe", False):
        utils.compile_helpers = _compile_helpers_if_missing(utils.compile_helpers)
