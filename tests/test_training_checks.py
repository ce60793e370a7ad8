"""Bad input to the training entry is refused before any work, naming the flag; and a checkpoint
save that fails never damages the previous checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_emoe.runtime import checkpoints
from megatron_emoe.training import saving
from tests.training_runs import REPO, TINY_MODEL, environment, entry_command


# ---------------------------------------------------------------------------------------------
# Staged saves (no processes needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def megatron_args(tmp_path):
    from megatron.training import global_vars

    args = Namespace(save=str(tmp_path / "ckpt"), async_save=False)
    os.makedirs(args.save)
    global_vars.set_args(args)
    yield args
    global_vars.set_args(None)


def _fake_megatron_save(fail: bool):
    """Writes a checkpoint folder and tracker where Megatron would (args.save), then maybe fails."""

    def save(iteration, *_, **__):
        from megatron.training import get_args

        folder = Path(get_args().save) / checkpoints.iteration_dir(iteration)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shard_0.distcp").write_text(f"weights of {iteration}, part 1")
        if fail:
            raise OSError("disk full")
        (folder / "metadata.json").write_text("{}")
        (Path(get_args().save) / checkpoints.TRACKER).write_text(str(iteration))

    return save


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_staged_save_publishes_and_updates_tracker(megatron_args):
    saving.staged(_fake_megatron_save(fail=False))(5)
    ckpt = Path(megatron_args.save)
    assert _snapshot(ckpt) == {
        "iter_0000005/metadata.json": "{}",
        "iter_0000005/shard_0.distcp": "weights of 5, part 1",
        "latest_checkpointed_iteration.txt": "5",
    }
    assert megatron_args.save == str(ckpt)  # restored after the save


@pytest.mark.parametrize("same_iteration", [False, True])
def test_failed_save_leaves_previous_checkpoint_intact(megatron_args, same_iteration):
    saving.staged(_fake_megatron_save(fail=False))(5)
    before = _snapshot(Path(megatron_args.save))
    with pytest.raises(OSError, match="disk full"):
        saving.staged(_fake_megatron_save(fail=True))(5 if same_iteration else 10)
    after = {k: v for k, v in _snapshot(Path(megatron_args.save)).items() if not k.startswith(".staging-")}
    assert after == before
    assert checkpoints.latest_iteration(megatron_args.save) == 5
    # The next save clears the failed attempt's staging folder and succeeds.
    saving.staged(_fake_megatron_save(fail=False))(10)
    assert checkpoints.latest_iteration(megatron_args.save) == 10
    assert not [p for p in Path(megatron_args.save).iterdir() if p.name.startswith(".staging-")]


def test_resaving_an_iteration_swaps_the_folder(megatron_args):
    saving.staged(_fake_megatron_save(fail=False))(5)
    folder = Path(megatron_args.save) / "iter_0000005"
    (folder / "stale_file").write_text("from the first save")
    saving.staged(_fake_megatron_save(fail=False))(5)
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "shard_0.distcp"]


# ---------------------------------------------------------------------------------------------
# Bad input through the real entry (one process; every error comes before distributed setup)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(small_data):
    return small_data


def _flags(data, *extra):
    return [*TINY_MODEL, "--train-data-path", data["pretrain_train"],
            "--valid-data-path", data["pretrain_valid"], "--tokenizer-model", data["tokenizer_model"],
            "--train-iters", "2", *extra]


def _refused(flags) -> str:
    """Run the entry on one process; it must refuse before training: exit status 2 and one line
    on stderr (returned), and Megatron's argument table held back."""
    proc = subprocess.run(entry_command(flags), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration        1/" not in proc.stdout and "arguments" not in proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("emoe-pretrain: error: "), proc.stderr
    return proc.stderr


def _refused_all(*flag_lists) -> list[str]:
    """`_refused` for each flag list, two processes at a time (each mostly imports Megatron)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_refused, flag_lists))


@pytest.mark.slow
def test_missing_data_path(data, tmp_path):
    flags = _flags(data)
    flags[flags.index("--train-data-path") + 1] = str(tmp_path / "nowhere_text_document")
    out = _refused(flags)
    assert "--train-data-path" in out and "nowhere_text_document" in out


@pytest.mark.slow
def test_tokenizer_and_data_vocab_mismatch(data, tmp_path):
    other = tmp_path / "other_text_document"
    for suffix in (".bin", ".idx"):
        shutil.copy(data["pretrain_train"] + suffix, str(other) + suffix)
    sidecar = json.loads(Path(data["pretrain_train"].removesuffix("_text_document") + ".json").read_text())
    sidecar["vocab_size"] = 50_000  # as if made with another tokenizer
    for entry in sidecar["datasets"].values():
        entry["prefix"] = other.name
    (tmp_path / "other.json").write_text(json.dumps(sidecar))
    flags = _flags(data)
    flags[flags.index("--train-data-path") + 1] = str(other)
    out = _refused(flags)
    assert "--tokenizer-model" in out and "50000" in out.replace(",", "")


@pytest.mark.slow
def test_sequence_length_above_the_model(data):
    flags = _flags(data)
    flags += ["--seq-length", "128"]
    out = _refused(flags)
    assert "--seq-length 128" in out and "--max-position-embeddings 64" in out


@pytest.mark.slow
def test_resume_must_match_router_mode_experts_and_schedule(emoe_checkpoint, tmp_path):
    data = emoe_checkpoint.data
    ckpt = tmp_path / "ckpt"
    shutil.copytree(emoe_checkpoint.path, ckpt)  # trained for 4 steps with EMoE, k_ideal 3
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    resume = ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "1000", "--train-iters", "4"]
    flags = _flags(data, "--moe-router-mode", "emoe", "--emoe-k-ideal", "3", *resume)
    # --coactivation-dir follows --save's rule: another run's matrices are not written over
    # unasked, and a resumed run reads the ones it continues up front.
    matrices = tmp_path / "coactivation"
    matrices.mkdir()
    (matrices / "train.npz").write_bytes(b"not an npz")
    mode, experts, iters, lr, overwrite, other_matrices, own_matrices = _refused_all(
        _flags(data, "--moe-router-mode", "topk", *resume),
        [*flags, "--num-experts", "8"],
        # Megatron's scheduler would assert only while loading, after the model is built.
        [*flags, "--train-iters", "6"],
        [*flags, "--lr", "0.5"],
        # Writing into a folder whose checkpoint this run would not resume from needs consent.
        _flags(data, "--moe-router-mode", "emoe", "--save", str(ckpt), "--save-interval", "1000"),
        _flags(data, "--save", str(tmp_path / "new"), "--save-interval", "1000",
               "--coactivation-dir", str(matrices)),
        [*flags, "--coactivation-dir", str(matrices)],
    )
    assert "--moe-router-mode topk does not match" in mode and "--moe-router-mode emoe" in mode
    assert "--num-experts 8 does not match" in experts and "--num-experts 4" in experts
    assert "--train-iters 6 does not match" in iters and "(--train-iters 4)" in iters
    assert "--override-opt-param-scheduler" in iters
    assert "--lr 0.5 does not match" in lr
    assert "--allow-overwrite-save" in overwrite
    assert "--coactivation-dir" in other_matrices and "train.npz" in other_matrices
    assert "--allow-overwrite-save" in other_matrices
    assert "train.npz" in own_matrices and "--allow-overwrite-save" not in own_matrices
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before  # nothing touched


@pytest.mark.slow
def test_budget_outside_the_experts(data, tmp_path):
    out = _refused(_flags(data, "--save", str(tmp_path / "c"), "--save-interval", "1000",
                          "--elastic-eval-budgets", "1", "9"))
    assert "--elastic-eval-budgets 9" in out and "[1, 4]" in out


@pytest.mark.slow
def test_a_split_without_documents_is_refused(data):
    # Megatron's default 969,30,1 gives 166 documents' test split nothing; it would never return.
    flags = [*TINY_MODEL, "--data-path", data["pretrain_train"], "--tokenizer-model",
             data["tokenizer_model"], "--train-iters", "2"]
    out = _refused(flags)
    assert "--split 969, 30, 1 leaves the test split" in out and "(166 documents)" in out


@pytest.mark.slow
def test_retired_mmoe_level_is_refused_with_its_replacement(data):
    out = _refused(_flags(data, "--moe-router-mode", "mmoe", "--mmoe-sample-level", "step"))
    assert "--mmoe-sample-level model" in out and "--mmoe-resample-every" in out


@pytest.mark.slow
def test_megatron_refusals_are_one_line_too(data, tmp_path):
    # Megatron's validate_args refuses with a bare assertion; it reaches the user as one line.
    out = _refused(_flags(data, "--save", str(tmp_path / "c")))  # no --save-interval
    assert "Megatron's validate_args refused the flags" in out and "save_interval" in out


# ---------------------------------------------------------------------------------------------
# Checks that need no process
# ---------------------------------------------------------------------------------------------
def test_config_files_are_checked(tmp_path):
    from megatron_emoe.errors import UsageError
    from megatron_emoe.runtime.arguments import expand_config_argv

    with pytest.raises(UsageError, match=r"--config .*missing.yaml: no such file"):
        expand_config_argv(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("num-layers: [2\n")
    with pytest.raises(UsageError, match=r"--config .*bad.yaml: not valid YAML"):
        expand_config_argv(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "list.yaml").write_text("- 2\n")
    with pytest.raises(UsageError, match=r"--config .*list.yaml: expected a mapping"):
        expand_config_argv(["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(UsageError, match="--config needs a YAML file"):
        expand_config_argv(["--num-layers", "2", "--config"])
    (tmp_path / "ok.yaml").write_text("num-layers: 2\nswiglu: true\nbias: false\n")
    assert expand_config_argv(["--config", str(tmp_path / "ok.yaml"), "--num-layers", "4"]) == [
        "--num-layers", "2", "--swiglu", "--num-layers", "4"]


def test_a_tokenizer_path_that_does_not_exist_is_refused(tmp_path):
    from megatron_emoe.errors import UsageError
    from megatron_emoe.training.preflight import check_before_parsing_done

    args = Namespace(tokenizer_model=str(tmp_path / "no_tokenizer"), max_position_embeddings=64,
                     seq_length=64, elastic_eval_budgets=None, save=None)
    with pytest.raises(UsageError, match=r"--tokenizer-model .*no_tokenizer: no such tokenizer"):
        check_before_parsing_done(args)
    args.tokenizer_model = "gpt2"  # a bare name may be a Hugging Face hub id: left to the loader
    check_before_parsing_done(args)


def test_help_prints(capsys):
    # Megatron-Core 0.19.2 has help strings with a bare '%', which made argparse's --help crash.
    from megatron_emoe.runtime.arguments import parse_training_args

    with pytest.raises(SystemExit) as exit_info:
        parse_training_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--moe-router-mode" in out and "= 10%)" in out and "default 100%" in out
