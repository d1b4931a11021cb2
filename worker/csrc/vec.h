// The vector helpers both CPU kernels use (paged_attention.cpp, fused_ops.cpp): GCC/Clang vector extensions of the
// CPU's own width, which the compiler maps onto its registers without intrinsics: 16 floats (one AVX-512 register)
// where AVX-512 is there, else 8 (one AVX2 register, two NEON ones). A vector wider than the registers is emulated
// in pieces, and its shuffles and spills cost several times its arithmetic (the 16-float build ran the attention
// kernel 4-5x slower on an AVX2 EPYC). Included once per library, inside its anonymous namespace.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#define NIMBUS_VW 16
#else
#define NIMBUS_VW 8
#endif
constexpr int VW = NIMBUS_VW;               // floats per vector
constexpr int VREGS = VW == 16 ? 32 : 16;   // vector registers the compiler can keep them in

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

inline vf splat(float x) { return vf{} + x; }

// W bfloat16 values at p widened to floats (bfloat16 is the top half of a float). On AVX-512 one widening load and a
// shift, from <immintrin.h>, which the includer includes outside its namespace; GCC 12 compiles the generic form to
// two half-width loads and a lane insert.
inline vf widen_bf16(const void* p) {
#ifdef __AVX512F__
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return std::bit_cast<vf>(_mm512_slli_epi32(wide, 16));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return std::bit_cast<vf>(__builtin_convertvector(h, vu) << 16);
#endif
}

// The low and high halves of a vector, as vectors of 8 floats (AVX-512) or 4 (AVX2).
#if NIMBUS_VW == 16
#define NIMBUS_LO(v) __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
#define NIMBUS_HI(v) __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
#else
#define NIMBUS_LO(v) __builtin_shufflevector(v, v, 0, 1, 2, 3)
#define NIMBUS_HI(v) __builtin_shufflevector(v, v, 4, 5, 6, 7)
#endif

// Four floats to one, for the last steps of a horizontal sum or max.
inline auto quarter(vf v) {
#if NIMBUS_VW == 16
  auto a = NIMBUS_LO(v) + NIMBUS_HI(v);
  return __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#else
  return NIMBUS_LO(v) + NIMBUS_HI(v);
#endif
}

inline float hsum(vf v) {
  const auto b = quarter(v);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// lane i = i, for masks of the first n lanes (IOTA < n)
inline vi iota() {
  vi v{};
  for (int i = 0; i < VW; ++i) v[i] = i;
  return v;
}

// exp lane-wise (Cephes single-precision polynomial after reduction by ln 2; relative error ~1e-7). Inputs are
// clamped to [-87, 89]: ~1e-38 below (callers that need 0 there zero masked lanes themselves, and silu of a very
// negative gate comes out 0 anyway), +inf from about 88.4 up (2^128).
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 89.0f ? splat(89.0f) : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * std::bit_cast<vf>((__builtin_convertvector(n, vi) + 127) << 23);
}
