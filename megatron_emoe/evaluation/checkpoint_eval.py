"""A saved checkpoint, built and loaded at any layout, evaluated at inference budgets.

The shared core of the evaluation tools (`emoe-elastic-eval`,
`emoe-search-budget-allocation`): their common flags (`add_eval_arguments`), validated options
(`EvalOptions`), the per-rank evaluator (`checkpoint_evaluator`) and a runner that starts the gloo
ranks and returns rank 0's result (`run_on_ranks`). The model is the saving run's own (its flags
come from the checkpoint); dist_checkpointing reshards it to the TP/EP layout asked for, and the
validation batches are the training loop's (Megatron's `evaluate`, same forward step and loss).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import logging
from typing import Callable, Iterator, Optional

import torch
from megatron.core.utils import get_model_config

from megatron_emoe.budget import Budget, BudgetLike, planned_experts, takes_per_token_budgets
from megatron_emoe.layers import decoder_moe_layers
from megatron_emoe.errors import UsageError
from megatron_emoe.runtime.checkpoints import required_checkpoint
from megatron_emoe.runtime.saved_args import args_from_checkpoint, checkpoint_args
from megatron_emoe.runtime.data import validation_iterator_factory
from megatron_emoe.runtime.evaluate import (
    BudgetResult,
    evaluate_at_budget,
    expert_flops,
    layer_expert_flops,
)
from megatron_emoe.runtime.launch import local_backend, run_ranks
from megatron_emoe.runtime.model import build_model, load, megatron_globals

# Megatron's token dispatchers, for --moe-token-dispatcher-type (the model's own by default).
DISPATCHERS = ("alltoall", "allgather", "flex")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Which checkpoint, at which layout, on which validation data; None keeps the saved value."""

    load: str
    tensor_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    nproc: int = 1
    valid_data_path: Optional[tuple[str, ...]] = None
    tokenizer_model: Optional[str] = None
    eval_iters: Optional[int] = None
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    moe_token_dispatcher_type: Optional[str] = None
    coactivation_dir: Optional[str] = None

    def validate(self) -> "EvalOptions":
        """Raise `ValueError` naming the flag for bad values; checks the checkpoint is there and
        whole (tracker, metadata, .distcp sizes: `required_checkpoint`)."""
        required_checkpoint(self.load, "--load")
        for flag, value in (
            ("--nproc", self.nproc),
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--expert-model-parallel-size", self.expert_model_parallel_size),
            ("--eval-iters", self.eval_iters),
            ("--global-batch-size", self.global_batch_size),
            ("--micro-batch-size", self.micro_batch_size),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}")
        for flag, size in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--expert-model-parallel-size", self.expert_model_parallel_size),
        ):
            if self.nproc % size:
                raise UsageError(f"{flag} {size} must divide --nproc {self.nproc}")
        local_backend(self.nproc, torch.cuda.device_count())  # one GPU per rank on a CUDA node
        for prefix in self.valid_data_path or ():
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise UsageError(f"--valid-data-path {prefix}: {prefix + suffix} not found")
        if self.tokenizer_model is not None and not os.path.exists(self.tokenizer_model):
            raise UsageError(f"--tokenizer-model {self.tokenizer_model} not found")
        if self.moe_token_dispatcher_type not in (None, *DISPATCHERS):
            raise UsageError(
                f"--moe-token-dispatcher-type must be one of {DISPATCHERS}, "
                f"got {self.moe_token_dispatcher_type!r}"
            )
        return self

    def check_against(self, saved: argparse.Namespace) -> None:
        """Checks that need the saved run's flags (the layout must divide the model)."""
        ep, tp = self.expert_model_parallel_size, self.tensor_model_parallel_size
        if saved.num_experts and saved.num_experts % ep:
            raise UsageError(
                f"--expert-model-parallel-size {ep} must divide the checkpoint's "
                f"{saved.num_experts} experts"
            )
        groups = saved.num_query_groups if saved.group_query_attention else saved.num_attention_heads
        if saved.num_attention_heads % tp or groups % tp:
            raise UsageError(
                f"--tensor-model-parallel-size {tp} must divide the checkpoint's "
                f"{saved.num_attention_heads} attention heads and {groups} query groups"
            )
        batch = self.global_batch_size or saved.global_batch_size
        micro = self.micro_batch_size or saved.micro_batch_size
        data_parallel = self.nproc // tp
        if batch % (micro * data_parallel):
            raise UsageError(
                f"--global-batch-size {batch} must be a multiple of --micro-batch-size {micro} x "
                f"data-parallel size {data_parallel} (--nproc / --tensor-model-parallel-size)"
            )


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every checkpoint-evaluation tool takes (Megatron's names where Megatron has one)."""
    group = parser.add_argument_group("checkpoint and validation data")
    group.add_argument("--load", required=True, help="Megatron checkpoint folder (any TP/EP layout)")
    group.add_argument("--nproc", type=int, default=1,
                       help="local processes to evaluate on (one GPU each over NCCL on a CUDA "
                            "node, gloo on CPU)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument("--valid-data-path", nargs="+", default=None,
                       help="indexed dataset prefixes (default: the checkpoint's validation data)")
    group.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    group.add_argument("--eval-iters", type=int, default=None,
                       help="validation batches (default: the checkpoint's --eval-iters)")
    group.add_argument("--global-batch-size", type=int, default=None, help="default: the checkpoint's")
    group.add_argument("--micro-batch-size", type=int, default=None, help="default: the checkpoint's")
    group.add_argument("--moe-token-dispatcher-type", choices=DISPATCHERS, default=None,
                       help="default: the checkpoint's; top-p budgets switch dropless alltoall to "
                            "allgather, which takes a different number of experts per token")
    group.add_argument("--coactivation-dir", default=None,
                       help="also save each budget's co-activation matrices and heatmaps here")
    return parser


def options_from_args(namespace: argparse.Namespace) -> EvalOptions:
    """`EvalOptions` from parsed flags (1:1 by name), validated."""
    names = {field.name for field in dataclasses.fields(EvalOptions)}
    values = {name: getattr(namespace, name) for name in names if hasattr(namespace, name)}
    if values.get("valid_data_path") is not None:
        values["valid_data_path"] = tuple(values["valid_data_path"])
    return EvalOptions(**values).validate()


def saved_args(options: EvalOptions) -> argparse.Namespace:
    """The saving run's flags, read from the checkpoint (no model is built); `UsageError` when
    the checkpoint is corrupt or saved none."""
    saved = checkpoint_args(options.load, "--load")
    if saved is None:
        raise UsageError(f"--load {options.load}: the checkpoint saved no training args "
                         "(its common state has no 'args')")
    return saved


class CheckpointEvaluator:
    """A loaded model plus its validation batches; `evaluate(budget)` gives a `BudgetResult`."""

    def __init__(self, model: list, args: argparse.Namespace, options: EvalOptions):
        self.model, self.args, self.options = model, args, options
        self.config = get_model_config(model[0])
        self.num_moe_layers = len(decoder_moe_layers(self.config))
        self.num_experts = self.config.num_moe_experts
        self.train_topk = self.config.moe_router_topk
        self._make_iterator = validation_iterator_factory(args)

    def layer_expert_flops(self) -> list[float]:
        """Forward FLOPs per token of ONE active routed expert in each MoE decoder layer."""
        return layer_expert_flops(self.config)

    def expert_flops(self, budget: BudgetLike) -> float:
        """Routed-expert forward FLOPs per token of a fixed budget, without running the model."""
        return expert_flops(self.config, planned_experts(self.config, Budget.of(budget)))

    def evaluate(self, budget: BudgetLike) -> BudgetResult:
        """Validation loss and realised experts per token at `budget` (int, per-layer, `TopP`)."""
        return evaluate_at_budget(
            self.model, budget, self._make_iterator, coactivation_dir=self.options.coactivation_dir
        )


def _args_for(options: EvalOptions, saved: argparse.Namespace, top_p: bool) -> argparse.Namespace:
    """Megatron args to rebuild the saved model at the asked layout, reading the asked data."""
    args = args_from_checkpoint(
        saved, options.load, options.tensor_model_parallel_size, options.expert_model_parallel_size
    )
    args.micro_batch_size = options.micro_batch_size or saved.micro_batch_size
    args.global_batch_size = options.global_batch_size or saved.global_batch_size
    args.eval_iters = options.eval_iters or saved.eval_iters
    if options.tokenizer_model:
        args.tokenizer_model = options.tokenizer_model
    if options.valid_data_path:
        args.valid_data_path = list(options.valid_data_path)
        args.data_path = None
    if not args.data_path:  # per-split paths: read only the validation split
        args.train_data_path = args.test_data_path = None
    if options.moe_token_dispatcher_type:
        args.moe_token_dispatcher_type = options.moe_token_dispatcher_type
    elif top_p and not takes_per_token_budgets(args):  # Megatron args use the same names
        args.moe_token_dispatcher_type = "allgather"
    return args


@contextlib.contextmanager
def checkpoint_evaluator(options: EvalOptions, top_p: bool = False) -> Iterator[CheckpointEvaluator]:
    """Build and load the checkpoint on the current gloo ranks (Megatron's parallel state set up
    at the options' layout, as `run_on_ranks` does); `top_p` readies the dispatcher for it."""
    saved = saved_args(options)
    options.check_against(saved)
    args = _args_for(options, saved, top_p)
    with megatron_globals(args, build_tokenizer=True):
        model = build_model(args)
        args.iteration = load(model)
        for chunk in model:
            chunk.eval()
        yield CheckpointEvaluator(model, args, options)


def _rank_body(rank: int, options: EvalOptions, top_p: bool, fn: Callable, fn_args: tuple,
               result_path: str) -> None:
    logging.getLogger("megatron").setLevel(logging.ERROR)  # per-evaluation timer and mode lines

    with checkpoint_evaluator(options, top_p) as evaluator:
        result = fn(evaluator, *fn_args)
    if rank == 0:
        torch.save(result, result_path)


def run_on_ranks(options: EvalOptions, fn: Callable, *fn_args, top_p: bool = False,
                 timeout: float = 24 * 3600):
    """Run `fn(evaluator, *fn_args)` on `options.nproc` local ranks with the checkpoint loaded
    (NCCL, one GPU each, on a CUDA node; gloo on CPU); return rank 0's result. `fn` must be a
    top-level function (it is pickled)."""
    backend = local_backend(options.nproc, torch.cuda.device_count())
    with tempfile.TemporaryDirectory(prefix="megatron-emoe-eval-") as scratch:
        result_path = os.path.join(scratch, "result.pt")
        run_ranks(
            _rank_body, world_size=options.nproc, backend=backend,
            tp=options.tensor_model_parallel_size,
            ep=options.expert_model_parallel_size,
            args=(options, top_p, fn, fn_args, result_path), timeout=timeout,
        )
        return torch.load(result_path, weights_only=False)


def needs_top_p(budgets) -> bool:
    """Whether any budget is token-adaptive (the model then needs a dispatcher that takes it)."""
    return any(budget is not None and Budget.of(budget).is_top_p for budget in budgets)
