"""Linear layers whose weights are repacked once, at load, into the layouts the CPU matmul kernels compute from.

- oneDNN (`mkldnn._reorder_linear_weight` / `_linear_pointwise`, what torch.compile's CPU backend does with frozen
  weights): a plain `F.linear` in bfloat16 goes through oneDNN too but converts the weight inside every call, which
  at decode sizes costs about as much as the multiply. Results equal `F.linear`'s bit for bit in bfloat16. float32
  is packed too: there `F.linear` runs on MKL, which on the AVX2 EPYC these machines have reaches 44-88 GFLOP/s at
  64 rows where oneDNN reaches 110-125.
- Nimbus's own kernel (worker/csrc/linear.cpp: column panels, register-blocked) for steps of at most PANEL_ROWS
  rows, where it was measured faster than oneDNN: float32 on CPUs without AMX (on the AVX2 Zen 3 a batch-64 decode
  step of the default model 20% faster than on oneDNN alone, batch 8 45% faster; on the AVX-512 Zen 4 batch 1
  1.25-1.45x, batch 64 1.0-1.17x), and bfloat16 on AVX512-BF16 CPUs without AMX (on vdpbf16ps: the model's
  30 layers of projections at 64 rows 1.10-1.11x oneDNN's rate, at 1-8 rows 1.5-1.7x; docs/benchmarks.md,
  fourteenth pass). Prefill blocks stay on oneDNN, which is as fast or faster
  there. The weights are then held twice, once per layout (`weight_bytes` counts both).

- The MLP's gate and up projections in bfloat16 on CPUs with AMX (`SiluGate`): two oneDNN matmuls with the SiLU and
  the product in their epilogues, so the [rows, 2 x intermediate] gate/up output is never written and read back:
  a layer's gate/up and SiLU over 2,048 rows 1.5-1.7x faster than gate_up then the SiLU op, a prefill step of
  the default model 2-15%, a batch-64 decode step about 1% slower (docs/benchmarks.md, thirteenth pass).

The panel kernel's float32 results differ from `F.linear`'s in the last bits (other summation orders; within 1e-5
relative), its bfloat16 results in an occasional last bit of the rounded output; float32 greedy output still
equals transformers' (tests/test_smollm2.py, tests/test_server.py).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from worker import kernels

log = logging.getLogger(__name__)

# the row count oneDNN picks its packed layout for: a decode batch; prefill steps of thousands of rows run at the
# same rate from it (measured in docs/benchmarks.md)
BATCH_HINT = 64
# steps of at most this many rows use the panel kernel where there is one (decode and small mixed steps), larger ones
# oneDNN: the two are level from 128 to 256 rows (0.8-1.3x by shape), oneDNN ahead from 384 (0.92-1.0x)
PANEL_ROWS = 256


class Linear:
    """y = x W^T + b for one weight: packed for oneDNN when `pack`, with panels for the Nimbus kernel when `panels`,
    else through F.linear."""

    __slots__ = ("weight", "bias", "packed", "panels", "out_features", "_panel_op")
    activated = False  # returns the projection itself (SiluGate returns the MLP's activation)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, panels: bool = False) -> None:
        self.bias = bias
        self.packed = pack
        self.out_features = weight.shape[0]
        self.panels: torch.Tensor | None = None
        if panels:
            ops = kernels.linear_ops()
            self.panels, self._panel_op = ops.pack_linear(weight), ops.linear
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None and (x.shape[0] <= PANEL_ROWS or not self.packed):
            if x.stride(-1) != 1:
                x = x.contiguous()
            out = x.new_empty(x.shape[0], self.out_features)
            self._panel_op(out, x, self.panels, self.out_features, self.bias)
            return out
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_bytes(self) -> int:
        """Bytes of the packed copies this layer holds (the plain weight is counted as a parameter)."""
        total = self.weight.numel() * self.weight.element_size() if self.packed else 0
        if self.panels is not None:
            total += self.panels.numel() * self.panels.element_size()
        return total


class SiluGate:
    """silu(x Wg^T + bg) * (x Wu^T + bu) from the MLP's fused gate/up weight [gate; up]: two packed oneDNN matmuls,
    the first with oneDNN's swish post-op, the second with a binary multiply by the first's output. Against gate_up
    then silu_and_mul it skips writing and reading the gate/up output and one rounding (up is multiplied before it
    is rounded to bfloat16): within two bfloat16 steps of that path."""

    __slots__ = ("gate", "up", "gate_bias", "up_bias", "out_features")
    activated = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        half = weight.shape[0] // 2
        self.out_features = half
        self.gate = torch.ops.mkldnn._reorder_linear_weight(weight[:half].contiguous(), BATCH_HINT)
        self.up = torch.ops.mkldnn._reorder_linear_weight(weight[half:].contiguous(), BATCH_HINT)
        self.gate_bias = None if bias is None else bias[:half].contiguous()
        self.up_bias = None if bias is None else bias[half:].contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate, self.gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.up, self.up_bias, "mul")

    def extra_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.gate, self.up))


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def should_fuse_silu_gate(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the MLP's gate and up projections become a SiluGate: CPU, bfloat16, AMX-BF16 (the only CPU it was
    measured on), packing works and the fused ops agree with the plain path here."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and "amx_bf16" in kernels.cpu_flags().split()
            and should_pack(device, dtype) and _silu_gate_works())


def should_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights for this device and dtype get packed for oneDNN: CPU, float32 or bfloat16, and the ops work
    here."""
    return device.type == "cpu" and dtype in PACKED_DTYPES and _packing_works(dtype)


