// Fused elementwise CPU ops for the decoder layer (worker/model.py): one pass over each row instead of the
// five to ten torch ops (each a full read and write of the activations, plus dispatch) they replace.
//
//   rms_norm(out, x, weight, eps)               out = rms_norm(x) * weight
//   fused_add_rms_norm(x, residual, weight, eps) residual += x; x = rms_norm(residual) * weight (in place)
//   silu_and_mul(out, x)                        out = silu(x[:, :I]) * x[:, I:]
//   rotary(x, cos, sin)                         rotate-half rotary embedding of x [T, heads, D], in place
//   argmax_rows(out, x)                         out[r] = the first index of row r's largest value (a NaN counts as
//                                               the largest, as in torch.argmax); int64 out, rows in parallel
//
// Rows have a contiguous last dim and any row stride. Work is in float32; results are rounded to the model
// dtype at the same points as the torch reference (worker/model.py's TorchOps), so bfloat16 results match it
// to within one rounding: the norm is taken in float32 and rounded before the weight is applied, a residual
// is rounded before it is normalised, silu is rounded before the multiply.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

#include "vec.h"

constexpr int64_t W = VW;

// Elements per parallel chunk: below this, handing out a task (and waiting at its barrier, long when another
// process holds a core) costs more than running it. The memory-bound ops (norms, rotary) run a decode step's
// 64 x 576 inline; silu, about ten times the arithmetic per element, splits it.
constexpr int64_t GRAIN_MEMORY_BOUND = 65536;
constexpr int64_t GRAIN_SILU = 8192;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const c10::BFloat16* p) { return widen_bf16(p); }

#ifdef __AVX512BF16__
// vcvtneps2bf16 rounds to nearest even in one instruction, where the integer form below takes six; it differs from
// it (and from torch) only on float32 subnormals, which it flushes to zero, and in a NaN's payload
inline __m256i to_bf16_bits(vf v) { return (__m256i)_mm512_cvtneps_pbh(std::bit_cast<__m512>(v)); }
inline vf round_bf16(vf v) {
  return std::bit_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}
#else
// Round to the nearest bfloat16 (ties to even) and keep the result as a float; NaN stays NaN.
inline vf round_bf16(vf v) {
  const vu u = std::bit_cast<vu>(v);
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return v != v ? v : std::bit_cast<vf>(r);
}
#endif

