"""Train a tiny GPT-MoE with Top-k and with EMoE on CPU, then print validation loss at k' = 1 ... 3k.

Two gloo processes with expert parallelism 2 and the alltoall dispatcher: Megatron-Core's real
GPTModel and MoELayer. The text is Python standard-library source, read from this machine.

    python examples/demo.py [--steps 150] [--modes topk emoe] [--output runs/demo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import torch

from megatron_emoe import ElasticMoEConfig, set_active_experts, with_elastic_router
from megatron_emoe.launch import run_gloo

TOPK = 2
BUDGETS = range(1, 3 * TOPK + 1)
SEQ, BATCH, VOCAB = 64, 8, 256  # byte-level tokens
STDLIB_FILES = ("argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "json/decoder.py")


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of a few stdlib sources: the first 90% train, the rest validation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in STDLIB_FILES)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:]


def batches(tokens: torch.Tensor, count: int, seed: int):
    """`count` random [BATCH, SEQ + 1] windows."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(len(tokens) - SEQ - 1, (BATCH,), generator=generator)
        yield torch.stack([tokens[s : s + SEQ + 1] for s in starts.tolist()])


def build_model(elastic: ElasticMoEConfig):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=8, moe_router_topk=TOPK, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2, expert_model_parallel_size=2, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(
        config=config, transformer_layer_spec=with_elastic_router(block, elastic),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
    )


def lm_loss(model, window: torch.Tensor) -> torch.Tensor:
    tokens, labels = window[:, :-1], window[:, 1:]
    positions = torch.arange(SEQ).expand_as(tokens)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return model(tokens, positions, causal, labels=labels).float().mean()


def average_data_parallel_grads(model) -> None:
    """Dense weights are replicated over the EP ranks (data parallel there): average their grads.

    Megatron marks expert weights `allreduce=False`; each EP rank owns its own experts.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    for param in model.parameters():
        if param.grad is not None and getattr(param, "allreduce", True):
            torch.distributed.all_reduce(param.grad, group=group)
            param.grad /= group.size()


def train_and_evaluate(rank: int, mode: str, steps: int, output: str) -> None:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    elastic = ElasticMoEConfig(mode=mode, k_ideal=2 * TOPK)
    torch.manual_seed(0)  # same initial weights in every mode
    model = build_model(elastic)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    train, valid = corpus()
    start = time.monotonic()
    for step, window in enumerate(batches(train, steps, seed=rank), start=1):
        optimizer.zero_grad()
        loss = lm_loss(model, window)
        loss.backward()
        average_data_parallel_grads(model)
        optimizer.step()
        if rank == 0 and (step % 25 == 0 or step == steps):
            print(f"[{mode}] step {step:4d}/{steps}  train loss {loss.item():.3f}  "
                  f"({time.monotonic() - start:.0f} s)", flush=True)

    model.eval()
    row = []
    for k in BUDGETS:
        set_active_experts(model, k)
        with torch.no_grad():
            local = torch.stack([lm_loss(model, w) for w in batches(valid, 8, seed=1000)]).mean()
        torch.distributed.all_reduce(local)
        row.append(local.item() / torch.distributed.get_world_size())
    if rank == 0:
        results = json.loads(Path(output).read_text()) if Path(output).exists() else {}
        results[mode] = {"steps": steps, "valid_loss_by_active_experts": dict(zip(BUDGETS, row))}
        Path(output).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--modes", nargs="+", default=["topk", "emoe"], choices=["topk", "emoe", "mmoe"])
    parser.add_argument("--output", default="runs/demo.json", help="where the table goes as JSON")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)  # this run's results only
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Megatron's apex/TE fallback notices
    for mode in args.modes:
        run_gloo(train_and_evaluate, world_size=2, ep=2, args=(mode, args.steps, str(output)),
                 timeout=1800)

    results = json.loads(output.read_text())
    print(f"\nvalidation loss (nats/byte) after {args.steps} steps, by active experts k' "
          f"(trained with k={TOPK}); also in {output}")
    print("k'      " + "".join(f"{k:8d}" for k in BUDGETS))
    for mode, result in results.items():
        losses = result["valid_loss_by_active_experts"].values()
        print(f"{mode:<8}" + "".join(f"{loss:8.3f}" for loss in losses))


if __name__ == "__main__":
    main()
