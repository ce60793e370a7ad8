"""`pretrain_gpt.py`-style main: Megatron's training loop with elastic routing, CPU or GPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def parse_and_check(argv: Sequence[str]):
    """Megatron's flags plus ours, validated by Megatron, then our checks; nothing runs yet."""
    from megatron.training import get_tokenizer
    from megatron.training.arguments import validate_args
    from megatron.training.global_vars import set_global_variables

    from megatron_emoe.arguments import elastic_config_from_args
    from megatron_emoe.training import checks, cpu_loop
    from megatron_emoe.training.arguments import expand_config_argv, parse_training_args

    args = parse_training_args(cpu_loop.with_cpu_flags(expand_config_argv(argv)))
    checks.check_before_parsing_done(args)
    validate_args(args, {"tokenizer_type": "HuggingFaceTokenizer"})
    checks.adopt_checkpoint_vocab(args)
    set_global_variables(args)
    checks.check_before_training(args, tokenizer_vocab_size=get_tokenizer().vocab_size)
    return args, elastic_config_from_args(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Reject bad input, train with `megatron.training.pretrain`, then sweep the budgets."""
    from megatron.core.enums import ModelType
    from megatron.training import checkpointing, training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_emoe import coactivation, router_metrics
    from megatron_emoe.training import checkpoints, cpu_loop, elastic_eval, wheel
    from megatron_emoe.training.data import train_valid_test_datasets_provider
    from megatron_emoe.training.model import elastic_gpt_config
    from megatron_emoe.training.step import forward_step

    args, elastic = parse_and_check(sys.argv[1:] if argv is None else argv)
    wheel.apply()
    cpu_loop.enable()
    training.save_checkpoint = coactivation.writing_at_saves(
        checkpoints.staged(checkpointing.save_checkpoint)
    )
    if args.coactivation_dir:
        coactivation.start_training_collection(args.coactivation_dir)
    router_metrics.install_tracker(hr_loss=elastic.mode != "topk" and elastic.hr_loss_coeff > 0)
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoints.carry_hf_config(args.load, args.save)

    training.pretrain(
        pretrain_cfg_container_from_args(args, elastic_gpt_config(args, elastic)),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
    )
    coactivation.finish_training_collection()  # the last window, if no save wrote it
    if args.elastic_eval_budgets:
        # A fresh model config: training hangs optimizer hooks on the one it used.
        elastic_eval.run(
            args, elastic_gpt_config(args, elastic), train_valid_test_datasets_provider, forward_step
        )


if __name__ == "__main__":
    main()
