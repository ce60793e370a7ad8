"""User errors and how every entry point reports them: one line on stderr, printed once (rank 0),
naming the flag or file and what is allowed, exit status 2. Internal errors keep their traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable


class UsageError(ValueError):
    """Bad input from the user (a flag, a file, a folder): the message names it and what is allowed.

    A `ValueError`, so library callers can keep catching that; entry points catch this class only.
    """


def is_rank_zero() -> bool:
    """Rank 0 of the job as its launcher numbers it (torchrun, Slurm), or a lone process."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    return True


def report_usage_error(prog: str, error: BaseException) -> None:
    """Print `prog: error: <message>` as one line on stderr on rank 0, then exit with status 2."""
    if is_rank_zero():
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def exits_on_usage_error(prog: str) -> Callable:
    """Decorate a `main(argv)` so that a `UsageError` ends it through `report_usage_error`."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UsageError as error:
                report_usage_error(prog, error)

        return run

    return decorate


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors (unknown or missing flags, bad choices) are
    `UsageError`s, so they too end as one line through `exits_on_usage_error`."""

    def error(self, message: str):
        raise UsageError(message)
