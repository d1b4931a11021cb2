"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) written for a flattened batch over a paged KV cache.

The elementwise steps (norms, residual adds, rotary, SiLU) go through an ElementwiseOps: TorchOps is the reference,
FusedCpuOps (worker/csrc/fused_ops.cpp) does each in one pass on CPU; the residual add rides in the next norm.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker import kernels
from worker.attention import AttentionBackend, AttentionMetadata
from worker.config import ModelConfig, RopeConfig
from worker.linear import Linear, SiluGate, should_fuse_silu_gate, should_pack, should_use_panels

log = logging.getLogger(__name__)


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
        """cos and sin [T, head_dim / 2] for the step's positions; looked up once and shared by every layer."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, head_dim], cos/sin [T, head_dim / 2]; rotate-half (GPT-NeoX) layout, as Hugging Face Llama
    # checkpoints use
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in float32 like the reference implementation, then scale in the model dtype
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Holds a norm's weight and eps; the layers apply it through their ElementwiseOps."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ElementwiseOps(Protocol):
    """The decoder layer's elementwise steps. Results may be written over an input the docstring names."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual); may overwrite x and residual with them."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [T, 2I] = (gate, up)."""
        ...

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [T, heads, head_dim] (cos/sin [T, head_dim / 2]); may overwrite x."""
        ...


class TorchOps:
    """The reference: plain torch ops, on any device and dtype."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)


class FusedCpuOps:
    """The C++ ops of worker/csrc/fused_ops.cpp: one pass over each row per step, in place where the
    protocol allows; CPU, float32 and bfloat16. Same roundings as TorchOps, float32 accumulation."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self) -> None:
        self._ops = kernels.fused_ops()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self._ops.rms_norm(out, x, weight, eps)
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ops.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        self._ops.silu_and_mul(out, gate_up)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self._ops.rotary(x, cos, sin)
        return x


def select_ops(device: torch.device, dtype: torch.dtype) -> ElementwiseOps:
    """FusedCpuOps on CPU in float32 and bfloat16 where the library builds (one warning where it does not),
    else TorchOps."""
    if device.type == "cpu" and dtype in FusedCpuOps.DTYPES and _fused_ops_load():
        return FusedCpuOps()
    return TorchOps()


@functools.cache
def _fused_ops_load() -> bool:
    """Whether the fused ops build and load here; asked once per process, so the warning shows once."""
    try:
        kernels.fused_ops()
    except Exception as e:  # a missing compiler or ninja must not stop the worker: the torch ops still work
        log.warning("fused elementwise ops unavailable (%s); using torch ops", e)
        return False
    return True


# a decoder layer's weight matrices: <name>_weight and <name>_bias parameters, applied by <name>_proj
PROJECTIONS = ("qkv", "o", "gate_up", "down")


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
        # the projections as callables: F.linear on the parameters until CausalLM.pack_weights swaps packed ones in
        for name in PROJECTIONS:
            setattr(self, f"{name}_proj", Linear(getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"), False))

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention: AttentionBackend,
        ops: ElementwiseOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added): the next norm adds them
        in the same pass (the first layer gets residual None, the embeddings as hidden)."""
        t = hidden.shape[0]
        if residual is None:
            x, residual = ops.rms_norm(hidden, self.input_norm.weight, self.input_norm.eps), hidden
        else:
            x, residual = ops.add_rms_norm(hidden, residual, self.input_norm.weight, self.input_norm.eps)
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        # q and k heads side by side take one rotary pass (fewer small ops, which dominate at small batch)
        qk = ops.rotary(qkv[:, :qk_size].view(t, -1, self.head_dim), *rope)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        attn = attention.forward(q, k, v, kv_cache, meta).reshape(t, self.q_size)
        norm = self.post_attention_norm
        x, residual = ops.add_rms_norm(self.o_proj(attn), residual, norm.weight, norm.eps)
        mlp = self.gate_up_proj(x)  # silu(gate) * up already where the projections fuse them (SiluGate)
        return self.down_proj(mlp if self.gate_up_proj.activated else ops.silu_and_mul(mlp)), residual


class CausalLM(nn.Module):
    """The whole model: embeddings, decoder layers, final norm and LM head (tied or not)."""

    def __init__(
        self,
        config: ModelConfig,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: ElementwiseOps | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.ops = ops or select_ops(device, dtype)
        self.embed = _param((config.vocab_size, config.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = None if config.tie_word_embeddings else _param(self.embed.shape, dtype, device)
        self.head_proj = Linear(self.embed if self.lm_head is None else self.lm_head, None, False)
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
        float_logits: bool = True,
    ) -> torch.Tensor:
        """Returns logits [len(logits_indices), vocab] for the chosen rows of the flattened batch: float32, or
        with `float_logits=False` as the LM head computed them (the model dtype)."""
        hidden = F.embedding(input_ids, self.embed)
        rope = self.rotary.tables(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta, attention, self.ops)
        # the LM head is the largest matrix: apply it only where a token is sampled
        assert residual is not None, "a model has at least one layer"
        hidden, _ = self.ops.add_rms_norm(hidden[logits_indices], residual[logits_indices], self.norm.weight,
                                          self.norm.eps)
        logits = self.head_proj(hidden)
        return logits.float() if float_logits else logits

    def pack_weights(self) -> bool:
        """Repacks every projection and the LM head for the CPU kernels where that pays (worker/linear.py: oneDNN in
        float32 and bfloat16; without AMX also the panel kernel, in float32 and in bfloat16 on AVX512-BF16; on AMX
        the MLP's gate/up as a fused SiLU gate in bfloat16) and frees the plain copies of the projections; True if
        it did. Call once, after the weights are loaded.

        A tied LM head keeps its plain matrix too, as the embedding table: packing it costs one more copy of the
        vocabulary matrix per layout (counted by weight_bytes) and buys the largest multiply of a decode step its
        speed."""
        device, dtype = self.embed.device, self.embed.dtype
        pack, panels = should_pack(device, dtype), should_use_panels(device, dtype)
        if not (pack or panels):
            return False
        fuse_gate = should_fuse_silu_gate(device, dtype)
        for layer in self.layers:
            for name in PROJECTIONS:
                weight, bias = getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_bias")
                weight, bias = weight.detach(), None if bias is None else bias.detach()
                setattr(layer, f"{name}_proj", SiluGate(weight, bias) if name == "gate_up" and fuse_gate
                        else Linear(weight, bias, pack, panels))
                getattr(layer, f"{name}_weight").data = weight.new_empty(0)  # the packed copies replace it
        head = self.embed if self.lm_head is None else self.lm_head
        self.head_proj = Linear(head.detach(), None, pack, panels)
        if self.lm_head is not None:
            self.lm_head.data = self.lm_head.data.new_empty(0)
        return True

    def weight_layouts(self) -> str:
        """Which packed layouts the projections use: 'oneDNN', 'oneDNN + panels', 'panels' or 'plain'."""
        lin = self.head_proj
        names = [n for n, on in (("oneDNN", lin.packed), ("panels", lin.panels is not None)) if on]
        return " + ".join(names) or "plain"

    def weight_bytes(self) -> int:
        """Bytes held by the weights: the parameters plus any packed copies."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        projections = [getattr(layer, f"{n}_proj") for layer in self.layers for n in PROJECTIONS]
        return total + sum(lin.extra_bytes() for lin in [*projections, self.head_proj])
