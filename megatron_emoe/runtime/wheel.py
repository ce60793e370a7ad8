"""Gaps of the megatron-core wheel's `megatron.training` that hit every machine, GPU or CPU."""

from __future__ import annotations

import functools

_applied = False


def _compile_helpers_if_missing(compile_helpers):
    """The wheel ships `helpers_cpp` prebuilt but not the Makefile that `compile_helpers` runs:
    compile only when the built module is absent (a source checkout)."""

    @functools.wraps(compile_helpers)
    def maybe_compile():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()

    return maybe_compile


def apply() -> None:
    """Patch the wheel's gaps once."""
    global _applied
    if _applied:
        return
    from megatron.core.datasets import utils

    utils.compile_helpers = _compile_helpers_if_missing(utils.compile_helpers)
    _applied = True
