"""Loads Hugging Face safetensors checkpoints (single file or sharded) into the runtime's fused layout."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from worker.model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Hugging Face name inside a layer -> (our parameter, slot in the fused tensor or None)
_LAYER_MAP: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj.weight": ("qkv_weight", 0),
    "self_attn.k_proj.weight": ("qkv_weight", 1),
    "self_attn.v_proj.weight": ("qkv_weight", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0),
    "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.o_proj.weight": ("o_weight", None),
    "self_attn.o_proj.bias": ("o_bias", None),
    "mlp.gate_proj.weight": ("gate_up_weight", 0),
    "mlp.up_proj.weight": ("gate_up_weight", 1),
    "mlp.gate_proj.bias": ("gate_up_bias", 0),
    "mlp.up_proj.bias": ("gate_up_bias", 1),
    "mlp.down_proj.weight": ("down_weight", None),
    "mlp.down_proj.bias": ("down_bias", None),
    "input_layernorm.weight": ("input_norm.weight", None),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", None),
}
# names a checkpoint may carry that the runtime derives itself
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (only safetensors checkpoints are loaded)")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def _fused_offsets(model: CausalLM, param: str) -> list[int]:
    c = model.config
    if param.startswith("qkv"):
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, c.intermediate_size, 2 * c.intermediate_size]


def load_weights(model: CausalLM, folder: str | Path) -> None:
    """Copy every checkpoint tensor into its place; fail if anything is missing, unknown or misshapen."""
    folder = Path(folder)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in iter_tensors(folder):
        if _IGNORED.search(name):
            continue
        target, rows = _target(model, name)
        if target is None or (target == "lm_head" and model.lm_head is None):
            if name == "lm_head.weight":
                continue  # some tied checkpoints store the head anyway
            raise ValueError(f"unexpected tensor {name!r} in {folder}")
        dest = params[target]
        view = dest if rows is None else dest[rows[0] : rows[1]]
        if view.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(view.shape)}")
        view.copy_(tensor.to(dest.dtype))
        filled.add(f"{target}:{rows}")
    expected = _expected_fills(model, params)
    missing = expected - filled
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _target(model: CausalLM, name: str) -> tuple[str | None, tuple[int, int] | None]:
    if name == "model.embed_tokens.weight":
        return "embed", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "lm_head", None
    m = _LAYER.match(name)
    if not m or m.group(2) not in _LAYER_MAP:
        return None, None
    param, slot = _LAYER_MAP[m.group(2)]
    full = f"layers.{m.group(1)}.{param}"
    if slot is None:
        return full, None
    offsets = _fused_offsets(model, param)
    return full, (offsets[slot], offsets[slot + 1])


def _expected_fills(model: CausalLM, params: dict[str, torch.nn.Parameter]) -> set[str]:
    out = set()
    for name in params:
        base = name.rsplit(".", 1)[-1]
        if base in ("qkv_weight", "qkv_bias", "gate_up_weight", "gate_up_bias"):
            offs = _fused_offsets(model, base)
            out.update(f"{name}:{(offs[i], offs[i + 1])}" for i in range(len(offs) - 1))
        else:
            out.add(f"{name}:None")
    return out