def should_use_panels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights also get panels for the Nimbus kernel: a CPU without AMX (where oneDNN computes bfloat16 on
    tiles, and its float32 was not measured against the kernel), float32 there or bfloat16 with AVX512-BF16, and
    the kernel builds and agrees with F.linear here."""
    if device.type != "cpu":
        return False
    flags = kernels.cpu_flags().split()
    if dtype == torch.float32:  # measured on the AVX2 Zen 3 and the AVX-512 Zen 4; on AMX, oneDNN only
        supported = "amx_bf16" not in flags
    elif dtype == torch.bfloat16:
        supported = "avx512_bf16" in flags and "amx_bf16" not in flags
    else:
        supported = False
    return supported and _panels_work(dtype)


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


@functools.cache
def _silu_gate_works() -> bool:
    """SiluGate's ops exist in this torch build and agree with F.linear then SiLU and the product, to two bfloat16
    steps; asked once per process."""
    try:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(96, 32, generator=g) / 4).to(torch.bfloat16)
        b = torch.randn(96, generator=g).to(torch.bfloat16)
        x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
        gate, up = F.linear(x, w, b).float().chunk(2, dim=-1)
        want = F.silu(gate) * up
        got = SiluGate(w, b)(x).float()
        ok = bool(((got - want).abs() <= 2 ** -6 * want.abs() + 1e-2).all())
    except (RuntimeError, AttributeError) as e:  # no oneDNN in this build, or the internal ops changed
        log.warning("fused bfloat16 SiLU gate unavailable (%s); using gate_up and the SiLU op", e)
        return False
    if not ok:
        log.warning("fused bfloat16 SiLU gate disagrees with F.linear here; using gate_up and the SiLU op")
    return ok


@functools.cache
def _panels_work(dtype: torch.dtype) -> bool:
    """The panel kernel builds, loads and agrees with F.linear in `dtype` (to float32 rounding, or to one bfloat16
    step); asked once per process and dtype, so a warning shows once."""
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = torch.randn(50, 40, generator=g), torch.randn(50, generator=g), torch.randn(5, 40, generator=g)
        w, b, x = w.to(dtype), b.to(dtype), x.to(dtype)
        got, want = Linear(w, b, pack=False, panels=True)(x).float(), F.linear(x, w, b).float()
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        ok = torch.allclose(got, want, rtol=tol, atol=tol)
    except Exception as e:  # a missing compiler or ninja must not stop the worker: oneDNN and F.linear still work
        log.warning("%s panel kernel unavailable (%s); using oneDNN", dtype, e)
        return False
    if not ok:
        log.warning("%s panel kernel disagrees with F.linear here; using oneDNN", dtype)
    return ok
