"""Data for the training entry: preprocessing into Megatron indexed datasets, packed SFT datasets,
checks of data against the tokenizer, and the embedded default data built from the stdlib.

Submodules import `datasets`/`transformers` lazily, so `import megatron_emoe.data` stays light.
"""
