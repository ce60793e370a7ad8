"""`PackedSFTDataset`: GPTDataset's packed sequences whose loss mask keeps only response tokens.

Documents are packed exactly as GPTDataset packs them (its document/sample/shuffle indices); the
uint8 `<prefix>_lossmask` dataset written by `emoe-preprocess-data --sft` is read at the same
documents and offsets, and `loss_mask[i]` becomes GPTDataset's mask times the response mask of
`labels[i]` (token i+1 of the sample).
"""

from __future__ import annotations

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_emoe.data.indexed import LOSS_MASK_SUFFIX
from megatron_emoe.errors import UsageError


class PackedSFTDataset(GPTDataset):
    """GPTDataset over SFT tokens that also returns only-response loss masks (see module docstring)."""

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str | None,
        indexed_indices: numpy.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: GPTDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.response_dataset = self.build_response_dataset(indexed_dataset, config)

    @staticmethod
    def build_response_dataset(tokens: IndexedDataset, config: GPTDatasetConfig) -> IndexedDataset:
        """Open `<prefix>_lossmask` and check it has the token dataset's document lengths."""
        prefix = tokens.path_prefix + LOSS_MASK_SUFFIX
        if not IndexedDataset.exists(prefix):
            raise UsageError(
                f"--sft-packed: no loss mask {prefix}.bin/.idx next to {tokens.path_prefix}; "
                "write the data with emoe-preprocess-data --sft"
            )
        masks = IndexedDataset(prefix, multimodal=False, mmap=config.mmap_bin_files)
        if not numpy.array_equal(masks.sequence_lengths, tokens.sequence_lengths):
            raise UsageError(
                f"--sft-packed: {prefix} does not match {tokens.path_prefix} document for document; "
                "re-run emoe-preprocess-data --sft"
            )
        return masks

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        """GPTDataset's sample with `loss_mask` also zero wherever the label is not a response token."""
        sample = super().__getitem__(idx)
        response = torch.from_numpy(self._response_mask(0 if idx is None else idx))
        if self.config.add_extra_token_to_sequence:
            label_response = response[1:]  # labels = text[1:]
        else:
            label_response = torch.roll(response, shifts=-1, dims=0)  # labels = roll(text, -1) ...
            label_response[-1] = 0  # ... with the last label padding
        # New tensor: GPTDataset may hand out (and cache) its loss mask tensor.
        sample["loss_mask"] = sample["loss_mask"] * label_response.to(sample["loss_mask"].dtype)
        return sample

    def _response_mask(self, idx: int) -> numpy.ndarray:
        """`[sequence_length + extra]` 0/1 mask read through GPTDataset's own document/offset walk."""
        tokens = self.dataset
        self.dataset = self.response_dataset
        try:
            mask, _, document_lengths = self._query_document_sample_shuffle_indices(idx)
        finally:
            self.dataset = tokens
        mask[sum(document_lengths):] = 0  # the walk pads with the pad id; padding is no response
        return (mask == 1).astype(numpy.float32)
