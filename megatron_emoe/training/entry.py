"""`pretrain_gpt.py`-style main: Megatron's training loop with elastic routing, CPU or GPU."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, reject bad input, then run `megatron.training.pretrain` (and the budget sweep)."""
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import validate_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import pretrain

    from megatron_emoe.arguments import elastic_config_from_args
    from megatron_emoe.training import cpu_loop, wheel
    from megatron_emoe.training.arguments import expand_config_argv, parse_training_args
    from megatron_emoe.training.data import train_valid_test_datasets_provider
    from megatron_emoe.training.model import elastic_gpt_config
    from megatron_emoe.training.step import forward_step

    argv = expand_config_argv(sys.argv[1:] if argv is None else argv)
    args = parse_training_args(cpu_loop.with_cpu_flags(argv))
    validate_args(args, {"tokenizer_type": "HuggingFaceTokenizer"})
    set_global_variables(args)
    wheel.apply()
    cpu_loop.enable()

    model_config = elastic_gpt_config(args, elastic_config_from_args(args))
    pretrain(
        pretrain_cfg_container_from_args(args, model_config),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
    )


if __name__ == "__main__":
    main()
