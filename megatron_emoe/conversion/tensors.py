"""Pure tensor re-layouts between Hugging Face and Megatron-Core weights (no Megatron import)."""

from __future__ import annotations

import torch


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Megatron's fused QKV from separate projections: `[groups * (q_per_group + 2) * head_dim, ...]`.

    Megatron stores, for each query group, its query heads then its key head then its value head,
    so a tensor-parallel rank holds whole groups. Works for weights `[out, hidden]` and biases `[out]`.
    """
    tail = q.shape[1:]
    q = q.reshape(num_query_groups, -1, *tail)
    k = k.reshape(num_query_groups, -1, *tail)
    v = v.reshape(num_query_groups, -1, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def unpack_qkv(
    qkv: torch.Tensor, num_query_groups: int, q_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_qkv`: `(q, k, v)` with `q` `[heads * head_dim, ...]`, `k`/`v` `[groups * head_dim, ...]`."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, (q_per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [q_per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *tail).contiguous(),
        k.reshape(-1, *tail).contiguous(),
        v.reshape(-1, *tail).contiguous(),
    )


def pack_gated_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's gated-linear-unit FC1 `[2 * ffn, hidden]`: the activated half first."""
    return torch.cat([gate, up], dim=0)


def unpack_gated_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate, up)` halves of a gated FC1 `[2 * ffn, hidden]`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary weight `[vocab, hidden]` padded with zero rows to `[rows, hidden]`."""
    if rows < weight.shape[0]:
        raise ValueError(f"cannot pad {weight.shape[0]} vocabulary rows down to {rows}")
    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def tensor_parallel_shard(
    full: torch.Tensor, dim: int, rank: int, size: int, gated: bool = False
) -> torch.Tensor:
    """This rank's slice of a tensor split over `size` ranks along `dim`.

    A gated FC1 (`gated=True`) is split half by half, so every rank gets its gate and up slices
    (Megatron's layout for SwiGLU under tensor parallelism).
    """
    if size == 1:
        return full
    if gated:
        return torch.cat([half.chunk(size, dim=dim)[rank] for half in full.chunk(2, dim=dim)], dim=dim)
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split over {size} ranks")
    return full.chunk(size, dim=dim)[rank]
