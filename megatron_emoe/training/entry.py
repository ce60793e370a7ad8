"""`pretrain_gpt.py`-style main: Megatron's training loop with elastic routing, CPU or GPU.

Bad input ends the run before any model is built or data read: one line on stderr (rank 0),
exit status 2 (`megatron_emoe.errors`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from collections.abc import Sequence

from megatron.core.enums import ModelType
from megatron.training import checkpointing, get_tokenizer, training
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import validate_args
from megatron.training.global_vars import set_global_variables

from megatron_emoe import coactivation, router_metrics
from megatron_emoe.config import elastic_config_from_args
from megatron_emoe.errors import UsageError, exits_on_usage_error, is_rank_zero
from megatron_emoe.layers import num_layer_slots
from megatron_emoe.runtime import cpu_loop, wheel
from megatron_emoe.runtime.arguments import expand_config_argv, parse_training_args
from megatron_emoe.runtime.data import train_valid_test_datasets_provider
from megatron_emoe.runtime.model import elastic_gpt_config
from megatron_emoe.training import budget_sweep, preflight, saving
from megatron_emoe.training.forward import TrainingForwardStep

PROG = "emoe-pretrain"


def parse_and_check(argv: Sequence[str]):
    """Megatron's flags plus ours, validated by Megatron, then our checks; nothing runs yet.

    What Megatron prints while validating (the whole argument table) is held back until every
    check has passed, so that bad input ends with its one error line alone."""
    args = parse_training_args(cpu_loop.with_cpu_flags(expand_config_argv(argv)))
    preflight.check_before_parsing_done(args)
    with contextlib.redirect_stdout(io.StringIO()) as megatron_log:
        validate_megatron_args(args)
        preflight.adopt_checkpoint_vocab(args)
        set_global_variables(args)
        preflight.check_before_training(args, tokenizer_vocab_size=get_tokenizer().vocab_size)
    print(megatron_log.getvalue(), end="", flush=True)
    return args, elastic_config_from_args(args)


def validate_megatron_args(args) -> None:
    """Megatron's `validate_args`, whose refusals are bare assertions, as a `UsageError`."""
    try:
        # A Hugging Face tokenizer unless --tokenizer-type names another (given, it is no default).
        defaults = {} if args.tokenizer_type else {"tokenizer_type": "HuggingFaceTokenizer"}
        validate_args(args, defaults)
    except AssertionError as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        reason = str(error) or f"{frame.line} ({os.path.basename(frame.filename)}:{frame.lineno})"
        raise UsageError(f"Megatron's validate_args refused the flags: {reason}") from None


@exits_on_usage_error(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Reject bad input, train with `megatron.training.pretrain`, then sweep the budgets."""
    args, elastic = parse_and_check(sys.argv[1:] if argv is None else argv)
    wheel.apply()
    cpu_loop.enable()
    if not args.async_save:
        cpu_loop.keep_save_results_in_process()
    save_checkpoint = saving.staged(checkpointing.save_checkpoint)
    collector = None
    if args.coactivation_dir:
        collector = coactivation.TrainingCollector(args.coactivation_dir)
        save_checkpoint = coactivation.writing_at_saves(save_checkpoint, collector)
    training.save_checkpoint = save_checkpoint
    router_metrics.install_tracker(
        hr_loss=elastic.hr_loss_coeff > 0, num_layer_slots=num_layer_slots(args),
        num_experts=args.num_experts,
    )
    if is_rank_zero():
        saving.carry_hf_config(args.load, args.save)

    training.pretrain(
        pretrain_cfg_container_from_args(args, elastic_gpt_config(args, elastic)),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        TrainingForwardStep(collector),
    )
    if collector is not None:
        collector.finish()  # the last window, if no save wrote it
    if args.elastic_eval_budgets:
        budget_sweep.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
