"""Bad input to the training entry, rejected with the flag and the allowed values before any work."""

from __future__ import annotations

import os

from megatron.training.arguments import core_transformer_config_from_args

from megatron_emoe import coactivation
from megatron_emoe.budget import Budget
from megatron_emoe.config import elastic_config_from_args
from megatron_emoe.data.checks import check_data_prefixes, check_split_has_documents
from megatron_emoe.errors import UsageError
from megatron_emoe.runtime.checkpoints import (
    TRACKER,
    checked_checkpoint,
    checkpoint_folders,
    tracked_checkpoint,
)
from megatron_emoe.runtime.saved_args import checkpoint_args

# Flags a resumed run must share with its checkpoint (a fine-tune may change the router mode).
_RESUME_MUST_MATCH = {"num_experts": "--num-experts", "moe_router_mode": "--moe-router-mode"}
_FINETUNE_MUST_MATCH = {"num_experts": "--num-experts"}


def _data_prefixes(args) -> list[tuple[str, list[str]]]:
    """(flag, values) for every data flag given (blend weights included; the check skips them)."""
    flags = ("data_path", "train_data_path", "valid_data_path", "test_data_path")
    return [("--" + f.replace("_", "-"), getattr(args, f)) for f in flags if getattr(args, f, None)]


def check_data(args, tokenizer_vocab_size: int) -> None:
    """Data files exist and were made with this tokenizer (sequence lengths are checked too)."""
    if args.mock_data:
        return
    if args.data_args_path or args.per_split_data_args_path:
        return  # Megatron reads these files itself
    prefixes = _data_prefixes(args)
    if not prefixes:
        raise UsageError("no training data: pass --data-path PREFIX (or --mock-data)")
    for flag, values in prefixes:
        check_data_prefixes(
            values, tokenizer_vocab_size=tokenizer_vocab_size, sft=args.sft_packed, flag=flag
        )
    if args.data_path and args.split:
        training = not args.skip_train and bool(args.train_iters or args.train_samples)
        evaluating = bool(args.eval_iters)
        check_split_has_documents(args.data_path, args.split,
                                  needed=(training, evaluating, evaluating))


def check_sequence_length(args) -> None:
    """--seq-length must fit the model's --max-position-embeddings."""
    if args.max_position_embeddings is not None and args.seq_length > args.max_position_embeddings:
        raise UsageError(
            f"--seq-length {args.seq_length} is above the model's --max-position-embeddings "
            f"{args.max_position_embeddings}: use 1 <= --seq-length <= {args.max_position_embeddings}"
        )


def check_checkpoints(args) -> None:
    """Resuming or fine-tuning must match the checkpoint, which must be whole (tracker, metadata,
    .distcp sizes); --save must not overwrite unasked, nor hold checkpoints whose tracker is
    missing or broken (the run would start at iteration 0 and save over them)."""
    loaded = _checkpoint_to_load(args)
    if args.load and loaded is None and args.finetune:
        raise UsageError(
            f"--finetune --load {args.load}: no checkpoint there "
            f"(expected {os.path.join(args.load, TRACKER)})"
        )
    if loaded is not None:
        saved_args = checkpoint_args(args.load, name=loaded)
        _check_matches(args, saved_args, args.load,
                       _FINETUNE_MUST_MATCH if args.finetune else _RESUME_MUST_MATCH)
        check_schedule(args, saved_args, args.load)
    resuming_from_save = (
        args.load and args.save and not args.finetune
        and os.path.realpath(args.load) == os.path.realpath(args.save)
    )
    check_coactivation_dir(args, resuming=bool(resuming_from_save and loaded is not None))
    if resuming_from_save or args.allow_overwrite_save:
        return  # the tracker in --save was checked as --load's, or overwriting is allowed
    saved = _saved_checkpoint(args.save)
    if saved is not None:
        iteration = "release" if saved == "release" else f"iteration {int(saved.removeprefix('iter_'))}"
        raise UsageError(
            f"--save {args.save} already holds a checkpoint ({iteration}) that this run does "
            f"not resume from, so its iterations could be overwritten: resume with --load "
            f"{args.save}, choose another --save, or pass --allow-overwrite-save"
        )


