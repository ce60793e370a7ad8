"""Missing, partial and corrupt checkpoint files are refused, naming the file and what is wrong: by
the training entry before any model is built (and a --save folder whose checkpoints lost their
tracker is never trained over from iteration 0), and by every tool.

Every case corrupts a copy of the session's tiny checkpoint (`emoe_checkpoint`, tests/conftest.py):
no test here trains. The checks themselves run in-process (`preflight`, the tools' `main`); a few
cases go through the real training entry to show that it stops before the first iteration and
leaves the folder untouched.
"""

from __future__ import annotations

import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_emoe import coactivation
from megatron_emoe.cli.convert_checkpoint import main as convert_main
from megatron_emoe.cli.elastic_eval import main as eval_main
from megatron_emoe.cli.search_budget_allocation import main as search_main
from megatron_emoe.errors import UsageError
from megatron_emoe.runtime import checkpoints, saved_args
from megatron_emoe.training import preflight
from tests.training_runs import REPO, environment, entry_command, usage_error

TRACKER = checkpoints.TRACKER


# ---------------------------------------------------------------------------------------------
# Corruptions of a copied checkpoint folder (`ckpt`: the --save folder; `it`: its iter_N folder)
# ---------------------------------------------------------------------------------------------
def _storage(it: Path):
    """Key -> where torch.distributed.checkpoint stored it (relative_path, offset, length)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(it)).read_metadata()
    return {index.fqn: info for index, info in metadata.storage_data.items()}


def _overwrite_item(it: Path, key_prefix: str) -> str:
    """Overwrite the bytes of the first indexed item whose key starts with `key_prefix` (same
    size, so no size check sees it); returns the file."""
    storage = _storage(it)
    info = storage[next(key for key in sorted(storage) if key.startswith(key_prefix))]
    with open(it / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\x00garbage" * (info.length // 8) + b"\x00" * (info.length % 8))
    return info.relative_path


def _truncate(path: Path, fraction: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


# name -> (edit(ckpt, it), fragments the refusal must name)
CORRUPTIONS = {
    "tracker_missing": (lambda ckpt, it: (ckpt / TRACKER).unlink(), [TRACKER, "iteration 0", "iter_0000004"]),
    "tracker_garbage": (lambda ckpt, it: (ckpt / TRACKER).write_text("four\n"), [TRACKER, "'four'"]),
    "tracker_not_utf8": (lambda ckpt, it: (ckpt / TRACKER).write_bytes(b"\xff\xfe4"),
                         [TRACKER, "cannot read"]),
    "tracker_names_missing_folder": (lambda ckpt, it: (ckpt / TRACKER).write_text("9"),
                                     [TRACKER, "iter_0000009", "not in"]),
    "distcp_truncated": (lambda ckpt, it: _truncate(it / "__0_0.distcp"), ["__0_0.distcp", "truncated"]),
    "distcp_tail_cut": (lambda ckpt, it: _truncate(it / "__1_0.distcp", 0.999),
                        ["__1_0.distcp", "truncated"]),
    "distcp_missing": (lambda ckpt, it: (it / "__1_0.distcp").unlink(), ["__1_0.distcp", "missing"]),
    "metadata_missing": (lambda ckpt, it: (it / ".metadata").unlink(), ["iter_0000004/", ".metadata"]),
    "metadata_truncated": (lambda ckpt, it: _truncate(it / ".metadata"), [".metadata", "not readable"]),
    "metadata_garbled": (lambda ckpt, it: (it / ".metadata").write_bytes(b"not a pickle" * 50),
                         [".metadata", "not readable"]),
    "metadata_json_garbled": (lambda ckpt, it: (it / "metadata.json").write_text('{"sharded_backend": '),
                              ["metadata.json", "not readable JSON"]),
    "metadata_json_missing": (lambda ckpt, it: (it / "metadata.json").unlink(), ["metadata.json"]),
    # Same size, garbled bytes: only reading the common state (the saved args) finds it.
    "common_state_garbled": (lambda ckpt, it: _overwrite_item(it, "common_state"),
                             ["iter_0000004", "corrupt", "UnpicklingError"]),
}


@pytest.fixture
def corrupt(emoe_checkpoint, tmp_path):
    """`corrupt(name)`: a copy of the session's checkpoint with corruption `name` applied (None:
    an intact copy); returns (its folder, the fragments the refusal must name)."""

    def make(name: str | None):
        ckpt = tmp_path / f"ckpt_{name or 'intact'}"
        shutil.copytree(emoe_checkpoint.path, ckpt)
        if name is None:
            return ckpt, []
        edit, fragments = CORRUPTIONS[name]
        edit(ckpt, ckpt / "iter_0000004")
        return ckpt, fragments

    return make


def _training_args(load, save, **overrides) -> Namespace:
    """The flags `preflight.check_checkpoints` reads, as a run resuming the session's
    checkpoint (EMoE routing, 4 experts) sets them; without its optimizer state, so that the
    schedule check (tested in test_training_checks) stays out of these."""
    values = dict(load=str(load) if load else None, save=str(save) if save else None, finetune=False,
                  allow_overwrite_save=False, num_experts=4, moe_router_mode="emoe", ckpt_step=None,
                  padded_vocab_size=None, no_load_optim=True, coactivation_dir=None)
    values.update(overrides)
    return Namespace(**values)


def _assert_names(message: str, folder: Path, fragments: list[str]) -> None:
    assert str(folder) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------
# The training entry's checks, in-process
# ---------------------------------------------------------------------------------------------
def test_the_intact_checkpoint_passes(corrupt):
    ckpt, _ = corrupt(None)
    args = _training_args(ckpt, ckpt)
    preflight.adopt_checkpoint_vocab(args)
    preflight.check_checkpoints(args)
    assert args.padded_vocab_size == 512
    assert saved_args.checkpoint_args(str(ckpt)).num_experts == 4


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_resume_from_a_corrupt_checkpoint_is_refused(corrupt, name):
    ckpt, fragments = corrupt(name)
    # adopt_checkpoint_vocab reads --load first in the entry; check_checkpoints refuses too.
    for check in (preflight.adopt_checkpoint_vocab, preflight.check_checkpoints):
        with pytest.raises(UsageError) as refusal:
            check(_training_args(ckpt, ckpt))
        _assert_names(str(refusal.value), ckpt, ["--load", *fragments])


@pytest.mark.parametrize("name", ["tracker_missing", "tracker_garbage", "tracker_names_missing_folder"])
def test_save_folder_with_a_broken_tracker_is_refused_unless_overwrite_is_allowed(corrupt, name):
    ckpt, fragments = corrupt(name)
    with pytest.raises(UsageError) as refusal:
        preflight.check_checkpoints(_training_args(None, ckpt))
    _assert_names(str(refusal.value), ckpt, ["--save", "--allow-overwrite-save", *fragments])
    preflight.check_checkpoints(_training_args(None, ckpt, allow_overwrite_save=True))


def test_new_empty_and_unfinished_save_folders_start_fresh(tmp_path):
    staged = tmp_path / "staged"
    (staged / ".staging-iter_0000002" / "iter_0000002").mkdir(parents=True)  # a save that died
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new", tmp_path / "empty", staged):
        args = _training_args(folder, folder)  # what a Slurm requeue passes
        preflight.adopt_checkpoint_vocab(args)
        preflight.check_checkpoints(args)
        preflight.check_checkpoints(_training_args(None, folder))
        assert checkpoints.latest_iteration(str(folder)) is None


def test_interrupted_resave_names_the_copies_it_left(corrupt):
    ckpt, _ = corrupt(None)
    # saving.publish killed between its renames: the tracker names a folder that is away.
    (ckpt / "iter_0000004").rename(ckpt / "iter_0000004.outgoing")
    with pytest.raises(UsageError, match=r"iter_0000004\.outgoing.*rename one to iter_0000004"):
        preflight.check_checkpoints(_training_args(ckpt, ckpt))


def test_ckpt_step_loads_its_own_folder(corrupt):
    ckpt, _ = corrupt(None)
    (ckpt / TRACKER).unlink()  # Megatron loads --ckpt-step's folder without a tracker
    preflight.check_checkpoints(_training_args(ckpt, ckpt, ckpt_step=4))
    with pytest.raises(UsageError, match="--ckpt-step 3: --load .* has no iter_0000003"):
        preflight.check_checkpoints(_training_args(ckpt, ckpt, ckpt_step=3))


# ---------------------------------------------------------------------------------------------
# The training entry for real: refused before the first iteration, the folder untouched
# ---------------------------------------------------------------------------------------------
def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _resume_flags(emoe_checkpoint, load, save) -> list[str]:
    flags = list(emoe_checkpoint.flags)
    at = flags.index("--save")
    del flags[at:at + 2]
    flags += ["--save", str(save), "--train-iters", "6"]
    return flags + (["--load", str(load)] if load else [])


@pytest.mark.slow
@pytest.mark.parametrize("name,resume", [
    ("tracker_missing", True),  # the data-loss case: --load X --save X trained from iteration 0
    ("tracker_missing", False),
    ("distcp_truncated", True),
])
def test_entry_refuses_before_training_and_leaves_the_folder(emoe_checkpoint, corrupt, name, resume):
    ckpt, fragments = corrupt(name)
    before = _mtimes(ckpt)
    flags = _resume_flags(emoe_checkpoint, ckpt if resume else None, ckpt)
    proc = subprocess.run(entry_command(flags), cwd=REPO, env=environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=200)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "iteration        1/" not in proc.stdout
    error = [line for line in proc.stdout.splitlines() if line.startswith("emoe-pretrain: error:")]
    assert len(error) == 1, proc.stdout[-3000:]
    _assert_names(error[0], ckpt, ["--load" if resume else "--save", *fragments])
    assert _mtimes(ckpt) == before


# ---------------------------------------------------------------------------------------------
# The tools, in-process
# ---------------------------------------------------------------------------------------------
TOOL_CASES = ["tracker_garbage", "tracker_names_missing_folder", "distcp_truncated", "metadata_garbled",
              "metadata_json_garbled", "common_state_garbled"]


@pytest.mark.parametrize("name", TOOL_CASES)
def test_tools_refuse_a_corrupt_checkpoint(corrupt, name, tmp_path, capsys):
    ckpt, fragments = corrupt(name)
    runs = [
        (eval_main, ["--load", str(ckpt), "--output", str(tmp_path / "eval")]),
        (search_main, ["--load", str(ckpt), "--expert-flops-budget-ratio", "1.0",
                       "--output", str(tmp_path / "allocation.json")]),
        (convert_main, ["megatron-to-hf", "--load", str(ckpt), "--output", str(tmp_path / "hf")]),
    ]
    for main, argv in runs:
        _assert_names(usage_error(main, argv, capsys), ckpt, ["--load", *fragments])
    assert not any((tmp_path / name).exists() for name in ("eval", "allocation.json", "hf"))


def test_tools_refuse_a_checkpoint_without_its_tracker(corrupt, tmp_path, capsys):
    ckpt, _ = corrupt("tracker_missing")
    err = usage_error(eval_main, ["--load", str(ckpt), "--output", str(tmp_path / "eval")], capsys)
    _assert_names(err, ckpt, [TRACKER, "iter_0000004"])


def test_weights_garbled_on_disk_are_refused_where_they_load(corrupt, tmp_path, capsys):
    """Same-size garbage in a weight passes every up-front check; loading it must still end as a
    one-line refusal naming the checkpoint, not a traceback."""
    ckpt, _ = corrupt(None)
    _overwrite_item(ckpt / "iter_0000004", "embedding.word_embeddings.weight")
    err = usage_error(eval_main, ["--load", str(ckpt), "--output", str(tmp_path / "eval"),
                                  "--budgets", "2"], capsys)
    _assert_names(err, ckpt, ["--load", "iter_0000004", "corrupt"])


# ---------------------------------------------------------------------------------------------
# Co-activation files
# ---------------------------------------------------------------------------------------------
def _garbage_npz_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"empty": b"", "not_a_zip": b"PK\x03\x04 cut short", "pickled": b"\x80\x04garbage"}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.npz"
        paths[name].write_bytes(content)
    paths["foreign"] = folder / "foreign.npz"
    np.savez(paths["foreign"], x=np.arange(3))
    return paths


@pytest.mark.parametrize("kind", ["empty", "not_a_zip", "pickled", "foreign", "truncated"])
def test_corrupt_coactivation_file_is_refused_naming_it(tmp_path, kind):
    stats = coactivation.Coactivation({1: torch.ones(4, 4, dtype=torch.int64)}, {1: 4}, {1: 0.5})
    good = coactivation.save(stats, str(tmp_path / "good"), "train", heatmaps=False)
    if kind == "truncated":
        path = tmp_path / "bad" / "train.npz"
        path.parent.mkdir()
        path.write_bytes(Path(good).read_bytes()[:-40])
    else:
        path = _garbage_npz_files(tmp_path / "bad")[kind]
    with pytest.raises(UsageError) as refusal:
        coactivation.load(str(path))
    assert str(path) in str(refusal.value) and "co-activation file" in str(refusal.value)
    assert coactivation.load(good).tokens == {1: 4}


def test_elastic_eval_refuses_a_corrupt_training_coactivation_file(emoe_checkpoint, tmp_path, capsys):
    folder = tmp_path / "coactivation"
    folder.mkdir()
    (folder / "train.npz").write_bytes(b"PK\x03\x04 cut short")  # compared with the eval matrices
    err = usage_error(eval_main, ["--load", str(emoe_checkpoint.path), "--output", str(tmp_path / "eval"),
                                  "--budgets", "2", "--coactivation-dir", str(folder)], capsys)
    assert str(folder / "train.npz") in err and "co-activation file" in err
