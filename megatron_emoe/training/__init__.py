"""Pretraining and instruction tuning on Megatron's own training loop (`megatron.training`).

`arguments` adds our flags to Megatron's parser, `entry` is the `pretrain_gpt.py`-style main,
`cpu_loop` narrows the loop's CUDA assumptions on CPU, `checks` rejects bad input before any work.
"""