def _checkpoint_to_load(args) -> str | None:
    """The checkpoint folder in --load that Megatron will load (tracker or --ckpt-step), checked
    whole by `checked_checkpoint`; None when there is none (a run starting fresh)."""
    if not args.load:
        return None
    return checked_checkpoint(args.load, "--load", step=getattr(args, "ckpt_step", None))


def _saved_checkpoint(save_dir: str | None) -> str | None:
    """The checkpoint the tracker in --save names, or None for an empty or new folder; a
    `UsageError` when checkpoints there have a missing or broken tracker, which a run that does
    not resume from them would save over from iteration 0."""
    consent = ("choose another --save, or pass --allow-overwrite-save to let this run save over "
               "them")
    present = checkpoint_folders(save_dir)
    tracker = os.path.join(save_dir, TRACKER) if save_dir else None
    if present and not os.path.lexists(tracker):
        shown = ", ".join(present[-3:]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise UsageError(
            f"--save {save_dir} holds checkpoints ({shown}) but no {TRACKER}, so this run would "
            f"start at iteration 0 and could save over them: to resume, write the iteration to "
            f"resume from into {tracker} and pass --load {save_dir}; otherwise {consent}"
        )
    try:
        return tracked_checkpoint(save_dir, "--save")
    except UsageError as error:
        raise UsageError(
            f"{error}; this run does not resume from --save {save_dir} and could save over its "
            f"checkpoints: repair the tracker and pass --load {save_dir}, or {consent}"
        ) from None


def _check_matches(args, saved, where: str, fields: dict[str, str]) -> None:
    if saved is None:
        return
    for field, flag in fields.items():
        ours, theirs = getattr(args, field, None), getattr(saved, field, None)
        if field == "moe_router_mode":
            theirs = theirs or "topk"  # checkpoints of plain Megatron route with top-k
        if ours != theirs:
            action = "fine-tune from" if args.finetune else "resume"
            raise UsageError(
                f"{flag} {ours} does not match the checkpoint in {where} ({flag} {theirs}): "
                f"to {action} it, pass {flag} {theirs}"
            )


# What Megatron's optimizer-parameter scheduler compares with the checkpoint when it resumes
# (its bare assertion fires only while the checkpoint loads): flag name -> flag.
_SCHEDULE = {
    "lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
    "start_weight_decay": "--start-weight-decay", "end_weight_decay": "--end-weight-decay",
    "weight_decay_incr_style": "--weight-decay-incr-style", "global_batch_size": "--global-batch-size",
    "train_iters": "--train-iters", "lr_decay_iters": "--lr-decay-iters",
    "lr_warmup_iters": "--lr-warmup-iters", "lr_warmup_fraction": "--lr-warmup-fraction",
}


def check_schedule(args, saved, where: str) -> None:
    """A resumed iteration-based run keeps its checkpoint's learning-rate and weight-decay schedule
    (Megatron checks it while loading, after the model is built) unless the flags say which one
    to use or the optimizer state is not loaded."""
    if (saved is None or args.finetune or args.no_load_optim or args.override_opt_param_scheduler
            or args.use_checkpoint_opt_param_scheduler or not args.train_iters
            or not getattr(saved, "train_iters", None) or args.rampup_batch_size):
        return
    for name, flag in _SCHEDULE.items():
        ours, theirs = getattr(args, name, None), getattr(saved, name, None)
        if name == "lr_decay_iters":  # Megatron stores --train-iters there when it is not given
            ours, theirs = ours or args.train_iters, theirs or saved.train_iters
        if ours != theirs:
            raise UsageError(
                f"{flag} {ours} does not match the checkpoint in {where} ({flag} {theirs}), and "
                f"Megatron resumes a run on its checkpoint's learning-rate and weight-decay "
                f"schedule: pass {flag} {theirs}, or --override-opt-param-scheduler to take this "
                f"run's schedule, or --use-checkpoint-opt-param-scheduler to keep the checkpoint's"
            )


def check_coactivation_dir(args, resuming: bool) -> None:
    """--coactivation-dir follows the rule of --save: files of another run there are not written
    over unasked; a resumed run continues the matrices it finds (read up front, so a corrupt file
    is named before training)."""
    directory = args.coactivation_dir
    if not directory or not os.path.isdir(directory):
        return
    existing = sorted(name for name in os.listdir(directory) if name.endswith(".npz"))
    if not existing:
        return
    if not resuming and not args.allow_overwrite_save:
        raise UsageError(
            f"--coactivation-dir {directory} already holds {', '.join(existing[:3])}"
            + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            + " of a run this one does not resume: choose another folder, resume with --load "
            "--save of that run, or pass --allow-overwrite-save"
        )
    train = os.path.join(directory, f"{coactivation.TRAIN_TAG}.npz")
    if os.path.isfile(train):
        coactivation.load(train)  # a UsageError naming the file if it is corrupt


def check_budgets(args) -> None:
    """--elastic-eval-budgets needs a checkpoint to reload."""
    if args.elastic_eval_budgets and not args.save:
        raise UsageError("--elastic-eval-budgets reloads the saved model: pass --save DIR")


def check_routing(args) -> None:
    """Every router, budget and M-MoE rule, against the `TransformerConfig` Megatron will build
    from these flags (validated args), so that none of them first fails inside the model build."""
    if not args.num_experts:
        if args.moe_router_mode != "topk" or args.elastic_eval_budgets:
            raise UsageError(
                f"--moe-router-mode {args.moe_router_mode} and --elastic-eval-budgets need an MoE "
                "model: set --num-experts"
            )
        return
    config = core_transformer_config_from_args(args)
    elastic_config_from_args(args, config)
    for k in args.elastic_eval_budgets or ():
        Budget(k).validate(config, flag=f"--elastic-eval-budgets {k}:")


def check_before_parsing_done(args) -> None:
    """Checks that need only the parsed flags (run before Megatron builds anything)."""
    tokenizer = args.tokenizer_model
    if tokenizer and (os.sep in tokenizer or tokenizer.startswith(".")) and not os.path.exists(tokenizer):
        # a path (a bare name may be a Hugging Face hub id)
        raise UsageError(f"--tokenizer-model {tokenizer}: no such tokenizer file or folder")
    check_sequence_length(args)
    check_budgets(args)


def adopt_checkpoint_vocab(args) -> None:
    """Take the loaded checkpoint's embedding rows (`padded_vocab_size`) instead of padding the
    tokenizer's size again: converted models keep their Hugging Face vocabulary size, which the
    tokenizer may not match (Qwen: 151,936 rows, 151,646 tokens). A missing, partial or corrupt
    checkpoint in --load is refused here, the first time it is read."""
    loaded = _checkpoint_to_load(args)
    if loaded is None:
        return
    saved = checkpoint_args(args.load, name=loaded)
    rows = getattr(saved, "padded_vocab_size", None)
    if rows and getattr(args, "padded_vocab_size", None) is None:
        args.padded_vocab_size = rows


def check_vocab_rows(args, tokenizer_vocab_size: int) -> None:
    """The embedding must have a row for every token and split evenly over TP ranks."""
    rows = args.padded_vocab_size
    if rows < tokenizer_vocab_size:
        raise UsageError(
            f"--tokenizer-model has {tokenizer_vocab_size} tokens but the checkpoint in --load "
            f"{args.load} has {rows} embedding rows: use the tokenizer the model was trained with"
        )
    if rows % args.tensor_model_parallel_size:
        raise UsageError(
            f"the checkpoint's {rows} embedding rows do not split over "
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}"
        )


def check_before_training(args, tokenizer_vocab_size: int) -> None:
    """Checks on validated flags: routing, then (with the tokenizer) data files, embedding rows,
    then checkpoints."""
    check_routing(args)
    check_data(args, tokenizer_vocab_size)
    check_vocab_rows(args, tokenizer_vocab_size)
    check_checkpoints(args)
