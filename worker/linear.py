"""Linear layers whose weights are packed once, at load, into the layout oneDNN's CPU matmul computes from.

A plain `F.linear` in bfloat16 on CPU goes through oneDNN too, but converts the weight into its blocked layout
inside every call; at decode sizes (tens of rows against a 576 x 3072 weight) that conversion costs about as
much as the multiply. Packing is what torch.compile's CPU backend does with frozen weights; here it is done by hand
with the same torch ops (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`), so no compiler is needed.
Results equal `F.linear`'s bit for bit in bfloat16 (tests/test_linear.py checks that).

float32 is packed too: there `F.linear` runs on MKL, which on the AVX2 EPYC these machines have reaches 44-88
GFLOP/s at decode sizes (64 rows) where oneDNN's packed kernels reach 110-125 (docs/benchmarks.md). oneDNN sums in
another order than MKL, so float32 outputs differ from `F.linear`'s in the last bits (within 1e-5 relative);
greedy output still equals transformers' (tests/test_smollm2.py, tests/test_server.py).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# the row count oneDNN picks its packed layout for: a decode batch; prefill steps of thousands of rows run at the
# same rate from it (measured in docs/benchmarks.md)
BATCH_HINT = 64


class Linear:
    """y = x W^T + b for one weight, packed for oneDNN when `packed`, else through F.linear."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.bias = bias
        self.packed = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def should_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights for this device and dtype get packed: CPU, float32 or bfloat16, and the ops work here."""
    return device.type == "cpu" and dtype in PACKED_DTYPES and _packing_works(dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """The packed ops exist in this torch build and agree with F.linear (bit for bit in bfloat16, where both are
    oneDNN; to float32 rounding in float32, where F.linear is MKL); asked once per process and dtype."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        x = torch.randn(5, 32, generator=g).to(dtype)
        got, want = Linear(w, b, pack=True)(x), F.linear(x, w, b)
        ok = torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    except (RuntimeError, AttributeError) as e:  # no oneDNN in this build, or the internal ops changed
        log.warning("packed %s linear weights unavailable (%s); using F.linear", dtype, e)
        return False
    if not ok:
        log.warning("packed %s linear weights disagree with F.linear here; using F.linear", dtype)
    return ok
