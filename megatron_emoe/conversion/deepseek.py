"""DeepSeek-V2/V3: multi-latent attention and group-limited routing, as transformers 5 runs them.

Only what Megatron-Core reproduces exactly is accepted (`problems` names the rest):
- V2 routes with softmax, no renormalisation, times `routed_scaling_factor`; its
  `group_limited_greedy` scores a group by its best expert, which Megatron's group score (sum of
  the top `k // topk_group`) equals only when that quotient is 1.
- V3 routes with sigmoid plus `e_score_correction_bias` for selection, groups scored by the sum of
  their top 2 (Megatron: top `k // topk_group`, so that quotient must be 2), and renormalises
  the gates (Megatron's sigmoid path always does, so `norm_topk_prob` must be true for k > 1).
- HF's q/kv latent norms use eps 1e-6 whatever `rms_norm_eps` says; YaRN must use Megatron's
  fixed `original_max_position_embeddings` 4096, `beta_fast` 32 and `beta_slow` 1.
"""

from __future__ import annotations

import math

import torch

from megatron_emoe.conversion.rules import Rule, rope_parameters

MEGATRON_YARN = {"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}


def problems(config, router: str) -> list[str]:
    """What in this DeepSeek config Megatron-Core cannot reproduce exactly."""
    found = []
    k = config.num_experts_per_tok
    if config.num_key_value_heads != config.num_attention_heads:
        found.append("num_key_value_heads != num_attention_heads (MLA has one latent KV)")
    if config.rms_norm_eps != 1e-6:
        found.append(f"rms_norm_eps={config.rms_norm_eps} (HF's latent norms always use 1e-6)")
    if getattr(config, "mlp_bias", False):
        found.append("mlp_bias=True")
    rope = rope_parameters(config)
    if rope.get("rope_type") == "yarn":
        for key, value in MEGATRON_YARN.items():
            if rope.get(key, value) != value:
                found.append(f"YaRN {key}={rope.get(key)} (Megatron's MLA fixes it at {value})")
        if rope.get("truncate", True) is False:
            found.append("YaRN truncate=False")
    grouped = _grouped(config, router)
    if router == "deepseek_v2":
        method = getattr(config, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            found.append(f"topk_method={method!r} (greedy or group_limited_greedy)")
        if grouped and k // config.topk_group != 1:
            found.append(
                f"group_limited_greedy with num_experts_per_tok // topk_group = {k // config.topk_group} "
                "(Megatron scores groups by their top-(k // topk_group) sum, HF by their best expert)"
            )
    else:
        if k > 1 and not getattr(config, "norm_topk_prob", True):
            found.append("norm_topk_prob=False (Megatron's sigmoid router renormalises the top-k)")
        if k == 1 and getattr(config, "norm_topk_prob", True):
            found.append("norm_topk_prob=True with one expert per token")
        if grouped and k // config.topk_group != 2:
            found.append(
                f"group-limited routing with num_experts_per_tok // topk_group = {k // config.topk_group} "
                "(HF scores groups by their top-2 sum; Megatron by the top-(k // topk_group))"
            )
    return found


def _grouped(config, router: str) -> bool:
    """Whether routing is restricted to the best `topk_group` of `n_group` expert groups."""
    if router == "deepseek_v2" and getattr(config, "topk_method", "greedy") != "group_limited_greedy":
        return False
    groups, chosen = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
    return chosen < groups


def attention_flags(config) -> dict:
    """Megatron flags of multi-latent attention (with YaRN when the config uses it)."""
    flags = {
        "multi-latent-attention": True,
        "qk-layernorm": True,  # the q/kv latent RMSNorms
        "q-lora-rank": config.q_lora_rank,
        "kv-lora-rank": config.kv_lora_rank,
        "qk-head-dim": config.qk_nope_head_dim,
        "qk-pos-emb-head-dim": config.qk_rope_head_dim,
        "v-head-dim": config.v_head_dim,
        "kv-channels": config.v_head_dim,  # the local core attention's output width
    }
    rope = rope_parameters(config)
    if rope.get("rope_type") == "yarn":
        factor = float(rope["factor"])
        all_dim = float(rope.get("mscale_all_dim") or 0.0)
        flags.update({"rope-type": "yarn", "rotary-scaling-factor": factor,
                      "mscale": yarn_mscale(rope), "mscale-all-dim": all_dim})
    else:
        flags.update({"rope-type": "rope", "rotary-scaling-factor": 1.0, "mscale-all-dim": 0.0})
    return flags


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_mscale(rope: dict) -> float:
    """Megatron's `mscale` that reproduces HF's YaRN attention factor.

    Megatron scales by get_mscale(f, mscale) / get_mscale(f, mscale_all_dim); HF uses an explicit
    `attention_factor`, else that ratio when both are set, else get_mscale(f). Solve for mscale.
    """
    factor, all_dim = float(rope["factor"]), float(rope.get("mscale_all_dim") or 0.0)
    target = rope.get("attention_factor")
    if target is None:
        if rope.get("mscale") and all_dim:
            target = _get_mscale(factor, rope["mscale"]) / _get_mscale(factor, all_dim)
        else:
            target = _get_mscale(factor)
    if factor <= 1:
        return 1.0
    return (target * _get_mscale(factor, all_dim) - 1.0) / (0.1 * math.log(factor))


def router_flags(config, router: str) -> dict:
    """Megatron router flags of DeepSeek-V2 (softmax) or V3 (sigmoid + expert bias) routing."""
    flags = {
        "moe-router-topk-scaling-factor": float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
        "moe-router-dtype": "fp32",  # HF computes router logits in fp32
    }
    if router == "deepseek_v2":
        flags.update({"moe-router-score-function": "softmax", "moe-router-pre-softmax": True})
    else:
        flags.update({"moe-router-score-function": "sigmoid", "moe-router-enable-expert-bias": True})
    if _grouped(config, router):
        flags.update({"moe-router-num-groups": config.n_group, "moe-router-group-topk": config.topk_group})
    return flags


def _rope_permutation(config) -> torch.Tensor | None:
    """Row order taking HF's rotate-half RoPE rows to Megatron's interleaved ones (V3 with
    rope_interleave=False), or None when the rows already agree."""
    if config.model_type != "deepseek_v3" or getattr(config, "rope_interleave", True):
        return None
    dim = config.qk_rope_head_dim
    return torch.arange(dim).view(2, dim // 2).t().reshape(-1)


def _permute_rope_rows(weight, order, head_width, rope_width, inverse=False):
    """Reorder the last `rope_width` rows of each `head_width`-row block of `weight`."""
    if order is None:
        return weight
    order = torch.argsort(order) if inverse else order
    blocks = weight.reshape(-1, head_width, *weight.shape[1:]).clone()
    blocks[:, head_width - rope_width:] = blocks[:, head_width - rope_width:][:, order]
    return blocks.reshape(weight.shape)


def attention_rules(config, layer: int) -> list[Rule]:
    """Rules of one MLA layer (Megatron's local spec names)."""
    hf, meg = f"model.layers.{layer}", f"decoder.layers.{layer}.self_attention"
    order = _rope_permutation(config)
    rope, q_head = config.qk_rope_head_dim, config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_rows = config.kv_lora_rank + rope

    def q_rule(megatron: str, source: str) -> Rule:
        return Rule(megatron, (source,),
                    lambda w: _permute_rope_rows(w, order, q_head, rope),
                    lambda w: (_permute_rope_rows(w, order, q_head, rope, inverse=True),))

    rules = [
        Rule(f"decoder.layers.{layer}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",)),
        Rule(f"decoder.layers.{layer}.pre_mlp_layernorm.weight",
             (f"{hf}.post_attention_layernorm.weight",)),
        Rule(f"{meg}.linear_kv_down_proj.weight", (f"{hf}.self_attn.kv_a_proj_with_mqa.weight",),
             lambda w: _permute_rope_rows(w, order, kv_rows, rope),
             lambda w: (_permute_rope_rows(w, order, kv_rows, rope, inverse=True),)),
        Rule(f"{meg}.kv_layernorm.weight", (f"{hf}.self_attn.kv_a_layernorm.weight",)),
        Rule(f"{meg}.linear_kv_up_proj.weight", (f"{hf}.self_attn.kv_b_proj.weight",)),
        Rule(f"{meg}.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",)),
    ]
    if config.q_lora_rank is None:
        rules.append(q_rule(f"{meg}.linear_q_proj.weight", f"{hf}.self_attn.q_proj.weight"))
    else:
        rules += [
            Rule(f"{meg}.linear_q_down_proj.weight", (f"{hf}.self_attn.q_a_proj.weight",)),
            Rule(f"{meg}.q_layernorm.weight", (f"{hf}.self_attn.q_a_layernorm.weight",)),
            q_rule(f"{meg}.linear_q_up_proj.weight", f"{hf}.self_attn.q_b_proj.weight"),
        ]
    return rules


def is_mtp_tensor(config, name: str) -> bool:
    """Weights of multi-token-prediction layers, stored after the last decoder layer (V3)."""
    prefix = "model.layers."
    if not name.startswith(prefix):
        return False
    index = name[len(prefix):].split(".", 1)[0]
    return index.isdigit() and int(index) >= config.num_hidden_layers
