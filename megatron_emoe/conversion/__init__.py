"""Checkpoint conversion between Hugging Face MoE models and Megatron `torch_dist` checkpoints.

`tensors` holds the pure re-layouts (fused QKV, gated FC1, vocabulary padding), `families` the
per-architecture name and config maps, `hf_files` safetensors reading and writing,
`megatron_side` building the elastic GPTModel and saving/loading it with Megatron's own
checkpointing, and `convert` the two conversions `emoe-convert-checkpoint` runs.
"""
