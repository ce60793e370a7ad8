"""The fine-tuning run: elastic transformers model -> (DeepSpeed-MoE experts) -> DeepSpeed engine
-> steps, checkpoints, resume -> the final model saved with `save_pretrained` in save/hf.

Every micro-batch's data and random state are a function of (seed, step, micro-batch), so a run
resumed from a checkpoint continues as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM

from megatron_emoe import routing
from megatron_emoe.data.tokenizer import load_tokenizer
from megatron_emoe.hf import elasticize, last_hr_loss, set_active_experts, set_training_step
from megatron_emoe.hf.deepspeed_moe import from_deepspeed_moe, init_distributed, to_deepspeed_moe
from megatron_emoe.hf_finetune.options import FinetuneOptions
from megatron_emoe.hf_finetune.sft_batches import load_sft

LOG_NAME = "finetune_log.jsonl"


def run(options: FinetuneOptions) -> None:
    """Fine-tune as `options` says; rank 0 appends one JSON line per step to save/finetune_log.jsonl."""
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    examples = load_sft(options.train_data, load_tokenizer(options.tokenizer), options.seq_length)
    torch.manual_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32)
    elasticize(model, options.elastic)
    set_active_experts(model, None)  # train at the training k; the config keeps --moe-active-experts
    engine = _engine(model, options)
    start = _resume(engine, options)
    micro = engine.train_micro_batch_size_per_gpu()
    accumulation = engine.gradient_accumulation_steps()
    for step in range(start, options.train_iters):
        engine.train()
        losses = []
        for microbatch in range(accumulation):
            torch.manual_seed(routing.mix_seed(options.seed, step, microbatch))
            set_training_step(model, step)
            batch = examples.batch(step, microbatch, rank, world, micro)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if rank == 0:
            hr = last_hr_loss(model)
            _log(options.save, {"step": step + 1, "loss": sum(losses) / len(losses),
                                "hr_loss": None if hr is None else hr.item()})
        done = step + 1
        if options.save_interval and done % options.save_interval == 0 and done < options.train_iters:
            engine.save_checkpoint(options.save, tag=f"step{step + 1}", client_state={"step": step + 1})
    engine.save_checkpoint(options.save, tag=f"step{options.train_iters}",
                           client_state={"step": options.train_iters})
    _save_model(engine, model, options)


def _engine(model, options: FinetuneOptions):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = {"params": parameters, "name": "parameters"}
    if options.ep_size:
        to_deepspeed_moe(model, options.ep_size)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
    optimizer = torch.optim.AdamW(groups if isinstance(groups, list) else [groups], lr=options.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=options.deepspeed_config)
    return engine


def _resume(engine, options: FinetuneOptions) -> int:
    """The step to start from: the checkpoint's in --load, else in --save, else 0."""
    folder = options.load or options.save
    if not os.path.isfile(os.path.join(folder, "latest")):
        return 0
    _, client = engine.load_checkpoint(folder)
    return int(client["step"])


def _save_model(engine, model, options: FinetuneOptions) -> None:
    """save/hf: a transformers folder (experts gathered back, ZeRO-3 shards gathered) that plain
    transformers loads and `megatron_emoe.hf.from_pretrained` reloads elastic."""
    import deepspeed

    if options.ep_size:
        from_deepspeed_moe(model)
    set_active_experts(model, options.elastic.inference_budget)
    stage3 = engine.zero_optimization_stage() == 3
    params = list(model.parameters()) if stage3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage3):
        if torch.distributed.get_rank() == 0:
            model.save_pretrained(os.path.join(options.save, "hf"))
    torch.distributed.barrier()


def _log(folder: str, record: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOG_NAME), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"step {record['step']}: loss {record['loss']:.6f}", flush=True)
