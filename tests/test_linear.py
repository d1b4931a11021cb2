"""Packed linear weights (worker/linear.py) against F.linear, and where packing applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.linear import Linear, should_pack

# oneDNN packs bfloat16 only on CPUs with AVX-512 (or AVX-NE-CONVERT); float32 on any x86-64 with AVX2
DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not should_pack(torch.device("cpu"), dtype),
                                                 reason=f"no oneDNN packed {dtype} linear on this CPU or torch build"))
    for dtype in (torch.bfloat16, torch.float32)
]


def assert_matches_f_linear(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16:  # F.linear is oneDNN too: the same sums in the same order
        assert torch.equal(got, want)
    else:  # F.linear is MKL, which sums in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear(rows, bias, dtype):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 80, generator=g).to(dtype)
    lin = Linear(w, b, pack=True)
    assert lin.weight.is_mkldnn
    assert_matches_f_linear(lin(x), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_input(dtype):
    # the model hands over views (a slice of the fused qkv output, the rows that sample)
    w = torch.randn(64, 48).to(dtype)
    x = torch.randn(40, 96).to(dtype)[::3, 10:58]
    assert not x.is_contiguous()
    assert_matches_f_linear(Linear(w, None, pack=True)(x), F.linear(x, w))


def test_where_packing_applies():
    assert not should_pack(torch.device("cpu"), torch.float16)
    assert not should_pack(torch.device("cuda"), torch.bfloat16)
    w = torch.randn(8, 4)
    plain = Linear(w, None, pack=False)
    assert plain.weight is w
    x = torch.randn(3, 4)
    assert torch.equal(plain(x), F.linear(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["llama", "llama3-rope-tied", "qwen2"])  # untied, tied head, biases
def test_packed_model_gives_the_same_logits(variant, dtype, tmp_path, monkeypatch):
    from tiny_models import make_tiny_checkpoint

    from worker import model as model_module
    from worker.runner import ModelRunner, SeqChunk

    make_tiny_checkpoint(variant, tmp_path)
    packed = ModelRunner(tmp_path, dtype=dtype, kv_cache_bytes=1 << 22)
    monkeypatch.setattr(model_module, "should_pack", lambda device, dtype: False)
    plain = ModelRunner(tmp_path, dtype=dtype, kv_cache_bytes=1 << 22)
    assert packed.packed_weights and not plain.packed_weights
    layer = packed.model.layers[0]
    assert layer.qkv_weight.numel() == 0 and layer.qkv_proj.weight.is_mkldnn  # the plain copy is freed
    head = packed.model.embed.numel() * packed.model.embed.element_size()
    assert packed.weight_bytes == plain.weight_bytes + (head if packed.model.lm_head is None else 0)

    prompts = [[5, 9, 33, 2, 71, 8, 8, 100], [17, 3, 150, 42]]
    tables = [[0, 1], [2, 3]]
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    assert_matches_f_linear(packed.forward(chunks).to(packed.dtype), plain.forward(chunks).to(packed.dtype))
    steps = [SeqChunk([7], len(p), t) for p, t in zip(prompts, tables)]
    assert_matches_f_linear(packed.forward(steps).to(packed.dtype), plain.forward(steps).to(packed.dtype))
