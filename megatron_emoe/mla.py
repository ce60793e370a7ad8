"""Multi-latent attention (DeepSeek's MLA) on Megatron-Core 0.19's local, non-TE layer spec.

Two gaps of 0.19's local spec are closed here, so MLA models build and run on CPU (and
anywhere Transformer Engine is off):
- MLA passes `k_channels`/`v_channels` to its core attention, which the local
  `DotProductAttention` does not take (its output width is `kv_channels`, so set
  `--kv-channels` to `--v-head-dim`);
- with no query low-rank projection (`--q-lora-rank` unset, DeepSeek-V2-Lite), the norm
  resolver demands a fused norm+linear that only TE has; the query projection needs no norm.
"""

from __future__ import annotations

import dataclasses

from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_emoe.spec import map_spec


class MLADotProductAttention(DotProductAttention):
    """Megatron's local core attention, taking (and checking) MLA's per-tensor head widths."""

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None and v_channels != self.hidden_size_per_attention_head:
            raise ValueError(
                f"local MLA attention needs --kv-channels equal to --v-head-dim ({v_channels}), "
                f"got {self.hidden_size_per_attention_head}"
            )


class LocalMLASelfAttention(MLASelfAttention):
    """MLA whose plain query projection (no `q_lora_rank`) is an unfused linear, as in HF."""

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is not None:
            return super()._resolve_qk_norm_config(submodules)
        return {
            "linear_q_proj": submodules.linear_q_proj or ColumnParallelLinear,
            "linear_q_up_proj": IdentityOp,
            "linear_kv_up_proj": submodules.linear_kv_up_proj,
            "q_layernorm": IdentityOp,
            "kv_layernorm": submodules.kv_layernorm,
        }


def with_local_mla(spec, q_lora_rank):
    """`spec` with every local `MLASelfAttention` made buildable (see module docstring)."""

    def visit(node):
        if isinstance(node, ModuleSpec) and node.module is MLASelfAttention:
            changes = {"core_attention": MLADotProductAttention}
            if q_lora_rank is None:
                changes["q_layernorm"] = None
            submodules = dataclasses.replace(node.submodules, **changes)
            return dataclasses.replace(node, module=LocalMLASelfAttention, submodules=submodules)
        return None

    return map_spec(spec, visit)
