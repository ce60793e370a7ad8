"""Train a byte-level BPE tokenizer with `tokenizers` and save it as a Hugging Face tokenizer folder."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from megatron_emoe.errors import UsageError

EOD, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOD, PAD, "<|system|>", "<|user|>", "<|assistant|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(
    texts: Iterable[str], output_dir: str, *, vocab_size: int = 4096, min_frequency: int = 2
):
    """Train on `texts` and save to `output_dir`: at most `vocab_size` tokens (fewer when the texts
    run out of merges seen `min_frequency` times); ids 0-4 are the special tokens (EOD 0, pad 1).

    Returns the `PreTrainedTokenizerFast`, which `AutoTokenizer` and Megatron's
    HuggingFaceTokenizer load back from the folder (eos = `<|endoftext|>`, pad = `<|pad|>`).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens); got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOD, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
    )
    wrapped.save_pretrained(output_dir)
    return wrapped
