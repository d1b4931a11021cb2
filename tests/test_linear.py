"""Packed linear weights (worker/linear.py) against F.linear, the fused bfloat16 SiLU gate against gate_up then SiLU,
and where each applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker import kernels
from worker.linear import PANEL_ROWS, Linear, SiluGate, should_pack, should_use_panels
from worker.model import TorchOps

# oneDNN packs bfloat16 only on CPUs with AVX-512 (or AVX-NE-CONVERT); float32 on any x86-64 with AVX2
DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not should_pack(torch.device("cpu"), dtype),
                                                 reason=f"no oneDNN packed {dtype} linear on this CPU or torch build"))
    for dtype in (torch.bfloat16, torch.float32)
]
needs_panels = pytest.mark.skipif(not should_use_panels(torch.device("cpu"), torch.float32),
                                  reason="the float32 panel kernel runs on CPUs without AMX where it builds")
PANEL_REASONS = {torch.float32: "the float32 panel kernel runs on CPUs without AMX where it builds",
                 torch.bfloat16: "the bfloat16 panel kernel runs on CPUs with AVX512-BF16 and without AMX"}
PANEL_DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not should_use_panels(torch.device("cpu"), dtype),
                                                 reason=PANEL_REASONS[dtype]))
    for dtype in (torch.float32, torch.bfloat16)
]


def assert_matches_f_linear(got: torch.Tensor, want: torch.Tensor, panels: bool = False) -> None:
    if got.dtype == torch.bfloat16 and not panels:  # F.linear is oneDNN too: the same sums in the same order
        assert torch.equal(got, want)
    elif got.dtype == torch.bfloat16:  # float32 sums in another order, then one rounding: at most a bfloat16 step
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
    else:  # F.linear is MKL, which sums in another order: a few float32 roundings of sums of up to ~600 terms of ~1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


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


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 9, 64, PANEL_ROWS + 44])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(100, 70), (48, 600), (130, 33)],
                         ids=["partial-panel", "two-depth-passes", "odd-depth"])
def test_panels_equal_f_linear(rows, bias, shape, dtype):
    # widths that do not fill the last panel, depths beyond one pass of the float32 kernel and an odd one (bfloat16
    # pairs its weights along k), row counts around the blocks of either kernel
    n, k = shape
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, k, generator=g).to(dtype)
    lin = Linear(w, b, pack=False, panels=True)
    assert lin.panels is not None and lin.panels.dtype == dtype
    depth = k if dtype == torch.float32 else (k + 1) // 2  # float32 panels [P, K, NR], bfloat16 [P, K / 2, NR, 2]
    assert lin.panels.shape[1] == depth and lin.panels.shape[0] == -(-n // lin.panels.shape[2])
    assert_matches_f_linear(lin(x), F.linear(x, w, b), panels=True)
    assert_matches_f_linear(lin(x[::2]), F.linear(x[::2], w, b), panels=True)  # rows apart in memory
    if dtype == torch.bfloat16 and rows:  # against the exact sums: one rounding of float32 sums of exact products
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert ((lin(x).double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4 * k).all()


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("shape", [(24, 600), (100, 70)], ids=["one-panel", "several-panels"])
def test_panels_on_one_thread(shape, dtype):
    # the kernel's loop runs inline, not in an OpenMP region, with one thread (a worker sharing a small host) or
    # one panel: the same sums as on two threads
    n, k = shape
    g = torch.Generator().manual_seed(n)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(64, k, generator=g)
    w, b, x = w.to(dtype), b.to(dtype), x.to(dtype)
    lin = Linear(w, b, pack=False, panels=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = lin(x)
    finally:
        torch.set_num_threads(before)
    assert_matches_f_linear(one, F.linear(x, w, b), panels=True)
    assert torch.equal(one, lin(x))


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
def test_panels_beside_onednn_split_by_rows(monkeypatch, dtype):
    w, b = torch.randn(72, 64).to(dtype), torch.randn(72).to(dtype)
    lin = Linear(w, b, pack=True, panels=True)
    calls = []
    monkeypatch.setattr(lin, "_panel_op", lambda *a: calls.append(a[1].shape[0]))
    small, large = torch.randn(PANEL_ROWS, 64).to(dtype), torch.randn(PANEL_ROWS + 1, 64).to(dtype)
    lin(small)
    assert calls == [PANEL_ROWS]  # decode-sized steps go to the panel kernel
    assert_matches_f_linear(lin(large), F.linear(large, w, b))
    assert calls == [PANEL_ROWS]  # prefill-sized ones to oneDNN


@needs_panels
def test_panel_kernel_rejects_mismatched_shapes():
    ops = kernels.linear_ops()
    panels = ops.pack_linear(torch.randn(30, 16))
    out = torch.empty(4, 30)
    with pytest.raises(RuntimeError, match="columns"):
        ops.linear(out, torch.randn(4, 17), panels, 30, None)
    with pytest.raises(RuntimeError, match="panels"):
        ops.linear(torch.empty(4, 60), torch.randn(4, 16), panels, 60, None)
    with pytest.raises(RuntimeError, match="float32"):
        ops.pack_linear(torch.randn(30, 16).to(torch.float16))
    if "avx512_bf16" not in kernels.cpu_flags().split():  # the kernel is float32 only there
        with pytest.raises(RuntimeError, match="float32"):
            ops.pack_linear(torch.randn(30, 16).to(torch.bfloat16))


@pytest.mark.skipif(not should_use_panels(torch.device("cpu"), torch.bfloat16), reason=PANEL_REASONS[torch.bfloat16])
def test_bfloat16_panel_kernel_rejects_mismatched_shapes():
    ops = kernels.linear_ops()
    bf16 = torch.bfloat16
    panels = ops.pack_linear(torch.randn(30, 16).to(bf16))
    out = torch.empty(4, 30, dtype=bf16)
    with pytest.raises(RuntimeError, match="columns"):
        ops.linear(out, torch.randn(4, 18).to(bf16), panels, 30, None)
    with pytest.raises(RuntimeError, match="panels"):
        ops.linear(torch.empty(4, 200, dtype=bf16), torch.randn(4, 16).to(bf16), panels, 200, None)
    with pytest.raises(RuntimeError, match="bfloat16 panels"):  # float32 panels handed to a bfloat16 step
        ops.linear(out, torch.randn(4, 16).to(bf16), ops.pack_linear(torch.randn(30, 16)), 30, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear(out, torch.randn(4, 16).to(bf16), panels, 30, torch.randn(30))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.pack_linear(torch.randn(30, 16).to(torch.float16))


def test_where_packing_applies():
    assert not should_pack(torch.device("cpu"), torch.float16)
    assert not should_pack(torch.device("cuda"), torch.bfloat16)
    flags = kernels.cpu_flags().split()
    if "avx512_bf16" not in flags or "amx_bf16" in flags:
        assert not should_use_panels(torch.device("cpu"), torch.bfloat16)
    assert not should_use_panels(torch.device("cpu"), torch.float16)
    assert not should_use_panels(torch.device("cuda"), torch.float32)
    assert not should_use_panels(torch.device("cuda"), torch.bfloat16)
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
    # bit for bit needs the MLP as gate_up then the SiLU op (the fused gate skips a rounding: the test below)
    monkeypatch.setattr(model_module, "should_fuse_silu_gate", lambda device, dtype: False)
    packed = ModelRunner(tmp_path, dtype=dtype, kv_cache_bytes=1 << 22)
    monkeypatch.setattr(model_module, "should_pack", lambda device, dtype: False)
    monkeypatch.setattr(model_module, "should_use_panels", lambda device, dtype: False)
    plain = ModelRunner(tmp_path, dtype=dtype, kv_cache_bytes=1 << 22)
    assert packed.packed_weights and not plain.packed_weights
    layer = packed.model.layers[0]
    assert layer.qkv_weight.numel() == 0 and layer.qkv_proj.weight.is_mkldnn  # the plain copy is freed
    assert plain.model.weight_layouts() == "plain"
    panels = should_use_panels(torch.device("cpu"), dtype)
    assert packed.model.weight_layouts() == ("oneDNN + panels" if panels else "oneDNN")
    # oneDNN's layout holds one copy of every matrix, as the plain model does, and a tied head keeps its table as
    # well; panels hold one more copy, each matrix padded to whole panels of the kernel's width
    matrices = [getattr(lyr, f"{n}_weight") for lyr in plain.model.layers for n in model_module.PROJECTIONS]
    matrices.append(plain.model.embed if plain.model.lm_head is None else plain.model.lm_head)
    tied = packed.model.embed.numel() * packed.model.embed.element_size() if packed.model.lm_head is None else 0
    width = packed.model.head_proj.panels.shape[2] if panels else 0
    panel_bytes = sum(-(-m.shape[0] // width) * width * m.shape[1] * m.element_size() for m in matrices) if panels else 0
    assert packed.weight_bytes == plain.weight_bytes + tied + panel_bytes

    prompts = [[5, 9, 33, 2, 71, 8, 8, 100], [17, 3, 150, 42]]
    tables = [[0, 1], [2, 3]]
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    assert_matches_f_linear(packed.forward(chunks).to(packed.dtype), plain.forward(chunks).to(packed.dtype), panels)
    steps = [SeqChunk([7], len(p), t) for p, t in zip(prompts, tables)]
    assert_matches_f_linear(packed.forward(steps).to(packed.dtype), plain.forward(steps).to(packed.dtype), panels)


AMX = "amx_bf16" in kernels.cpu_flags().split()


@pytest.mark.skipif(not AMX, reason="the fused SiLU gate is used (and measured) on CPUs with AMX-BF16")
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_gate_matches_gate_up_then_silu(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * 96, 80, generator=g) / 4).to(torch.bfloat16)
    b = torch.randn(2 * 96, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 80, generator=g).to(torch.bfloat16)
    fused = SiluGate(w, b)
    assert fused.activated and not Linear(w, b, pack=True).activated
    got = fused(x)
    assert got.shape == (rows, 96) and got.dtype == torch.bfloat16
    want = TorchOps().silu_and_mul(F.linear(x, w, b))  # gate_up, then SiLU and the product, each rounded
    gate, up = F.linear(x.float(), w.float(), None if b is None else b.float()).chunk(2, dim=-1)
    exact = F.silu(gate) * up
    # within two bfloat16 steps of the rounded path, and no further from the float32 result than it is
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2e-2)
    assert (got.float() - exact).abs().mean() <= (want.float() - exact).abs().mean() * 1.05


@pytest.mark.skipif(not AMX, reason="the fused SiLU gate is used (and measured) on CPUs with AMX-BF16")
def test_bfloat16_model_with_the_fused_gate_stays_close(tmp_path, monkeypatch):
    from tiny_models import make_tiny_checkpoint

    from worker import model as model_module
    from worker.runner import ModelRunner, SeqChunk

    make_tiny_checkpoint("qwen2", tmp_path)  # biases on q/k/v only; the gate takes the bias path in the op test
    fused = ModelRunner(tmp_path, dtype=torch.bfloat16, kv_cache_bytes=1 << 22)
    assert isinstance(fused.model.layers[0].gate_up_proj, SiluGate)
    monkeypatch.setattr(model_module, "should_fuse_silu_gate", lambda device, dtype: False)
    unfused = ModelRunner(tmp_path, dtype=torch.bfloat16, kv_cache_bytes=1 << 22)
    assert isinstance(unfused.model.layers[0].gate_up_proj, Linear)
    assert fused.weight_bytes == unfused.weight_bytes
    chunks = [SeqChunk([5, 9, 33, 2, 71, 8, 8, 100], 0, [0, 1]), SeqChunk([17, 3, 150, 42], 0, [2, 3])]
    a, b = fused.forward(chunks), unfused.forward(chunks)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item(), "the fused gate moved the logits"
    assert torch.equal(a.argmax(-1), b.argmax(-1))
