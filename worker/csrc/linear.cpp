// float32 y = x W^T + b for the worker's projections and LM head on CPUs without AVX-512 (worker/linear.py uses it
// for steps of up to 256 rows and oneDNN above), on weights repacked once at load into column panels.
//
//   pack_linear(weight [N, K]) -> panels [ceil(N / NR), K, NR]   (zero columns pad the last panel)
//   linear(out [M, N], x [M, K], panels, N, bias or None)        out = x W^T (+ bias)
//
// Why by hand: on the AVX2 EPYC these machines have (182 GFLOP/s of float32 FMA on two cores, measured), oneDNN's
// packed kernels reach about 95 GFLOP/s on a decode step's 64 rows and 10-35 on 1-8 rows. This MR x NR kernel
// keeps MR x NR / W accumulators and the NR / W panel vectors of one k in registers (15 of AVX2's 16), so per k it
// loads NR / W panel vectors and MR values of x for MR x NR / W multiply-adds: 125-165 GFLOP/s at 64 rows and
// 1.4-2.7x oneDNN at 1-8 (docs/benchmarks.md). Panels are taken KB deep so a panel's slice stays in L1 while
// every block of rows passes over it.
//
// Work is split over the torch threads by panels (each thread streams its own columns of the weight); rows go in
// blocks of MC so a block of x stays in L2.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

#include "vec.h"

constexpr int W = VW;
constexpr int NB = 3;            // vectors per panel row
constexpr int NR = NB * W;       // panel width: 24 columns on AVX2, 48 on AVX-512
constexpr int MR = VREGS == 32 ? 8 : 4;  // rows per block: MR x NB accumulators + NB panel vectors + a broadcast
constexpr int64_t MC = 128;      // rows of x per pass over the panels (128 x K floats stay in L2)
constexpr int64_t KB = 256;      // depth per pass: a panel's KB x NR floats (24 KB on AVX2) stay in L1
constexpr int64_t PREFETCH_ROWS = 32;  // blocks of at least this many rows prefetch the next slice (see rows)

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// out rows [0, R) x the panel's columns [0, ncols) = x rows . panel (+ bias).
// `first`: out holds nothing yet (else the block adds to the partial sums there); bias: added now (last pass).
// Never inlined: inlined into the caller's loops, GCC 12 kept the accumulators on the stack (a store and a reload
// per multiply-add) wherever the caller ran on one thread (a one-thread worker, a one-panel weight), which ran at
// 19-22 GFLOP/s against 57-79 on its own; the OpenMP body happened to keep the good copy.
template <int R>
__attribute__((noinline)) void block(const float* x, int64_t ldx, const float* panel, int64_t k_len, float* out,
                                     int64_t ldo, int64_t ncols, const float* bias, bool first) {
  vf acc[R][NB] = {};
  if (!first) {
    alignas(64) float buf[NR] = {};
    for (int r = 0; r < R; ++r) {
      const float* o = out + r * ldo;
      if (ncols < NR) std::memcpy(buf, o, ncols * sizeof(float)), o = buf;
      for (int j = 0; j < NB; ++j) acc[r][j] = loadu(o + j * W);
    }
  }
  for (int64_t k = 0; k < k_len; ++k) {
    vf b[NB];
    for (int j = 0; j < NB; ++j) {
      b[j] = loadu(panel + k * NR + j * W);
      asm("" : "+x"(b[j]));  // one load per panel vector, kept in a register for the R rows (not R memory operands)
    }
    for (int r = 0; r < R; ++r) {
      const float a = x[r * ldx + k];
      for (int j = 0; j < NB; ++j) acc[r][j] += a * b[j];
    }
  }
  if (bias) {
    alignas(64) float bb[NR] = {};
    std::memcpy(bb, bias, ncols * sizeof(float));
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] += loadu(bb + j * W);
  }
  for (int r = 0; r < R; ++r) {
    if (ncols == NR) {
      for (int j = 0; j < NB; ++j) storeu(out + r * ldo + j * W, acc[r][j]);
    } else {  // the last panel of a width that is not a multiple of NR
      alignas(64) float buf[NR];
      for (int j = 0; j < NB; ++j) storeu(buf + j * W, acc[r][j]);
      std::memcpy(out + r * ldo, buf, ncols * sizeof(float));
    }
  }
}

