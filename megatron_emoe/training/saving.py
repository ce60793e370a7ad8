"""Checkpoint saves of the training entry that never damage the previous checkpoint, and the `hf/`
folder of a converted model carried along to `--save`."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

import torch
from megatron.training import get_args

from megatron_emoe.files import write_text_atomically
from megatron_emoe.runtime.checkpoints import HF_SUBDIR, INCOMING, OUTGOING, TRACKER, iteration_dir

STAGING_PREFIX = ".staging-"


def publish(save_dir: str, staging_dir: str, iteration: int) -> None:
    """Move a finished staged save into `save_dir` and point the tracker at it (rank 0 only).

    An existing folder of the same iteration is swapped out, not written over, and removed only
    once the new one and the tracker are in place."""
    final = os.path.join(save_dir, iteration_dir(iteration))
    incoming = f"{final}{INCOMING}"
    outgoing = f"{final}{OUTGOING}"
    for leftover in (incoming, outgoing):
        shutil.rmtree(leftover, ignore_errors=True)
    os.replace(os.path.join(staging_dir, iteration_dir(iteration)), incoming)
    if os.path.exists(final):
        os.replace(final, outgoing)
    os.replace(incoming, final)
    write_text_atomically(os.path.join(save_dir, TRACKER), str(iteration))
    shutil.rmtree(outgoing, ignore_errors=True)
    for name in os.listdir(save_dir):  # this save's staging folder and any a failed save left
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


@contextlib.contextmanager
def _save_dir_swapped(args, path: str):
    saved = args.save
    args.save = path
    try:
        yield
    finally:
        args.save = saved


def staged(save_checkpoint):
    """Wrap Megatron's `save_checkpoint` so each global save goes to a staging folder first and is
    published only when every rank has finished; a failed or killed save leaves the previous
    checkpoint and the tracker as they were. Async and non-persistent saves pass through."""

    @functools.wraps(save_checkpoint)
    def save(iteration, *args_, **kwargs):
        args = get_args()
        if args.async_save or kwargs.get("non_persistent_ckpt") or kwargs.get("release"):
            return save_checkpoint(iteration, *args_, **kwargs)
        staging_dir = os.path.join(args.save, f"{STAGING_PREFIX}{iteration_dir(iteration)}")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            shutil.rmtree(staging_dir, ignore_errors=True)  # a save that died before
            os.makedirs(staging_dir)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        with _save_dir_swapped(args, staging_dir):
            result = save_checkpoint(iteration, *args_, **kwargs)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            publish(args.save, staging_dir, iteration)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return result

    return save


def carry_hf_config(load_dir: str | None, save_dir: str | None) -> None:
    """Copy the `hf/` folder of a converted checkpoint into `save_dir`, so that
    `emoe-convert-checkpoint megatron-to-hf` finds it there too (rank 0 only; copied whole or not)."""
    if not load_dir or not save_dir:
        return
    source, target = os.path.join(load_dir, HF_SUBDIR), os.path.join(save_dir, HF_SUBDIR)
    if not os.path.isdir(source) or os.path.exists(target):
        return
    os.makedirs(save_dir, exist_ok=True)
    incoming = f"{target}.incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(source, incoming)
    os.replace(incoming, target)
