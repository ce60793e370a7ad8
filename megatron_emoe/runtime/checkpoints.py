"""What is on disk in a Megatron checkpoint folder: the tracker, the latest iteration, whether a
checkpoint's files are whole, and the `hf/` folder of converted models.

The tracker is read strictly (`tracked_checkpoint`) and a checkpoint's files are checked cheaply
before anything loads it (`check_checkpoint_files`): a missing or garbled tracker, a folder the
tracker names that is not there, missing or garbled metadata and truncated `.distcp` files are
`UsageError`s naming the file, as are the library's errors when a file turns out garbled on
reading (`reading_checkpoint`).

The flags a checkpoint was saved with are read by `runtime.saved_args`; nothing here builds a
model (`runtime.model` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator

from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from megatron_emoe.errors import UsageError

TRACKER = "latest_checkpointed_iteration.txt"
HF_SUBDIR = "hf"  # config + tokenizer of a converted model's Hugging Face source
CHECKPOINT_FOLDER = re.compile(r"iter_\d+|release")  # Megatron's global checkpoint folders
# A staged save (`training.saving.publish`) renames the new copy of an iteration from
# `<folder>.incoming` and the old one to `<folder>.outgoing` before removing it.
INCOMING, OUTGOING = ".incoming", ".outgoing"
DIST_CONFIG = "metadata.json"  # dist_checkpointing's format record (sharded_backend, ...)
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every .distcp byte range
LEGACY_COMMON = "common.pt"  # older dist checkpoints keep the common state (args, ...) here
# ... newer ones in the .distcp files, under the key `load_common_state_dict` reads
COMMON_STATE_KEY = ShardedObject("common_state", None, (1,), (0,)).unique_key


def iteration_dir(iteration: int) -> str:
    """Megatron's folder name for a global checkpoint at `iteration`."""
    return f"iter_{iteration:07d}"


