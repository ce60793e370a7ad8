"""Tiny random Hugging Face MoE models (real transformers classes) and logits on both sides."""

from __future__ import annotations

import os
import tempfile

import torch

VOCAB = 96  # not a multiple of 128: exercises Megatron's vocabulary padding
SEQ = 12
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

DEEPSEEK = {
    "num_key_value_heads": 4, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "first_k_dense_replace": 1,
}


def hf_config(family: str, **overrides):
    """A tiny config of `family` with 8 routed experts, k = 2."""
    import transformers as tf

    settings = {
        "qwen3_moe": (tf.Qwen3MoeConfig, {"moe_intermediate_size": 16, "num_experts": 8,
                                              "num_experts_per_tok": 2, "head_dim": 16, "norm_topk_prob": True}),
        "qwen2_moe": (tf.Qwen2MoeConfig, {"moe_intermediate_size": 16, "num_experts": 8,
                                              "num_experts_per_tok": 2, "shared_expert_intermediate_size": 24}),
        "olmoe": (tf.OlmoeConfig, {"num_experts": 8, "num_experts_per_tok": 2, "pad_token_id": 1,
                                   "eos_token_id": 2}),
        "deepseek_v2": (tf.DeepseekV2Config, {**DEEPSEEK, "q_lora_rank": None, "routed_scaling_factor": 1.5,
                                              "topk_method": "group_limited_greedy", "n_group": 4,
                                              "topk_group": 2}),
        # YaRN and rotate-half RoPE rows (rope_interleave=False) exercise the rarer mappings
        "deepseek_v3": (tf.DeepseekV3Config, {**DEEPSEEK, "q_lora_rank": 24, "n_group": 2, "topk_group": 1,
                                              "rope_interleave": False, "rope_parameters": {
                                                  "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "mscale": 0.707, "mscale_all_dim": 0.707,
                                                  "original_max_position_embeddings": 4096,
                                                  "beta_fast": 32, "beta_slow": 1}}),
        "mixtral": (tf.MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    }[family]
    config_class, extra = settings
    return config_class(**{**COMMON, **extra, **overrides})


def save_hf_model(family: str, folder: str, seed: int = 0, **overrides) -> str:
    """Save a randomly initialised tiny `family` model (fp32) with `save_pretrained`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    # Make every weight matter: HF initialises norms to 1 and some biases to 0.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "bias")):
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection-only bias
                buffer.copy_(0.1 * torch.randn_like(buffer))
    model.save_pretrained(folder)
    return folder


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(folder: str, ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Logits `[batch, seq, vocab]` of the HF model in `folder`, routing each token to k experts."""
    from transformers import AutoModelForCausalLM

    extra = {} if k is None else {"num_experts_per_tok": k}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def megatron_logits(checkpoint: str, ids: torch.Tensor, k: int | None = None,
                    tp: int = 1, ep: int = 1) -> torch.Tensor:
    """Logits `[batch, seq, vocab]` of a Megatron checkpoint loaded at TP/EP on gloo ranks."""
    from megatron_emoe.runtime.launch import run_gloo

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "logits.pt")
        run_gloo(_megatron_logits_rank, world_size=tp * ep, tp=tp, ep=ep,
                 args=(checkpoint, ids, k, tp, ep, out), timeout=300)
        return torch.load(out)


def _megatron_logits_rank(rank, checkpoint, ids, k, tp, ep, out):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_emoe.routers import set_active_experts
    from megatron_emoe.runtime.model import loaded_model

    with loaded_model(checkpoint, tp=tp, ep=ep) as model:
        (chunk,) = model
        chunk.eval()
        set_active_experts(model, k)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = chunk(input_ids=ids, position_ids=positions, attention_mask=None)
        logits = gather_from_tensor_model_parallel_region(logits)
    if rank == 0:
        torch.save(logits[..., :VOCAB], out)
