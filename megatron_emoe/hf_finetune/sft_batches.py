"""SFT conversations (JSONL) -> fixed-length batches whose loss falls on response tokens only,
rendered with the project's chat template (`megatron_emoe.data.chat`), as `--sft` data is."""

from __future__ import annotations

import dataclasses
import json

import torch

from megatron_emoe.data.chat import ROLE_TOKENS, detect_fields, record_turns, render_batch
from megatron_emoe.data.tokenizer import eod_id, special_token_ids
from megatron_emoe.errors import UsageError

IGNORE = -100  # transformers' label for "no loss here"


@dataclasses.dataclass(frozen=True)
class SFTExamples:
    """Every example as `[examples, seq]` token ids, labels (-100 off responses) and mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def batch(self, step: int, microbatch: int, rank: int, world: int, size: int) -> dict:
        """The `size` examples of one rank's micro-batch: a pure function of its position, so a
        resumed run reads what the uninterrupted one would have."""
        count = self.input_ids.shape[0]
        first = ((step * 1_000_003 + microbatch) * world + rank) * size  # cycles through the data
        rows = torch.arange(first, first + size) % count
        return {"input_ids": self.input_ids[rows], "labels": self.labels[rows],
                "attention_mask": self.attention_mask[rows]}


def load_sft(path: str, tokenizer, seq_length: int, flag: str = "--train-data") -> SFTExamples:
    """Read a JSONL file of conversations (messages, or prompt/response columns)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise UsageError(f"{flag}: {path} holds no records")
    fields = detect_fields(sorted(records[0]))
    conversations = [turns for record in records if (turns := record_turns(record, fields))]
    special = special_token_ids(tokenizer, list(ROLE_TOKENS.values()))
    eod = eod_id(tokenizer)
    ids, masks = render_batch(tokenizer, conversations, special, eod)
    rows = [(i[:seq_length], m[:seq_length]) for i, m in zip(ids, masks) if any(m[:seq_length])]
    if not rows:
        raise UsageError(f"{flag}: no conversation of {path} has a response within --seq-length {seq_length}")
    input_ids = torch.full((len(rows), seq_length), eod, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    attention = torch.zeros_like(input_ids)
    for row, (tokens, mask) in enumerate(rows):
        n = len(tokens)
        input_ids[row, :n] = torch.tensor(tokens)
        labels[row, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(tokens), IGNORE)
        attention[row, :n] = 1
    return SFTExamples(input_ids, labels, attention)