def checkpoint_folders(checkpoint_dir: str | None) -> list[str]:
    """The global checkpoints (`iter_N`, `release`) in `checkpoint_dir`, sorted; [] when it is not
    a folder. Staging folders of unfinished saves (`.staging-*`, `*.incoming`) are not checkpoints."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    return sorted(
        name for name in os.listdir(checkpoint_dir)
        if CHECKPOINT_FOLDER.fullmatch(name) and os.path.isdir(os.path.join(checkpoint_dir, name))
    )


def _listed(names: list[str]) -> str:
    return ", ".join(names[-3:]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def tracked_checkpoint(checkpoint_dir: str | None, flag: str = "--load") -> str | None:
    """The folder (`release` or `iter_N`) Megatron's tracker in `checkpoint_dir` names, read as
    strictly as Megatron reads it, and the folder must be there.

    None when `checkpoint_dir` is not given, does not exist, or holds neither a tracker nor a
    checkpoint folder (a new run). A `UsageError` naming `flag`, the folder and the file when the
    tracker is missing beside checkpoint folders (Megatron would not load them and would start
    again from iteration 0), unreadable, holds neither an iteration nor "release", or names a
    folder that is not there.
    """
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return None
    tracker = os.path.join(checkpoint_dir, TRACKER)
    present = checkpoint_folders(checkpoint_dir)
    where = f"{flag} {checkpoint_dir}"
    if not os.path.lexists(tracker):
        if not present:
            return None
        raise UsageError(
            f"{where} holds checkpoints ({_listed(present)}) but no {TRACKER}, so Megatron would "
            f"not load them (training would start again from iteration 0): write the iteration to "
            f"load (or 'release') into {tracker}"
        )
    try:
        with open(tracker, encoding="utf-8") as f:
            tracked = f.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{where}: cannot read {tracker} ({error})") from None
    if tracked == "release":
        name = "release"
    else:
        try:
            iteration = int(tracked)
        except ValueError:
            iteration = -1
        if iteration < 0:
            shown = tracked if len(tracked) <= 40 else tracked[:40] + "..."
            raise UsageError(
                f"{where}: {tracker} holds {shown!r}, not an iteration number or 'release'"
                + (f": write the iteration to load into it (checkpoints there: {_listed(present)})"
                   if present else "")
            )
        name = iteration_dir(iteration)
    if not os.path.isdir(os.path.join(checkpoint_dir, name)):
        left = [name + suffix for suffix in (INCOMING, OUTGOING)
                if os.path.isdir(os.path.join(checkpoint_dir, name + suffix))]
        raise UsageError(
            f"{where}: {tracker} names {name}, which is not in {checkpoint_dir} ("
            + (f"a save of it was interrupted and left {' and '.join(left)} (the new and the old "
               f"copy): rename one to {name}; " if left else "")
            + (f"checkpoints there: {_listed(present)}; write the iteration of one into the tracker"
               if present else "no checkpoint folder there") + ")"
        )
    return name


def latest_iteration(checkpoint_dir: str | None, flag: str = "--load") -> int | None:
    """The iteration Megatron's tracker in `checkpoint_dir` names (0 for a release), or None when
    there is no checkpoint; `UsageError` for a broken tracker (`tracked_checkpoint`)."""
    name = tracked_checkpoint(checkpoint_dir, flag)
    if name is None:
        return None
    return 0 if name == "release" else int(name.removeprefix("iter_"))


def latest_checkpoint_name(checkpoint_dir: str | None, flag: str = "--load") -> str | None:
    """The folder (`release` or `iter_N`) Megatron's tracker in `checkpoint_dir` names, or None;
    `UsageError` for a broken tracker (`tracked_checkpoint`)."""
    return tracked_checkpoint(checkpoint_dir, flag)


def check_checkpoint_files(checkpoint_dir: str, name: str, flag: str = "--load") -> None:
    """Cheap checks that the checkpoint `checkpoint_dir/name` is complete, before anything loads it:
    dist_checkpointing's `metadata.json` parses, torch_dist's `.metadata` unpickles, every `.distcp`
    file it indexes is there and as long as the byte ranges it records, and the common state (the
    saved args) is there. A `UsageError` names the file and what is wrong. torch_dcp checkpoints
    (a `.metadata` indexing no dist_checkpointing common state, and no `metadata.json`) get the
    `.metadata` and size checks; other formats (Megatron's legacy `torch`: `mp_rank_*` folders)
    pass unchecked."""
    folder = os.path.join(checkpoint_dir, name)
    where = f"{flag} {checkpoint_dir}"
    advice = ("a partial or corrupt checkpoint (an interrupted save or copy?): restore the folder, "
              f"or write the iteration of a complete checkpoint into {os.path.join(checkpoint_dir, TRACKER)}")
    if not os.path.isdir(folder):
        raise UsageError(f"{where}: {folder} is not a folder")
    config_path = os.path.join(folder, DIST_CONFIG)
    metadata_path = os.path.join(folder, DCP_METADATA)
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{where}: {config_path} is not readable JSON ({error}): {advice}") from None
        if not isinstance(config, dict) or "sharded_backend" not in config:
            raise UsageError(f"{where}: {config_path} has no 'sharded_backend' (not written by "
                             f"dist_checkpointing): {advice}")
        backend = config["sharded_backend"]
        if backend != "torch_dist":
            return  # another dist_checkpointing backend: its loader's own errors apply
        if not os.path.isfile(metadata_path):
            raise UsageError(f"{where}: {name}/ has no {DCP_METADATA} (the index of its .distcp "
                             f"files): {advice}")
    elif any(entry.startswith("mp_rank_") for entry in os.listdir(folder)):
        return  # Megatron's legacy torch format: torch.load's own errors apply
    elif os.path.isfile(metadata_path):
        backend = "torch_dcp"  # Megatron's torch_dcp / fsdp_dtensor formats: no metadata.json
    else:
        raise UsageError(f"{where}: {name}/ has no {DIST_CONFIG} (not a complete torch_dist "
                         f"checkpoint): {advice}")
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as error:  # noqa: BLE001 (any unpickling failure means a garbled file)
        raise UsageError(f"{where}: {metadata_path} is not readable ({type(error).__name__}: "
                         f"{error}): {advice}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UsageError(f"{where}: {metadata_path} is not a torch.distributed.checkpoint index: {advice}")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        path = info.relative_path
        needed[path] = max(needed.get(path, 0), info.offset + info.length)
    for relative, size in sorted(needed.items()):
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            raise UsageError(f"{where}: {path} is missing ({DCP_METADATA} records {size} bytes in "
                             f"it): {advice}")
        actual = os.path.getsize(path)
        if actual < size:
            raise UsageError(f"{where}: {path} is truncated ({actual} bytes, {DCP_METADATA} records "
                             f"{size}): {advice}")
    if backend != "torch_dist":
        if COMMON_STATE_KEY in metadata.state_dict_metadata:  # dist_checkpointing's, not torch_dcp
            raise UsageError(f"{where}: {name}/ has no {DIST_CONFIG} (not a complete torch_dist "
                             f"checkpoint): {advice}")
        return
    common = os.path.join(folder, LEGACY_COMMON)
    if os.path.isfile(common):
        if not zipfile.is_zipfile(common):
            raise UsageError(f"{where}: {common} is truncated or garbled (not a torch.save "
                             f"archive): {advice}")
    elif COMMON_STATE_KEY not in metadata.state_dict_metadata:
        raise UsageError(f"{where}: {name}/ holds no common state (no {LEGACY_COMMON}, none in its "
                         f".distcp files), so not the training args: {advice}")


def checked_checkpoint(checkpoint_dir: str | None, flag: str = "--load", step: int | None = None
                       ) -> str | None:
    """The checkpoint folder Megatron would load from `checkpoint_dir` (the tracker's, read by
    `tracked_checkpoint`; with `step`, Megatron's --ckpt-step, that iteration's), once its files
    pass `check_checkpoint_files`; None when there is no checkpoint to load."""
    if step:
        if os.path.isfile(os.path.join(checkpoint_dir, TRACKER)):
            tracked_checkpoint(checkpoint_dir, flag)  # Megatron reads it even then
        name = iteration_dir(step)
        if not os.path.isdir(os.path.join(checkpoint_dir, name)):
            present = checkpoint_folders(checkpoint_dir)
            raise UsageError(f"--ckpt-step {step}: {flag} {checkpoint_dir} has no {name} "
                             f"(checkpoints there: {_listed(present) if present else 'none'})")
    else:
        name = tracked_checkpoint(checkpoint_dir, flag)
    if name is not None:
        check_checkpoint_files(checkpoint_dir, name, flag)
    return name


def required_checkpoint(checkpoint_dir: str | None, flag: str = "--load", step: int | None = None) -> str:
    """`checked_checkpoint`, for readers that need one: a `UsageError` when there is none."""
    name = checked_checkpoint(checkpoint_dir, flag, step=step)
    if name is None:
        raise UsageError(f"{flag} {checkpoint_dir}: no Megatron checkpoint there (expected {TRACKER} "
                         "and its iter_N or release folder)")
    return name


# Errors of reading a file that say its bytes are wrong (truncated, garbled) or unreadable.
_FILE_ERRORS = (EOFError, OSError, pickle.UnpicklingError, UnicodeDecodeError, json.JSONDecodeError,
                zipfile.BadZipFile)


def _read_failure(error: BaseException) -> str | None:
    """What `error` says went wrong reading a checkpoint file (truncated, garbled bytes, I/O), or
    None when it is some other failure. torch.distributed.checkpoint wraps each rank's error."""
    roots = [exc for exc, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    for root in roots:
        if isinstance(root, _FILE_ERRORS) or (
            isinstance(root, RuntimeError) and "PytorchStreamReader" in str(root)
        ):
            message = " ".join(str(root).split())
            if "WeightsUnpickler error:" in message:  # torch.load's advice does not apply here
                message = message.split("WeightsUnpickler error:")[1].split(" Check the documentation")[0]
            message = message.strip()
            if len(message) > 200:
                message = message[:200] + "..."
            return type(root).__name__ + (f": {message}" if message else "")
    return None


@contextlib.contextmanager
def reading_checkpoint(checkpoint_dir: str, name: str, flag: str = "--load") -> Iterator[None]:
    """Turn a library error from reading the checkpoint `checkpoint_dir/name` that says one of
    its files is corrupt or truncated into a `UsageError` naming the folder; others pass."""
    try:
        yield
    except UsageError:
        raise
    except (Exception, CheckpointException) as error:
        cause = _read_failure(error)
        if cause is None:
            raise
        raise UsageError(
            f"{flag} {checkpoint_dir}: a file of {os.path.join(checkpoint_dir, name)} is corrupt, "
            f"truncated or unreadable ({cause}): restore the folder, or write the iteration of a "
            f"complete checkpoint into {os.path.join(checkpoint_dir, TRACKER)}"
        ) from error
