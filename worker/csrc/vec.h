// The vector helpers both CPU kernels use (paged_attention.cpp, fused_ops.cpp): GCC/Clang vector extensions, 16
// floats a vector, which the compiler maps onto whatever the CPU has (one AVX-512 register, two AVX2 ones, four
// NEON ones) without intrinsics. Included once per library, inside its anonymous namespace.
#pragma once

#include <bit>
#include <cstdint>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

inline vf splat(float x) { return vf{} + x; }

inline float hsum(vf v) {
  auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  auto b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
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
