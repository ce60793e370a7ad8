"""Per-architecture maps between a Hugging Face MoE config/weights and Megatron flags/parameters.

A `Family` turns an HF config into Megatron-LM flags (`megatron_flags`) and into `Rule`s, each
tying one Megatron parameter (global name at TP = EP = 1) to the HF tensors it is made of. Both
conversion directions use the same rules, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_emoe.conversion import deepseek, tensors
from megatron_emoe.conversion.rules import ConversionError, Rule, rope_parameters
from megatron_emoe.hf.moe_view import moe_layer_pattern

__all__ = ["FAMILIES", "ConversionError", "Family", "Rule", "Style", "family_for"]


@dataclasses.dataclass(frozen=True)
class Style:
    """Names and options in which the Llama-style MoE families differ."""

    moe_prefix: str = "mlp"  # HF module holding router + experts
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    experts_key: str = "num_experts"  # HF config field giving the number of routed experts
    expert_width_key: str = "moe_intermediate_size"
    shared_prefix: str | None = None  # HF shared-expert module, if the family has one
    shared_gate: str | None = None  # HF shared-expert sigmoid gate, if any
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm on queries and keys (per head unless across_heads)
    qk_norm_across_heads: bool = False  # ... over the whole projection (OLMoE)
    attention: str = "gqa"  # "gqa" (q/k/v projections) or "mla" (DeepSeek multi-latent attention)
    router: str = "softmax"  # "softmax" (top-k of softmax), "deepseek_v2" or "deepseek_v3"


@dataclasses.dataclass(frozen=True)
class Family:
    """An HF architecture that converts: its config checks, Megatron flags and weight rules."""

    name: str
    model_types: tuple[str, ...]
    style: Style

    # ------------------------------------------------------------------ config -------------
    def check(self, config) -> None:
        """Refuse HF options Megatron-Core's GPTModel cannot reproduce exactly, naming them."""
        problems = []
        if getattr(config, "hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={config.hidden_act!r} (only 'silu', i.e. SwiGLU)")
        rope = rope_parameters(config)
        allowed = ("default", "yarn") if self.style.attention == "mla" else ("default",)
        if rope.get("rope_type", "default") not in allowed:
            problems.append(f"rope_scaling type {rope.get('rope_type')!r} (only {', '.join(allowed)})")
        if float(rope["rope_theta"]) != int(rope["rope_theta"]):
            problems.append(f"rope_theta={rope['rope_theta']} (Megatron's --rotary-base is an int)")
        if getattr(config, "use_sliding_window", False) or (
            getattr(config, "sliding_window", None) is not None
            and "use_sliding_window" not in config.to_dict()
        ):
            problems.append("sliding-window attention (sliding_window / use_sliding_window)")
        if getattr(config, "attention_bias", False):
            problems.append("attention_bias=True (bias on the output projection)")
        if getattr(config, "clip_qkv", None) is not None:
            problems.append(f"clip_qkv={config.clip_qkv}")
        if num_experts(config, self.style) < 2:
            problems.append("fewer than 2 routed experts")
        if getattr(config, "quantization_config", None):
            problems.append("a quantized checkpoint (quantization_config): dequantize it to bf16 first")
        if self.style.attention == "mla":
            problems += deepseek.problems(config, self.style.router)
        if problems:
            raise ConversionError(
                f"{self.name}: this Hugging Face config cannot be converted exactly: "
                + "; ".join(problems)
            )

    def megatron_flags(self, config) -> dict[str, Any]:
        """Megatron-LM flags (name -> value, True = bare flag) that build this architecture."""
        style = self.style
        heads = config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or heads
        moe = moe_layer_pattern(config)
        flags: dict[str, Any] = {
            "num-layers": config.num_hidden_layers,
            "hidden-size": config.hidden_size,
            "ffn-hidden-size": config.intermediate_size,
            "num-attention-heads": heads,
            "max-position-embeddings": config.max_position_embeddings,
            "seq-length": min(config.max_position_embeddings, 4096),
            "position-embedding-type": "rope",
            "rotary-base": int(rope_parameters(config)["rope_theta"]),
            "rotary-percent": 1.0,
            "normalization": "RMSNorm",
            "norm-epsilon": config.rms_norm_eps,
            "swiglu": True,
            "disable-bias-linear": True,
            "add-qkv-bias": style.qkv_bias,
            "qk-layernorm": style.qk_norm,
            "qk-layernorm-across-heads": style.qk_norm_across_heads,
            "untie-embeddings-and-output-weights": not config.tie_word_embeddings,
            "init-method-std": getattr(config, "initializer_range", 0.02),
            "attention-dropout": 0.0,
            "hidden-dropout": 0.0,
            "num-experts": num_experts(config, style),
            "moe-router-topk": config.num_experts_per_tok,
            "moe-ffn-hidden-size": getattr(config, style.expert_width_key),
            "moe-token-dispatcher-type": "alltoall",
            "moe-router-load-balancing-type": "aux_loss",
            "moe-aux-loss-coeff": getattr(config, "router_aux_loss_coef", 0.0) or 0.0,
            "expert-tensor-parallel-size": 1,
        }
        if style.attention == "mla":
            flags.update(deepseek.attention_flags(config))
        else:
            flags.update({"kv-channels": head_dim(config), "group-query-attention": groups != heads,
                          "num-query-groups": groups})
        if style.router == "softmax":
            flags["moe-router-pre-softmax"] = not normalizes_topk(config, self.name)
        else:
            flags.update(deepseek.router_flags(config, style.router))
        if not all(moe):
            flags["moe-layer-freq"] = "[" + ",".join("1" if m else "0" for m in moe) + "]"
        if style.shared_prefix:
            flags["moe-shared-expert-intermediate-size"] = shared_expert_width(config)
            flags["moe-shared-expert-gate"] = style.shared_gate is not None
        dtype = torch_dtype(config)
        flags["bf16"] = dtype == torch.bfloat16
        flags["fp16"] = dtype == torch.float16
        return flags

    # ------------------------------------------------------------------ weights ------------
    def rules(self, config, padded_vocab: int) -> list[Rule]:
        """Every Megatron parameter of the model (TP = EP = 1 names) and its HF sources."""
        rules = [
            Rule(
                "embedding.word_embeddings.weight",
                ("model.embed_tokens.weight",),
                lambda w: tensors.pad_rows(w, padded_vocab),
                lambda w: (w[: config.vocab_size],),
            ),
            Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        ]
        if not config.tie_word_embeddings:
            rules.append(
                Rule(
                    "output_layer.weight",
                    ("lm_head.weight",),
                    lambda w: tensors.pad_rows(w, padded_vocab),
                    lambda w: (w[: config.vocab_size],),
                )
            )
        for layer, is_moe in enumerate(moe_layer_pattern(config)):
            if self.style.attention == "mla":
                rules += deepseek.attention_rules(config, layer)
            else:
                rules += self._attention_rules(config, layer)
            rules += self._moe_rules(config, layer) if is_moe else self._dense_rules(layer)
        return rules

    def ignores(self, config, name: str) -> bool:
        """HF tensors transformers itself does not load (DeepSeek-V3's multi-token prediction)."""
        return self.style.attention == "mla" and deepseek.is_mtp_tensor(config, name)

    def _attention_rules(self, config, layer: int) -> list[Rule]:
        hf, meg = f"model.layers.{layer}", f"decoder.layers.{layer}"
        heads = config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or heads
        dim = head_dim(config)

        def pack(q, k, v):
            return tensors.pack_qkv(q, k, v, groups)

        def unpack(qkv):
            return tensors.unpack_qkv(qkv, groups, heads // groups, dim)

        names = [f"{hf}.self_attn.{p}_proj" for p in "qkv"]
        rules = [
            Rule(f"{meg}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",)),
            Rule(
                f"{meg}.self_attention.linear_qkv.weight",
                tuple(f"{n}.weight" for n in names),
                pack,
                unpack,
            ),
            Rule(f"{meg}.self_attention.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",)),
            Rule(f"{meg}.pre_mlp_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",)),
        ]
        if self.style.qkv_bias:
            rules.append(
                Rule(
                    f"{meg}.self_attention.linear_qkv.bias",
                    tuple(f"{n}.bias" for n in names),
                    pack,
                    unpack,
                )
            )
        if self.style.qk_norm:
            rules += [
                Rule(f"{meg}.self_attention.q_layernorm.weight", (f"{hf}.self_attn.q_norm.weight",)),
                Rule(f"{meg}.self_attention.k_layernorm.weight", (f"{hf}.self_attn.k_norm.weight",)),
            ]
        return rules

    def _moe_rules(self, config, layer: int) -> list[Rule]:
        style = self.style
        hf, meg = f"model.layers.{layer}.{style.moe_prefix}", f"decoder.layers.{layer}.mlp"
        rules = [Rule(f"{meg}.router.weight", (f"{hf}.gate.weight",))]
        if self.style.router == "deepseek_v3":
            rules.append(Rule(f"{meg}.router.expert_bias", (f"{hf}.gate.e_score_correction_bias",)))
        for expert in range(num_experts(config, style)):
            rules += _swiglu_rules(
                f"{meg}.experts.local_experts.{expert}", f"{hf}.experts.{expert}", style.expert_names
            )
        if style.shared_prefix:
            rules += _swiglu_rules(
                f"{meg}.shared_experts", f"{hf}.{style.shared_prefix}", style.expert_names
            )
        if style.shared_gate:
            rules.append(Rule(f"{meg}.shared_experts.gate_weight", (f"{hf}.{style.shared_gate}.weight",)))
        return rules

    def _dense_rules(self, layer: int) -> list[Rule]:
        return _swiglu_rules(
            f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj")
        )


