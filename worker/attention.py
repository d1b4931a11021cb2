"""Attention over the paged KV cache: per-step metadata and the backend interface with a torch backend.

The KV pool of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
block table lists the blocks holding its positions in order, and the slot mapping says where each new
token's K/V goes (block * block_size + offset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillGroup:
    """One sequence computing more than one token this step (a prefill chunk)."""

    token_slice: slice  # rows of the flattened batch
    block_ids: torch.Tensor  # [num_blocks_needed] covering the whole context
    context_len: int  # tokens attended after this step (computed before + this chunk)
    mask: torch.Tensor | None  # [q, context] bool, None when the chunk is the whole context (plain causal)


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step, built once and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64
    decode_token_idx: torch.Tensor | None  # [D] rows of the flattened batch that decode one token
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int64 (padded with block 0)
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks * block_size] bool: position < context_len
    prefills: list[PrefillGroup]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        starts: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillGroup] = []
        row = 0
        for q, start, table in zip(query_lens, starts, block_tables):
            ctx = start + q
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, ctx))
            needed = table[: -(-ctx // block_size)]
            if q == 1:
                decode_rows.append(row)
                decode_tables.append(needed)
                decode_lens.append(ctx)
            else:
                mask = None
                if start:
                    # query i sits at position start+i and sees keys 0..start+i
                    qpos = torch.arange(start, ctx, device=device).unsqueeze(1)
                    mask = torch.arange(ctx, device=device).unsqueeze(0) <= qpos
                prefills.append(
                    PrefillGroup(slice(row, row + q), torch.tensor(needed, device=device), ctx, mask)
                )
            row += q
        meta = cls(torch.tensor(slots, dtype=torch.int64, device=device), None, None, None, prefills)
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            meta.decode_token_idx = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.int64, device=device)
            lens = torch.tensor(decode_lens, device=device).view(-1, 1, 1, 1)
            meta.decode_mask = torch.arange(width * block_size, device=device).view(1, 1, 1, -1) < lens
        return meta


class AttentionBackend(Protocol):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the new tokens; writes k/v into the cache; returns [T, H, D]."""
        ...


class TorchAttention:
    """Reference backend on torch's scaled_dot_product_attention; runs on CPU and GPU."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        num_blocks, block_size, kv_heads, head_dim = key_cache.shape
        key_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        value_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], key_cache, value_cache, meta)
        for group in meta.prefills:
            out[group.token_slice] = self._prefill(q[group.token_slice], key_cache, value_cache, group)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata):
        tables = meta.decode_block_tables
        d, width = tables.shape
        _, block_size, kv_heads, head_dim = key_cache.shape
        keys = key_cache[tables].view(d, width * block_size, kv_heads, head_dim).transpose(1, 2)
        values = value_cache[tables].view(d, width * block_size, kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )
        return out.squeeze(2)

    @staticmethod
    def _prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, group: PrefillGroup):
        _, block_size, kv_heads, head_dim = key_cache.shape
        ctx = group.context_len
        keys = key_cache[group.block_ids].view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
        values = value_cache[group.block_ids].view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=group.mask,
            is_causal=group.mask is None,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)
