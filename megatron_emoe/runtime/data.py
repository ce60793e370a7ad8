"""Train/valid/test datasets of every app: Megatron indexed data, packed SFT data or mock data,
and the validation batches of the training loop's first evaluation."""

from __future__ import annotations

from megatron.core import parallel_state as mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training import get_args, get_tokenizer, print_rank_0
from megatron.training.datasets.data_samplers import build_pretraining_data_loader
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_emoe.data.sft import PackedSFTDataset
from megatron_emoe.errors import UsageError


def dataset_config(args):
    """Megatron's `GPTDatasetConfig` from the flags (blends, split, sequence length, masks)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )


def dataset_class(args):
    """GPTDataset for pretraining, PackedSFTDataset for `--sft-packed`, mock data for `--mock-data`."""
    if args.mock_data:
        return MockGPTDataset
    if args.sft_packed:
        return PackedSFTDataset
    return GPTDataset


def train_valid_test_datasets_provider(train_valid_test_num_samples, vp_stage=None):
    """Megatron's dataset provider hook: build the three splits on the ranks that read data."""
    args = get_args()
    print_rank_0("> building train, validation, and test datasets ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_class(args),
        train_valid_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0,
        dataset_config(args),
    ).build()
    print_rank_0("> finished creating datasets ...")
    return datasets


# Megatron builds the datasets on every rank and reads them on TP rank 0 (core datasets path).
train_valid_test_datasets_provider.is_distributed = True


def validation_iterator_factory(args, datasets_provider=train_valid_test_datasets_provider):
    """A function giving a fresh iterator over the same `--eval-iters` validation batches (from
    the first validation sample, as the training loop's first evaluation) on every call."""
    num_valid = args.eval_iters * args.global_batch_size
    _, valid, _ = datasets_provider((1, num_valid, 1))
    if valid is None:
        raise UsageError("evaluation needs a validation split: --valid-data-path or --split")
    return lambda: iter(build_pretraining_data_loader(valid, 0))
