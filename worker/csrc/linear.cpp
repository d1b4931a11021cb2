// y = x W^T + b for the worker's projections and LM head, on weights repacked once at load into column panels:
// float32 on CPUs without AMX, bfloat16 on CPUs with AVX512-BF16 and without AMX (worker/linear.py uses it for
// steps of up to 256 rows and oneDNN above).
//
//   pack_linear(weight [N, K]) -> float32 panels [ceil(N / NR), K, NR], or bfloat16 [ceil(N / BNR), ceil(K / 2),
//                                  BNR, 2] (zero columns pad the last panel)
//   linear(out [M, N], x [M, K], panels, N, bias or None)        out = x W^T (+ bias), in x's dtype
//
// Why by hand: on the AVX2 EPYC these machines have (182 GFLOP/s of float32 FMA on two cores, measured), oneDNN's
// packed kernels reach about 95 GFLOP/s on a decode step's 64 rows and 10-35 on 1-8 rows. This MR x NR kernel
// keeps MR x NR / W accumulators and the NR / W panel vectors of one k in registers (15 of AVX2's 16), so per k it
// loads NR / W panel vectors and MR values of x for MR x NR / W multiply-adds: 125-165 GFLOP/s at 64 rows and
// 1.4-2.7x oneDNN at 1-8 (docs/benchmarks.md). Panels are taken KB deep so a panel's slice stays in L1 while
// every block of rows passes over it.
//
// Work is split over the torch threads by panels (each thread streams its own columns of the weight); rows go in
// blocks of MC so a block of x stays in L2. The bfloat16 kernel is described where it starts, below.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

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

