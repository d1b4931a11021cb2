"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) written for a flattened batch over a paged KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention import AttentionBackend, AttentionMetadata
from worker.config import ModelConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """cos/sin tables for every position up to the maximum length, computed once in float32."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
        freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim / 2] for the step's positions; looked up once and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, head_dim]; rotate-half (GPT-NeoX) layout, as Hugging Face Llama checkpoints use
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 like the reference implementation, then scale in the model dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # fused projections: one matrix multiply for q, k, v and one for gate, up
        self.qkv_weight = _param((self.q_size + 2 * self.kv_size, c.hidden_size), dtype, device)
        self.qkv_bias = _param((self.q_size + 2 * self.kv_size,), dtype, device) if c.qkv_bias else None
        self.o_weight = _param((c.hidden_size, self.q_size), dtype, device)
        self.o_bias = _param((c.hidden_size,), dtype, device) if c.o_bias else None
        self.gate_up_weight = _param((2 * c.intermediate_size, c.hidden_size), dtype, device)
        self.gate_up_bias = _param((2 * c.intermediate_size,), dtype, device) if c.mlp_bias else None
        self.down_weight = _param((c.hidden_size, c.intermediate_size), dtype, device)
        self.down_bias = _param((c.hidden_size,), dtype, device) if c.mlp_bias else None
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = F.linear(self.input_norm(hidden), self.qkv_weight, self.qkv_bias)
        qk_size = self.q_size + self.kv_size
        # q and k heads side by side take one rotary pass (fewer small ops, which dominate at small batch)
        qk = apply_rotary(qkv[:, :qk_size].view(t, -1, self.head_dim), *rope)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        attn = attention.forward(q, k, v, kv_cache, meta).reshape(t, self.q_size)
        hidden = hidden + F.linear(attn, self.o_weight, self.o_bias)
        gate, up = F.linear(self.post_attention_norm(hidden), self.gate_up_weight, self.gate_up_bias).chunk(2, -1)
        return hidden + F.linear(F.silu(gate) * up, self.down_weight, self.down_bias)


class CausalLM(nn.Module):
    """The whole model: embeddings, decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.embed = _param((config.vocab_size, config.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = None if config.tie_word_embeddings else _param(self.embed.shape, dtype, device)
        self.rotary = Rotary(config, max_len, dtype, device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        attention: AttentionBackend,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Returns float32 logits [len(logits_indices), vocab] for the chosen rows of the flattened batch."""
        hidden = F.embedding(input_ids, self.embed)
        rope = self.rotary.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, rope, kv_cache, meta, attention)
        # the LM head is the largest matrix: apply it only where a token is sampled
        hidden = self.norm(hidden[logits_indices])
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()