def _swiglu_rules(meg: str, hf: str, names: tuple[str, str, str]) -> list[Rule]:
    """Rules of one SwiGLU MLP: fused gate/up FC1 and the down projection."""
    gate, up, down = names
    return [
        Rule(
            f"{meg}.linear_fc1.weight",
            (f"{hf}.{gate}.weight", f"{hf}.{up}.weight"),
            tensors.pack_gated_fc1,
            tensors.unpack_gated_fc1,
        ),
        Rule(f"{meg}.linear_fc2.weight", (f"{hf}.{down}.weight",)),
    ]


# ---------------------------------------------------------------------- config helpers -----
def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_experts(config, style: Style) -> int:
    return getattr(config, style.experts_key, 0) or 0


def torch_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def normalizes_topk(config, family: str) -> bool:
    """Whether the family renormalises the top-k gates (Mixtral always does)."""
    return True if family == "mixtral" else bool(getattr(config, "norm_topk_prob", False))


def shared_expert_width(config) -> int:
    """Width of the shared expert(s): Qwen2-MoE names it, DeepSeek counts experts."""
    if getattr(config, "shared_expert_intermediate_size", None):
        return config.shared_expert_intermediate_size
    return config.n_shared_experts * config.moe_intermediate_size


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register(Family("qwen3_moe", ("qwen3_moe",), Style(qk_norm=True)))
register(
    Family(
        "qwen2_moe",
        ("qwen2_moe",),
        Style(shared_prefix="shared_expert", shared_gate="shared_expert_gate", qkv_bias=True),
    )
)
register(
    Family(
        "olmoe",
        ("olmoe",),
        Style(expert_width_key="intermediate_size", qk_norm=True, qk_norm_across_heads=True),
    )
)
register(
    Family(
        "mixtral",
        ("mixtral",),
        Style(
            moe_prefix="block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            experts_key="num_local_experts",
            expert_width_key="intermediate_size",
        ),
    )
)

for _version in ("v2", "v3"):
    register(
        Family(
            f"deepseek_{_version}",
            (f"deepseek_{_version}",),
            Style(experts_key="n_routed_experts", shared_prefix="shared_experts",
                  attention="mla", router=f"deepseek_{_version}"),
        )
    )


def family_for(config) -> Family:
    """The family converting an HF config (by `model_type`), or a `ConversionError` naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConversionError(
            f"unsupported Hugging Face architecture model_type={model_type!r}; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    family.check(config)
    return family