at::Tensor pack_linear_f32(const at::Tensor& weight) {
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

void linear_f32(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
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

#ifdef __AVX512BF16__
// bfloat16 on AVX512-BF16 CPUs without AMX (worker/linear.py decides): vdpbf16ps multiplies a pair of bfloat16
// along k and adds both products to a float32 lane, so the panels hold each column's weights as pairs,
// [panels, ceil(K / 2), BNR] dwords of (w[col][2i], w[col][2i + 1]) (a zero pairs an odd K's last weight). A block
// keeps BMR x BNB accumulators, the BNB panel vectors of one pair and a broadcast pair of x in registers (31 of 32):
// per pair BNB loads and BMR broadcasts for BMR x BNB dot products, each 32 multiply-adds. The whole depth runs in
// registers (a panel's K x BNR weights stay in L2 while the row blocks pass over them), so the float32 sums are
// rounded to bfloat16 once, as oneDNN's are; only the summation order differs from it. On the Zen 4 (64 rows, the
// model's projections with their weights from memory) 4 x 6 ran at 365-369 GFLOP/s, 8 x 3 at 364-376 and 6 x 4 at
// 328-340; at 128 rows 4 x 6 led (408-420 against 383-400 and 353-367).
constexpr int BNB = 6;
constexpr int BNR = BNB * 16;  // 96 columns a panel
constexpr int BMR = 4;
constexpr int64_t BMC = 128;   // rows per pass over the panels: 128 rows of x of up to ~2,000 columns stay in L2

using bf16 = c10::BFloat16;

inline __m512bh pair_of(const bf16* p) {  // x[k], x[k + 1] as one dword, in every lane
  uint32_t d;
  std::memcpy(&d, p, sizeof d);
  return (__m512bh)_mm512_set1_epi32(int32_t(d));
}

template <int R>
__attribute__((noinline)) void block_bf16(const bf16* x, int64_t ldx, const uint32_t* panel, int64_t k, bf16* out,
                                          int64_t ldo, int64_t ncols, const float* bias, const char* pf = nullptr,
                                          int64_t pf_lines = 0) {
  __m512 acc[R][BNB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < BNB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t pairs = (k + 1) / 2, full = k / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    if (i < pf_lines) __builtin_prefetch(pf + i * 64, 0, 2);
    __m512bh b[BNB];
    for (int j = 0; j < BNB; ++j) {
      b[j] = (__m512bh)_mm512_loadu_si512(panel + i * BNR + j * 16);
      asm("" : "+v"(b[j]));  // one load per panel vector, kept for the R rows
    }
    for (int r = 0; r < R; ++r) {
      __m512bh a;
      if (i < full) {
        a = pair_of(x + r * ldx + 2 * i);
      } else {  // an odd K's last column: (x[k - 1], 0), never reading past the row
        uint16_t h;
        std::memcpy(&h, x + r * ldx + 2 * i, sizeof h);
        a = (__m512bh)_mm512_set1_epi32(int32_t(h));
      }
      for (int j = 0; j < BNB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  if (bias)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < BNB; ++j) acc[r][j] = _mm512_add_ps(acc[r][j], _mm512_loadu_ps(bias + j * 16));
  for (int r = 0; r < R; ++r) {
    // rounded to nearest even, as oneDNN's and torch's conversions are; a partial panel goes through a buffer
    alignas(64) bf16 buf[BNR];
    bf16* o = ncols == BNR ? out + r * ldo : buf;
    int j = 0;
    for (; j + 1 < BNB; j += 2)
      _mm512_storeu_si512(o + j * 16, (__m512i)_mm512_cvtne2ps_pbh(acc[r][j + 1], acc[r][j]));
    if constexpr (BNB % 2 == 1)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j * 16), (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
    if (ncols < BNR) std::memcpy(out + r * ldo, buf, ncols * sizeof(bf16));
  }
}

// Rows [m0, m1) of one panel in blocks of BMR, then the rest; meanwhile asks for the next panel's `pf_lines`
// cache lines, a share per block, one line per k-pair inside it. Asked all at once before each block (as `rows`
// does for float32), the model's 30 layers and LM head at 64 rows took 48.0-49.8 ms against 45.4-47.6 spread
// out, and at 32 rows 29.2-30.2 against 24.0-25.7 (the Zen 4, weights from memory, four alternating runs each).
// Below PREFETCH_ROWS the blocks are too few to hide anything: asking there was slower at 1 and 8 rows.
void rows_bf16(const bf16* x, int64_t ldx, int64_t m0, int64_t m1, const uint32_t* panel, int64_t k, bf16* out,
               int64_t ldo, int64_t ncols, const float* bias, const char* pf, int64_t pf_lines) {
  const int64_t per = pf_lines / ((m1 - m0) / BMR + 1) + 1;
  int64_t asked = 0;
  int64_t m = m0;
  for (; m + BMR <= m1; m += BMR) {
    // the block asks for its share one line per k-pair, not all at once
    const int64_t share = std::min(std::min(pf_lines - asked, per), (k + 1) / 2);
    block_bf16<BMR>(x + m * ldx, ldx, panel, k, out + m * ldo, ldo, ncols, bias, pf + asked * 64, share);
    asked += share;
  }
  for (; asked < pf_lines; ++asked) __builtin_prefetch(pf + asked * 64, 0, 2);
  const bf16* xm = x + m * ldx;
  bf16* om = out + m * ldo;
  switch (m1 - m) {
    case 1: return block_bf16<1>(xm, ldx, panel, k, om, ldo, ncols, bias);
    case 2: return block_bf16<2>(xm, ldx, panel, k, om, ldo, ncols, bias);
    case 3: return block_bf16<3>(xm, ldx, panel, k, om, ldo, ncols, bias);
  }
  static_assert(BMR == 4, "the tail above takes up to BMR - 1 rows");
}

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = (n + BNR - 1) / BNR, pairs = (k + 1) / 2;
  at::Tensor packed = at::zeros({panels, pairs, BNR, 2}, w.options());
  const bf16* src = w.const_data_ptr<bf16>();
  bf16* dst = packed.data_ptr<bf16>();
  for (int64_t col = 0; col < n; ++col) {
    bf16* p = dst + ((col / BNR) * pairs * BNR + col % BNR) * 2;
    const bf16* row = src + col * k;
    for (int64_t i = 0; i < k; ++i) p[(i / 2) * BNR * 2 + i % 2] = row[i];
  }
  return packed;
}

void linear_bf16(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be bfloat16 [M, K], rows contiguous");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == BNR && packed.size(3) == 2 && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_linear on this CPU (bfloat16 panels of ", BNR, ")");
  const int64_t m = x.size(0), k = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == (k + 1) / 2, "x has ", k, " columns, the weight ", 2 * packed.size(1), " or one less");
  TORCH_CHECK(n > (panels - 1) * BNR && n <= panels * BNR, "n = ", n, " does not match ", panels, " panels");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.stride(1) == 1 &&
                  out.scalar_type() == at::kBFloat16, "out must be bfloat16 [M, n], rows contiguous");
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->is_contiguous() &&
                    bias->scalar_type() == at::kBFloat16, "bias must be bfloat16 [n]");
  if (m == 0) return;
  const bf16* xp = x.const_data_ptr<bf16>();
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<bf16>());
  const bf16* bp = bias ? bias->const_data_ptr<bf16>() : nullptr;
  bf16* op = out.data_ptr<bf16>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0), stride = packed.size(1) * BNR;
  for (int64_t m0 = 0; m0 < m; m0 += BMC) {
    const int64_t m1 = std::min(m, m0 + BMC);
    const int64_t lines = m1 - m0 >= PREFETCH_ROWS ? stride * int64_t(sizeof(uint32_t)) / 64 : 0;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const uint32_t* panel = pp + p * stride;
        const int64_t ncols = std::min<int64_t>(BNR, n - p * BNR);
        // the panel's bias in float32 (added to the sums before they are rounded), zero past ncols
        alignas(64) float pb[BNR] = {};
        for (int64_t c = 0; bp && c < ncols; ++c) pb[c] = float(bp[p * BNR + c]);
        // the next panel lies right after this one (the last one's request runs past the end, which is harmless)
        rows_bf16(xp, ldx, m0, m1, panel, k, op + p * BNR, ldo, ncols, bp ? pb : nullptr,
                  reinterpret_cast<const char*>(panel + stride), p + 1 < panels ? lines : 0);
      }
    });
  }
}
#endif

at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "pack_linear takes a CPU matrix [N, K]");
#ifdef __AVX512BF16__
  if (weight.scalar_type() == at::kBFloat16) return pack_linear_bf16(weight);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "pack_linear takes a float32 or bfloat16 matrix");
#else
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "pack_linear takes a float32 matrix here (bfloat16 needs AVX512-BF16)");
#endif
  return pack_linear_f32(weight);
}

void linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
            const std::optional<at::Tensor>& bias) {
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16) return linear_bf16(out, x, packed, n, bias);
#endif
  linear_f32(out, x, packed, n, bias);
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
