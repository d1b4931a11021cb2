"""Tiny random-weight Hugging Face checkpoints of each supported architecture, made with transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=256,
    initializer_range=0.15,
)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            rope_theta=500000.0,
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
}


def make_tiny_checkpoint(variant: str, folder: Path, sharded: bool = False, seed: int = 0):
    """Writes a random-weight checkpoint folder; returns the transformers model (float32, eval, eager)."""
    import transformers

    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize_extras(model)
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "10GB")
    return model


def randomize_extras(model) -> None:
    """Random norm weights and biases (transformers initialises them to constants, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))


SMOLLM2_VOCAB = 49152


def make_tiny_smollm2(folder: Path) -> Path:
    """A random-weight 2-layer Llama that loads in a blink, with SmolLM2's real tokenizer and chat template."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**{**TINY, "vocab_size": SMOLLM2_VOCAB, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    randomize_extras(model)
    model.save_pretrained(folder)
    from daemon.models import pull

    source = pull()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder
