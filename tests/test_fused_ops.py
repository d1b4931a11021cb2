"""The fused C++ elementwise ops (worker/csrc/fused_ops.cpp) against the torch reference ops, and their choice."""

from __future__ import annotations

import pytest
import torch

from worker.model import FusedCpuOps, TorchOps, select_ops

DTYPES = [torch.float32, torch.bfloat16]
# the model's hidden and intermediate sizes, and odd ones that leave a partial vector at the end of a row
SIZES = [576, 1536, 16, 5, 37, 100]
ROWS = [1, 3, 64, 301]  # a decode row, a few, a decode batch, enough for several parallel chunks


@pytest.fixture(scope="module")
def fused() -> FusedCpuOps:
    return FusedCpuOps()


def randn(*shape: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: summation order only. bfloat16: where the float32 values differ by that, a rounding may land
    one ulp (2^-8 relative) apart."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-2)
        # and almost all of them are bit for bit the same
        assert (got != expected).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("size", SIZES)
def test_rms_norm(fused, dtype, rows, size):
    x = randn(rows, size, dtype=dtype, scale=3.0)
    weight = randn(size, dtype=dtype, seed=1)
    assert_close(fused.rms_norm(x, weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("size", SIZES)
def test_add_rms_norm_updates_residual_in_place(fused, dtype, rows, size):
    x = randn(rows, size, dtype=dtype)
    residual = randn(rows, size, dtype=dtype, seed=2, scale=10.0)
    weight = randn(size, dtype=dtype, seed=1)
    expected, expected_residual = TorchOps().add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    got, got_residual = fused.add_rms_norm(x, residual, weight, 1e-6)
    assert got.data_ptr() == x.data_ptr() and got_residual.data_ptr() == residual.data_ptr()
    # the sum is one rounding of exact operands in both: equal, also in bfloat16
    assert torch.equal(got_residual, expected_residual)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("size", SIZES)
def test_silu_and_mul(fused, dtype, rows, size):
    gate_up = randn(rows, 2 * size, dtype=dtype, scale=4.0)
    gate_up[0, 0] = -200.0  # far out on both tails, where exp leaves the float range
    gate_up[-1, size - 1] = 200.0
    assert_close(fused.silu_and_mul(gate_up), TorchOps().silu_and_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 24, 72])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rotary_in_place(fused, dtype, head_dim, tokens):
    heads = 5
    angles = randn(tokens, head_dim // 2, dtype=torch.float32, seed=3, scale=10.0)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x = randn(tokens, heads, head_dim, dtype=dtype)
    expected = TorchOps().rotary(x, cos, sin)
    got = fused.rotary(x.clone(), cos, sin)
    assert_close(got, expected, dtype)


def test_strided_rows(fused):
    # the model hands over views into its fused projections: q and k heads of qkv, a wider row's prefix
    qkv = randn(9, (4 + 2 * 2) * 64, dtype=torch.float32)
    qk = qkv[:, : 6 * 64].view(9, 6, 64)
    assert not qk.is_contiguous()
    angles = randn(9, 32, dtype=torch.float32, seed=3)
    expected = TorchOps().rotary(qk, angles.cos(), angles.sin())
    v_before = qkv[:, 6 * 64 :].clone()
    fused.rotary(qk, angles.cos(), angles.sin())
    assert_close(qk, expected, torch.float32)
    assert torch.equal(qkv[:, 6 * 64 :], v_before), "rotary wrote past the q and k heads"

    wide = randn(7, 80, dtype=torch.float32)[:, :48]
    weight = randn(48, dtype=torch.float32, seed=1)
    assert_close(fused.rms_norm(wide, weight, 1e-5), TorchOps().rms_norm(wide, weight, 1e-5), torch.float32)


def test_non_finite_values_propagate(fused):
    x = randn(2, 32, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    out = fused.rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    assert out[0].isnan().all() and out[1].isfinite().all()


def test_rejects_bad_inputs(fused):
    x = randn(4, 32, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        fused.rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        fused.rms_norm(x, torch.ones(31), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        fused.silu_and_mul(x.half())
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        fused.rms_norm(x.t(), torch.ones(4), 1e-5)


def test_selection():
    cpu = torch.device("cpu")
    assert isinstance(select_ops(cpu, torch.float32), FusedCpuOps)
    assert isinstance(select_ops(cpu, torch.bfloat16), FusedCpuOps)
    assert isinstance(select_ops(cpu, torch.float16), TorchOps)
    assert isinstance(select_ops(torch.device("cuda"), torch.float32), TorchOps)


def test_falls_back_to_torch_ops_when_the_library_cannot_be_built(monkeypatch):
    from worker import kernels, model

    def no_compiler():
        raise RuntimeError("no c++ compiler")

    monkeypatch.setattr(kernels, "fused_ops", no_compiler)
    model._fused_ops_load.cache_clear()
    try:
        assert isinstance(select_ops(torch.device("cpu"), torch.float32), TorchOps)
    finally:
        model._fused_ops_load.cache_clear()
