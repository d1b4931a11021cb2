"""The model runner: loads a checkpoint, owns the paged KV pool, and runs one forward pass per step."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.attention import AttentionBackend, AttentionMetadata, select_attention
from worker.config import ModelConfig
from worker.loader import load_weights
from worker.model import CausalLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 2 * 1024**3
# GPU: room kept free for activations and the allocator's slack
GPU_ACTIVATION_RESERVE = 1 * 1024**3


def parse_size(text: str | int) -> int:
    """'2GiB', '512MB', '1.5G' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 2GiB or 512MB)")
    scale = 1024 if m.group(3).lower().startswith("i") or not m.group(3) else 1000
    return int(float(m.group(1)) * scale ** "_KMGT".index(m.group(2).upper() or "_"))


def kv_dtype(choice: str | torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the model's ('auto' or None), or bfloat16 under a float32 model (like vLLM's
    kv_cache_dtype: twice the sequences in the same memory; the default model's greedy output parts from float32's
    only where two tokens were near-tied, docs/benchmarks.md)."""
    if choice is None or choice == "auto":
        return dtype
    kv = DTYPES.get(choice) if isinstance(choice, str) else choice
    if kv != dtype and not (dtype == torch.float32 and kv == torch.bfloat16):
        raise ValueError(f"kv_cache_dtype {choice!r} with a {str(dtype).removeprefix('torch.')} model: "
                         f"use 'auto' (the model's dtype) or, for a float32 model, 'bfloat16'")
    return kv


def default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # this CPU has no fast bfloat16 matrix multiply; GPUs do
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """One sequence's share of a step: the tokens computed now, from position `start`, in its blocks."""

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]


class ModelRunner:
    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        attention: AttentionBackend | None = None,
        kv_cache_dtype: str | torch.dtype | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.config = ModelConfig.from_folder(self.folder)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(self.device))
        self.kv_dtype = kv_dtype(kv_cache_dtype, self.dtype)
        self.block_size = block_size
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.model = CausalLM(self.config, self.max_model_len, self.dtype, self.device)
        load_weights(self.model, self.folder)
        self.packed_weights = self.model.pack_weights()
        self.attention = attention or select_attention(self.device, self.dtype, self.config.head_dim)
        self.num_blocks = self._num_blocks(kv_cache_bytes, gpu_memory_utilization)
        c = self.config
        shape = (c.num_layers, 2, self.num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_layers = list(self.kv_cache.unbind(0))
        log.info("loaded %s on %s (%s, weights %s): weights %.1f MiB, %d KV blocks of %d tokens (%.1f MiB, %s)",
                 self.folder.name, self.device, self.dtype, self.model.weight_layouts(),
                 self.weight_bytes / 2**20, self.num_blocks, block_size,
                 self.num_blocks * self.kv_bytes_per_block / 2**20, self.kv_dtype)

    @property
    def kv_bytes_per_block(self) -> int:
        c = self.config
        elem = self.kv_dtype.itemsize
        return c.num_layers * 2 * self.block_size * c.num_kv_heads * c.head_dim * elem

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    def _num_blocks(self, kv_cache_bytes: int | None, utilization: float) -> int:
        if kv_cache_bytes is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            kv_cache_bytes = int(total * utilization) - (total - free) - GPU_ACTIVATION_RESERVE
        budget = kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_CPU_KV_BYTES
        blocks = budget // self.kv_bytes_per_block
        min_blocks = -(-self.max_model_len // self.block_size)
        if blocks < min_blocks:
            raise ValueError(
                f"KV cache of {budget} bytes holds {blocks} blocks; one sequence of max length "
                f"{self.max_model_len} needs {min_blocks}: give more memory or a lower max_model_len"
            )
        return int(blocks)

    def forward(self, chunks: Sequence[SeqChunk], logits_rows: Sequence[int] | None = None,
                float_logits: bool = True) -> torch.Tensor:
        """Runs one step; returns float32 logits for the last token of each chunk (or of `logits_rows`), or with
        `float_logits=False` the LM head's own (model dtype: the sampler widens them only when it needs to).

        `logits_rows` indexes chunks; a chunk's logits are those of its last token."""
        ids: list[int] = []
        positions: list[int] = []
        last_rows: list[int] = []
        for chunk in chunks:
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + len(chunk.token_ids)))
            last_rows.append(len(ids) - 1)
        rows = last_rows if logits_rows is None else [last_rows[i] for i in logits_rows]
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks],
            [c.start for c in chunks],
            [list(c.block_ids) for c in chunks],
            self.block_size,
            self.device,
        )
        dev = self.device
        return self.model(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_layers,
            meta,
            self.attention,
            torch.tensor(rows, dtype=torch.int64, device=dev),
            float_logits,
        )