// The rounding torch applies when an op's result is stored in T: none for float.
template <typename T>
inline vf rnd(vf v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return round_bf16(v);
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(c10::BFloat16* p, vf v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
#else
  const vh h = __builtin_convertvector(std::bit_cast<vu>(round_bf16(v)) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
#endif
}

// The last n < W elements of a row: through a W-wide buffer, lanes past n read as 0 and are never written.
template <typename T>
inline vf load_n(const T* p, int64_t n) {
  T buf[W] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <typename T>
inline void store_n(T* p, vf v, int64_t n) {
  T buf[W];
  store(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// Calls f(i, n) for the row's vectors: n = W except for a shorter last one.
template <typename F>
inline void for_vectors(int64_t size, F f) {
  int64_t i = 0;
  for (; i + W <= size; i += W) f(i, W);
  if (i < size) f(i, size - i);
}

template <typename T>
inline vf load_v(const T* p, int64_t n) { return n == W ? load(p) : load_n(p, n); }
template <typename T>
inline void store_v(T* p, vf v, int64_t n) { n == W ? store(p, v) : store_n(p, v, n); }

template <typename F>
inline void parallel_rows(int64_t rows, int64_t row_elements, int64_t grain_elements, const F& f) {
  const int64_t grain = std::max<int64_t>(1, grain_elements / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// out = rnd(rnd(x * inv_rms) * weight): the reference rounds the float32 norm to T, then multiplies in T.
template <typename T>
inline void scale_row(T* out, const T* x, const T* weight, float inv_rms, int64_t h) {
  for_vectors(h, [&](int64_t i, int64_t n) {
    store_v(out + i, rnd<T>(load_v(x + i, n) * inv_rms) * load_v(weight + i, n), n);
  });
}

inline float inv_rms(float sum_squares, int64_t h, double eps) {
  return 1.0f / std::sqrt(sum_squares / float(h) + float(eps));
}

template <typename T>
void rms_norm_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), h = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  parallel_rows(rows, h, GRAIN_MEMORY_BOUND, [&](int64_t r) {
    const T* row = xp + r * xs;
    vf acc{};
    for_vectors(h, [&](int64_t i, int64_t n) {
      const vf v = load_v(row + i, n);
      acc += v * v;
    });
    scale_row(op + r * os, row, wp, inv_rms(hsum(acc), h, eps), h);
  });
}

template <typename T>
void add_rms_norm_rows(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), h = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  parallel_rows(rows, h, GRAIN_MEMORY_BOUND, [&](int64_t r) {
    T* xr = xp + r * xs;
    T* rr = rp + r * rs;
    vf acc{};
    for_vectors(h, [&](int64_t i, int64_t n) {
      const vf v = rnd<T>(load_v(xr + i, n) + load_v(rr + i, n));  // the sum as stored in T is normalised
      store_v(rr + i, v, n);
      acc += v * v;
    });
    scale_row(xr, rr, wp, inv_rms(hsum(acc), h, eps), h);
  });
}

template <typename T>
void silu_and_mul_rows(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), half = out.size(1);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  parallel_rows(rows, 2 * half, GRAIN_SILU, [&](int64_t r) {
    const T* gate = xp + r * xs;
    const T* up = gate + half;
    T* o = op + r * os;
    for_vectors(half, [&](int64_t i, int64_t n) {
      const vf g = load_v(gate + i, n);
      store_v(o + i, rnd<T>(g / (1.0f + vexp(-g))) * load_v(up + i, n), n);
    });
  });
}

// x [T, heads, D]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves of each head, each
// product and sum rounded to T as the reference's separate torch ops do.
template <typename T>
void rotary_rows(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  T* xp = x.data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  const int64_t ts = x.stride(0), hs = x.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  parallel_rows(tokens, heads * 2 * half, GRAIN_MEMORY_BOUND, [&](int64_t t) {
    for_vectors(half, [&](int64_t i, int64_t n) {
      const vf c = load_v(cp + t * cs + i, n), s = load_v(sp + t * ss + i, n);
      for (int64_t h = 0; h < heads; ++h) {
        T* x1 = xp + t * ts + h * hs + i;
        T* x2 = x1 + half;
        const vf a = load_v(x1, n), b = load_v(x2, n);
        store_v(x1, rnd<T>(rnd<T>(a * c) - rnd<T>(b * s)), n);
        store_v(x2, rnd<T>(rnd<T>(b * c) + rnd<T>(a * s)), n);
      }
    });
  });
}

void check_dtype(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(x.scalar_type() == dtype, name, " has dtype ", x.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only, got ", dtype);
}

void check_rows(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t dims = 2) {
  check_dtype(x, name, dtype);
  TORCH_CHECK(x.dim() == dims && x.stride(dims - 1) == 1, name, " must have ", dims,
              " dims with a contiguous last dim");
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  check_dtype(weight, "weight", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be a contiguous vector of the rows' size");
}

template <typename F>
void dispatch(at::ScalarType dtype, F f) {
  if (dtype == at::kFloat) f(float{});
  else f(c10::BFloat16{});
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x", x.scalar_type());
  check_rows(out, "out", x.scalar_type());
  check_weight(weight, x);
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
  dispatch(x.scalar_type(), [&](auto t) { rms_norm_rows<decltype(t)>(out, x, weight, eps); });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x", x.scalar_type());
  check_rows(residual, "residual", x.scalar_type());
  check_weight(weight, x);
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape");
  dispatch(x.scalar_type(), [&](auto t) { add_rms_norm_rows<decltype(t)>(x, residual, weight, eps); });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "x", x.scalar_type());
  check_rows(out, "out", x.scalar_type());
  TORCH_CHECK(x.size(1) % 2 == 0 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2,
              "x must be [N, 2I] (gate, then up) and out [N, I]");
  dispatch(x.scalar_type(), [&](auto t) { silu_and_mul_rows<decltype(t)>(out, x); });
}

void rotary(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x", x.scalar_type(), 3);
  check_rows(cos, "cos", x.scalar_type());
  check_rows(sin, "sin", x.scalar_type());
  TORCH_CHECK(x.size(2) % 2 == 0 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) / 2 &&
                  sin.sizes() == cos.sizes(),
              "x must be [T, heads, D] with D even, cos and sin [T, D/2]");
  dispatch(x.scalar_type(), [&](auto t) { rotary_rows<decltype(t)>(x, cos, sin); });
}

// One pass for the maximum (and whether a NaN is there), then the first position holding it: the row is in L2 by
// then. torch's argmax over a [64, 49152] float32 batch of logits took 2.6 ms here, this 0.3 (docs/benchmarks.md).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  vf m = splat(-std::numeric_limits<float>::infinity());
  vi nan{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf v = load(x + i);
    nan |= v != v;
    m = v > m ? v : m;
  }
  float best = m[0];
  bool any_nan = false;
  for (int k = 0; k < W; ++k) {
    best = std::max(best, m[k]);
    any_nan |= nan[k] != 0;
  }
  for (int64_t j = i; j < n; ++j) {
    const float v = float(x[j]);
    any_nan |= v != v;
    best = std::max(best, v);
  }
  int64_t j = 0;
  for (; j + W <= n; j += W) {  // to the first vector holding it, then within that vector
    const vf v = load(x + j);
    const vi hit = any_nan ? v != v : v == splat(best);
    bool found = false;
    for (int k = 0; k < W; ++k) found |= hit[k] != 0;
    if (found) break;
  }
  for (; j < n; ++j) {
    const float v = float(x[j]);
    if (any_nan ? v != v : v == best) return j;
  }
  return 0;  // unreachable: some value is the maximum
}

void argmax_rows(at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "x", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "rows must not be empty");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 1 && out.is_contiguous() && out.size(0) == x.size(0),
              "out must be a contiguous int64 vector, one entry a row");
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  dispatch(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* base = x.const_data_ptr<T>();
    parallel_rows(x.size(0), n, GRAIN_MEMORY_BOUND, [&](int64_t r) { o[r] = argmax_row(base + r * stride, n); });
  });
}

}  // namespace

// A fragment: paged_attention.cpp defines the namespace; either library may load first.
TORCH_LIBRARY_FRAGMENT(nimbus, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rotary(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(nimbus, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
  m.impl("argmax_rows", &argmax_rows);
}
