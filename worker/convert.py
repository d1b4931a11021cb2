"""Convert a GGUF checkpoint into a float32 Hugging Face folder (safetensors + tokenizer) that workers load.

Run as `python -m worker.convert --gguf FILE --out DIR`; `nimbus pull` runs it in a subprocess so the daemon
never imports torch. The conversion checks its own result and exits non-zero rather than leave a bad folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# Stop ids beyond the GGUF's EOS. SmolLM2's GGUF says eos = pad = <|im_end|> (2) and gives <|endoftext|> (0)
# only as unk, but 0 is the pretraining end-of-document token: an instruct model that emits it has finished,
# and what would follow is an unrelated document. llama.cpp stops on it too (it treats that text as
# end-of-generation), so stopping on it keeps our outputs comparable with that peer.
_EXTRA_STOP_TOKENS = ("<|endoftext|>",)
_CHECK_PROMPT = "The capital of France is"


def _log(msg: str) -> None:
    print(f"convert: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _gguf_gate_open() -> Iterator[None]:
    """transformers 5 refuses GGUF loads unless accelerate is installed, yet its CPU path never calls it."""
    import transformers.modeling_utils as mu

    if importlib.util.find_spec("accelerate") is not None or not hasattr(mu, "is_accelerate_available"):
        yield
        return
    saved = mu.is_accelerate_available
    mu.is_accelerate_available = lambda: True
    try:
        yield
    finally:
        mu.is_accelerate_available = saved


def _detach_quantizer(model: torch.nn.Module) -> None:
    # The weights are already dequantized; the attached GGUF quantizer only blocks save_pretrained.
    for name, p in model.named_parameters():
        if (
            p.dtype != torch.float32
            or p.layout != torch.strided
            or p.is_meta
            or type(p.data) is not torch.Tensor
        ):
            raise SystemExit(
                f"convert: parameter {name} is not a dense float32 tensor ({p.dtype}, {type(p.data)})"
            )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _check_dequantized(model: torch.nn.Module, gguf_path: Path) -> None:
    """Cross-check transformers' dequantization of the embedding against the gguf package's own."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(gguf_path).tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(
        dequantize(tensor.data, tensor.tensor_type).reshape(model.config.vocab_size, -1).copy()
    )
    if not torch.equal(ref.float(), model.get_input_embeddings().weight.detach()):
        raise SystemExit("convert: embedding differs from the gguf package's dequantization")


def _rewrite_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fix_files(out: Path, model: torch.nn.Module, tokenizer) -> list[int]:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    # Both dtype spellings and a top-level rope_theta, so readers before and after transformers 5 agree.
    config.update(
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
        dtype="float32",
        tie_word_embeddings=True,
        rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
    )
    _rewrite_json(out / "config.json", config)
    for key in ("max_position_embeddings", "rope_theta", "rms_norm_eps"):
        if config.get(key) is None:
            raise SystemExit(f"convert: config.json lacks {key}")

    # transformers 5 may move the template to chat_template.jinja; the daemon reads it from tokenizer_config.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    jinja = out / "chat_template.jinja"
    template = tok_cfg.get("chat_template") or (
        jinja.read_text() if jinja.exists() else tokenizer.chat_template
    )
    if not isinstance(template, str) or not template:
        raise SystemExit("convert: the GGUF carries no chat template")
    tok_cfg["chat_template"] = template
    tok_cfg["model_max_length"] = config["max_position_embeddings"]
    for junk in ("is_local", "local_files_only"):  # load-time flags transformers 5 saves along
        tok_cfg.pop(junk, None)
    if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name older readers know
    _rewrite_json(out / "tokenizer_config.json", tok_cfg)

    vocab = tokenizer.get_vocab()
    eos = list(dict.fromkeys([tokenizer.eos_token_id] + [vocab[t] for t in _EXTRA_STOP_TOKENS if t in vocab]))
    gen = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }
    _rewrite_json(out / "generation_config.json", gen)
    return eos


def _verify(out: Path, model: torch.nn.Module, tokenizer) -> None:
    """The saved folder must load with plain from_pretrained and give bit-identical logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(out / "model.safetensors", "pt") as f:
        if "model.embed_tokens.weight" not in set(f.keys()):
            raise SystemExit("convert: model.safetensors lacks model.embed_tokens.weight")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    if reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr():
        raise SystemExit("convert: lm_head is not tied to embed_tokens after reload")
    ids = AutoTokenizer.from_pretrained(out)(_CHECK_PROMPT, return_tensors="pt").input_ids
    if ids.tolist() != tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids.tolist():
        raise SystemExit("convert: saved tokenizer encodes differently from the GGUF tokenizer")
    with torch.inference_mode():
        if not torch.equal(model(ids).logits, reloaded(ids).logits):
            raise SystemExit("convert: logits of the saved folder differ from the GGUF-loaded model")


def convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.monotonic()
    with _gguf_gate_open():
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _log(f"loaded {gguf_path.name} in {time.monotonic() - start:.1f} s")
    _detach_quantizer(model)
    _check_dequantized(model, gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100GB")  # one model.safetensors, tied lm_head left out
    tokenizer.save_pretrained(out)
    eos = _fix_files(out, model, tokenizer)
    _verify(out, model, tokenizer)
    for path in out.iterdir():
        path.chmod(0o644)  # the safetensors writer leaves 0600; a daemon under another user must read it
    params = sum(p.numel() for p in model.parameters())
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    _log(f"{params / 1e6:.1f} M parameters, eos ids {eos}, {time.monotonic() - start:.1f} s; wrote {files}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, type=Path, help="the GGUF file to convert")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    args = parser.parse_args(argv)
    convert(args.gguf.resolve(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
