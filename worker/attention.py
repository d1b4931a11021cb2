"""Attention over the paged KV cache: per-step metadata, the backend interface and its two backends.

The KV pool of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
block table lists the blocks holding its positions in order, and the slot mapping says where each new
token's K/V goes (block * block_size + offset). TorchAttention (SDPA over gathered blocks) is the reference
and runs anywhere; PagedCpuAttention (worker/csrc) reads the blocks in place and is the CPU default.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from worker import kernels

log = logging.getLogger(__name__)


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
    # every sequence, in batch order, for the paged kernel (int32, as it indexes with them)
    block_tables: torch.Tensor  # [S, max_blocks] padded with block 0, never read past context_lens
    query_start: torch.Tensor  # [S + 1] first row of each sequence in the flattened batch, then T
    context_lens: torch.Tensor  # [S] tokens attended after this step

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
        width = max((-(-(s + q) // block_size) for q, s in zip(query_lens, starts)), default=0)
        i32 = dict(dtype=torch.int32, device=device)
        meta = cls(
            torch.tensor(slots, dtype=torch.int64, device=device), None, None, None, prefills,
            block_tables=torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables], **i32),
            query_start=torch.tensor([0, *itertools.accumulate(query_lens)], **i32),
            context_lens=torch.tensor([s + q for q, s in zip(query_lens, starts)], **i32),
        )
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
        # a cache narrower than the model (kv_cache_dtype) holds the rows rounded; reads widen them back
        key_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(key_cache.dtype))
        value_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(value_cache.dtype))
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], key_cache, value_cache, meta)
        for group in meta.prefills:
            out[group.token_slice] = self._prefill(q[group.token_slice], kv_cache, group)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata):
        tables = meta.decode_block_tables
        d, width = tables.shape
        _, block_size, kv_heads, head_dim = key_cache.shape
        keys = key_cache[tables].view(d, width * block_size, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        values = value_cache[tables].view(d, width * block_size, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )
        return out.squeeze(2)

    @staticmethod
    def _prefill(q: torch.Tensor, kv_cache: torch.Tensor, group: PrefillGroup):
        keys, values = (x.to(q.dtype) for x in _gather_context(kv_cache, group))
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=group.mask,
            is_causal=group.mask is None,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)


class PagedCpuAttention:
    """CPU backend on the C++ kernel in worker/csrc/paged_attention.cpp: reads each sequence's K/V blocks in
    place (no gather, no padding) and runs every decode and prefill row of a step in one call per layer, on
    the torch intra-op threads. float32 and bfloat16, and float32 over a bfloat16 cache (kv_cache_dtype).

    bfloat16 prefill on CPUs with AMX (`amx_prefill`, the default there for heads of 32 or 64) runs in the kernel on
    the tile unit: 1.7-2.8x torch's SDPA flash attention on a layer's 8 x 256 tokens (docs/benchmarks.md,
    thirteenth pass).
    With `sdpa_prefill`, the kernel writes the step's K/V and attends the decodes only, and each prefill chunk goes
    through torch's scaled_dot_product_attention instead (on AMX, for the heads amx_prefill does not take)."""

    DTYPES = (torch.float32, torch.bfloat16)

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        # the kernel keeps a head's row in whole vectors (16 floats on AVX-512, 8 elsewhere), at most 256 floats
        return device.type == "cpu" and dtype in cls.DTYPES and head_dim % 16 == 0 and head_dim <= 256

    @staticmethod
    def prefers_amx_prefill(dtype: torch.dtype, head_dim: int) -> bool:
        """Whether the kernel's AMX prefill runs here: bfloat16, a head of 32 or 64, and a build and a Linux that give
        the kernel the tile unit."""
        if dtype != torch.bfloat16 or "amx_bf16" not in kernels.cpu_flags().split():
            return False
        kernels.paged_attention()  # loads the library that defines the op below
        return bool(torch.ops.nimbus.amx_prefill_available(head_dim))

    @staticmethod
    def prefers_sdpa_prefill(dtype: torch.dtype, head_dim: int = 64) -> bool:
        """Whether SDPA's prefill beats the kernel's here: bfloat16 on a CPU with AMX-BF16 tiles, where the kernel's
        own AMX prefill does not take the head."""
        return (dtype == torch.bfloat16 and "amx_bf16" in kernels.cpu_flags().split()
                and not PagedCpuAttention.prefers_amx_prefill(dtype, head_dim))

    @staticmethod
    def prefers_dp_decode(dtype: torch.dtype) -> bool:
        """Whether bfloat16 decode should run on vdpbf16ps: measured level with the float path from DRAM and
        10-15% faster from cache on Zen 4 (AVX512-BF16 without AMX); an AMX Xeon measured an earlier version
        slower, so not there."""
        flags = kernels.cpu_flags().split()
        return dtype == torch.bfloat16 and "avx512_bf16" in flags and "amx_bf16" not in flags

    def __init__(self, sdpa_prefill: bool = False, dp_decode: bool = False, amx_prefill: bool = False) -> None:
        self._op = kernels.paged_attention()
        self.sdpa_prefill = sdpa_prefill
        self.dp_decode = dp_decode
        self.amx_prefill = amx_prefill  # where the kernel cannot (no AMX, another head size), prefill_dp or prefill

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        sdpa = self.sdpa_prefill and bool(meta.prefills)
        self._op(out, q, k, v, kv_cache, meta.slot_mapping, meta.block_tables, meta.query_start,
                 meta.context_lens, 1.0 / math.sqrt(q.shape[-1]), sdpa, self.dp_decode, self.amx_prefill)
        if sdpa:
            for group in meta.prefills:
                rows = group.token_slice
                if group.mask is None and kv_cache.dtype == q.dtype:  # the whole context: its keys are the new ones
                    keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                else:  # (from a narrower cache, as rounded there, so later decodes see the same keys)
                    keys, values = (x.to(q.dtype) for x in _gather_context(kv_cache, group))
                out[rows] = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                    attn_mask=group.mask, is_causal=group.mask is None, enable_gqa=True,
                ).squeeze(0).transpose(0, 1)
        return out


def _gather_context(kv_cache: torch.Tensor, group: PrefillGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill group's keys and values for its whole context, gathered from the pool: [KVH, context, D] each."""
    kv_heads, head_dim = kv_cache.shape[3:]
    keys = kv_cache[0][group.block_ids].view(-1, kv_heads, head_dim)[: group.context_len]
    values = kv_cache[1][group.block_ids].view(-1, kv_heads, head_dim)[: group.context_len]
    return keys.transpose(0, 1), values.transpose(0, 1)  # in the cache's dtype: callers widen as they need


BACKENDS = ("torch", "paged")


def select_attention(
    device: torch.device, dtype: torch.dtype, head_dim: int, choice: str | None = None
) -> AttentionBackend:
    """The backend for a runner: `choice` ('torch' or 'paged'), else $NIMBUS_ATTENTION, else the paged kernel
    on CPU for the dtypes and head sizes it supports (TorchAttention, with one warning, when it cannot be built) and
    TorchAttention on GPU. A forced choice that cannot run raises instead of falling back."""
    choice = choice or os.environ.get("NIMBUS_ATTENTION") or None
    if choice not in (None, *BACKENDS):
        raise ValueError(f"attention backend {choice!r}: choose one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return TorchAttention()
    usable = PagedCpuAttention.supports(device, dtype, head_dim)
    if choice == "paged":
        if not usable:
            raise ValueError(f"the paged attention kernel runs on CPU in float32 or bfloat16 with head_dim a "
                             f"multiple of 16 up to 256, not {device} {dtype} head_dim {head_dim}")
        return _paged(dtype, head_dim)
    if usable and _paged_kernel_loads():
        return _paged(dtype, head_dim)
    return TorchAttention()


def _paged(dtype: torch.dtype, head_dim: int) -> PagedCpuAttention:
    return PagedCpuAttention(PagedCpuAttention.prefers_sdpa_prefill(dtype, head_dim),
                             PagedCpuAttention.prefers_dp_decode(dtype),
                             PagedCpuAttention.prefers_amx_prefill(dtype, head_dim))


@functools.cache
def _paged_kernel_loads() -> bool:
    """Whether the kernel builds and loads here; asked once per process, so the warning shows once."""
    try:
        kernels.paged_attention()
    except Exception as e:  # a missing compiler or ninja must not stop the worker: SDPA still works
        log.warning("paged attention kernel unavailable (%s); using TorchAttention", e)
        return False
    return True