// Calls block<R> for rows [m0, m1) in blocks of MR, then one block of the remaining rows. Meanwhile asks for the
// `pf_lines` cache lines at `pf` (the next panel slice) into L2, a share before each block: the weights stream from
// memory once per step, and the hardware prefetcher stops at the end of the slice that every block then re-reads
// from L1, so without this each slice's first block waited on memory (the model's projections at 64 rows, weights
// from memory: 96 -> 106 GFLOP/s, docs/benchmarks.md).
inline void rows(const float* x, int64_t ldx, int64_t m0, int64_t m1, const float* panel, int64_t k_len, float* out,
                 int64_t ldo, int64_t ncols, const float* bias, bool first, const char* pf, int64_t pf_lines) {
  const int64_t per = pf_lines / ((m1 - m0) / MR + 1) + 1;
  int64_t asked = 0;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) {
    for (const int64_t e = std::min(pf_lines, asked + per); asked < e; ++asked) __builtin_prefetch(pf + asked * 64, 0, 2);
    block<MR>(x + m * ldx, ldx, panel, k_len, out + m * ldo, ldo, ncols, bias, first);
  }
  for (; asked < pf_lines; ++asked) __builtin_prefetch(pf + asked * 64, 0, 2);
  const int64_t left = m1 - m;
  const float* xm = x + m * ldx;
  float* om = out + m * ldo;
  switch (left) {
    case 0: return;
    case 1: return block<1>(xm, ldx, panel, k_len, om, ldo, ncols, bias, first);
    case 2: return block<2>(xm, ldx, panel, k_len, om, ldo, ncols, bias, first);
    case 3: return block<3>(xm, ldx, panel, k_len, om, ldo, ncols, bias, first);
  }
  if constexpr (MR > 4) {  // AVX-512: up to 7 rows left
    block<4>(xm, ldx, panel, k_len, om, ldo, ncols, bias, first);
    rows(x, ldx, m + 4, m1, panel, k_len, out, ldo, ncols, bias, first, nullptr, 0);
  }
}

at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack_linear takes a float32 CPU matrix [N, K]");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = (n + NR - 1) / NR;
  at::Tensor packed = at::zeros({panels, k, NR}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  for (int64_t col = 0; col < n; ++col) {
    float* p = dst + (col / NR) * k * NR + col % NR;
    const float* row = src + col * k;
    for (int64_t i = 0; i < k; ++i) p[i * NR] = row[i];
  }
  return packed;
}

void linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x must be float32 [M, K], rows contiguous");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous() && packed.scalar_type() == at::kFloat,
              "packed must come from pack_linear on this CPU (panels of ", NR, ")");
  const int64_t m = x.size(0), k = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == k, "x has ", k, " columns, the weight ", packed.size(1));
  TORCH_CHECK(n > (panels - 1) * NR && n <= panels * NR, "n = ", n, " does not match ", panels, " panels");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.stride(1) == 1 &&
                  out.scalar_type() == at::kFloat, "out must be float32 [M, n], rows contiguous");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "bias must be float32 [n]");
    b = bias->const_data_ptr<float>();
  }
  if (m == 0) return;
  const float* xp = x.const_data_ptr<float>();
  const float* pp = packed.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  for (int64_t m0 = 0; m0 < m; m0 += MC) {
    const int64_t m1 = std::min(m, m0 + MC);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ncols = std::min<int64_t>(NR, n - p * NR);
        for (int64_t k0 = 0; k0 < k; k0 += KB) {
          const int64_t kn = std::min(KB, k - k0);
          const float* bp = b && k0 + kn == k ? b + p * NR : nullptr;
          const float* slice = pp + (p * k + k0) * NR;
          // the next slice (of this panel, or the next panel's first) lies right after this one; with few rows the
          // blocks are too short to hide the requests, and they only compete with the demand loads
          const bool ask = m1 - m0 >= PREFETCH_ROWS;
          rows(xp + k0, ldx, m0, m1, slice, kn, op + p * NR, ldo, ncols, bp, k0 == 0,
               reinterpret_cast<const char*>(slice + kn * NR), ask ? KB * NR * int64_t(sizeof(float)) / 64 : 0);
        }
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nimbus, m) {
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor(a!) out, Tensor x, Tensor packed, int n, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(nimbus, CPU, m) {
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
}
