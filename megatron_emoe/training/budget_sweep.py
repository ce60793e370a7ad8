"""After training: reload the saved checkpoint and report validation loss at each budget k'."""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from megatron.training import print_rank_0

from megatron_emoe import coactivation
from megatron_emoe.files import write_text_atomically
from megatron_emoe.runtime.data import validation_iterator_factory
from megatron_emoe.runtime.evaluate import evaluate_at_budget
from megatron_emoe.runtime.model import build_model, load


@contextlib.contextmanager
def _loading_weights_only(args):
    """Flags `load_checkpoint` reads, set so that it loads just the model from `--save`."""
    names = ("finetune", "no_load_optim", "no_load_rng")
    saved = {name: getattr(args, name) for name in names}
    args.finetune, args.no_load_optim, args.no_load_rng = False, True, True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def evaluate_budgets(model, budgets, make_iterator, coactivation_dir=None) -> dict[int, float]:
    """Validation LM loss (nats/token) of `model` at each number of active experts; with
    `coactivation_dir`, also each budget's co-activation matrices (`eval_kK.npz`)."""
    return {
        k: evaluate_at_budget(model, k, make_iterator, coactivation_dir=coactivation_dir).val_loss
        for k in budgets
    }


def format_table(losses: dict[int, float], train_topk: int) -> str:
    """The budget table the demo prints: loss and perplexity per k', the training k marked."""
    rows = [f"{'k_prime':>8} {'val_loss':>10} {'val_ppl':>10}"]
    for k, loss in losses.items():
        mark = "  <- trained k" if k == train_topk else ""
        rows.append(f"{k:>8} {loss:>10.4f} {math.exp(min(loss, 50)):>10.2f}{mark}")
    return "\n".join(rows)


def run(args) -> dict[int, float]:
    """Build the model, load the latest checkpoint in --save, evaluate every budget, report."""
    model = build_model(args)  # a fresh model: training hangs optimizer hooks on its own
    with _loading_weights_only(args):
        iteration = load(model, load_arg="save")
    losses = evaluate_budgets(
        model, args.elastic_eval_budgets, validation_iterator_factory(args),
        coactivation_dir=args.coactivation_dir,
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print_rank_0("validation loss by number of active experts (from the saved checkpoint):")
        print_rank_0(format_table(losses, args.moe_router_topk))
        output = args.elastic_eval_output or os.path.join(args.save, "elastic_eval.json")
        record = {
            "iteration": iteration,  # the saved checkpoint's (args.iteration is the run's start)
            "router_mode": args.moe_router_mode,
            "train_topk": args.moe_router_topk,
            "num_experts": args.num_experts,
            "eval_tokens": args.eval_iters * args.global_batch_size * args.seq_length,
            "val_loss": {str(k): v for k, v in losses.items()},
        }
        write_text_atomically(output, json.dumps(record, indent=2) + "\n")
        if args.coactivation_dir:
            table = coactivation.compare_directory(args.coactivation_dir)
            if table is not None:
                means = table["mean_over_layers"].items()
                print_rank_0("co-activation distance to training, mean over layers: " + ", ".join(
                    f"k'={k}: " + ("n/a" if d is None else f"{d:.4f}") for k, d in means))
    return losses
