// CPU paged attention for Nimbus: reads each sequence's K/V blocks where they lie in the paged pool
// (no gather, no padding) and computes causal attention for decode and prefill chunks in one call.
//
// Layouts (as worker/attention.py documents them):
//   q, out          [T, H, D]    new tokens of all sequences, flattened; last dim contiguous
//   k, v            [T, KVH, D]  new tokens' keys/values, written into the pool at slot_mapping first
//   key/value pool  [num_blocks, block_size, KVH, D] contiguous (one layer); q's dtype, or bfloat16 under float32
//                   q (a two-byte cache: half the bytes decode reads, twice the sequences in the same memory)
//   block_tables    int32 [S, W] block ids of each sequence, in position order (padding never read)
//   query_start     int32 [S+1]  rows of sequence s are query_start[s] .. query_start[s+1]-1
//   context_lens    int32 [S]    positions attended after this step; the chunk ends at the last one
//
// Work is split into items handed out dynamically to the torch intra-op threads, longest first:
//   decode   (sequence, kv heads): with many decodes in the step an item takes every kv head of its sequence,
//            so each KV block is read whole and front to back; with few, one kv head, so every thread has work.
//            Decode is bound by memory: K then V are streamed once each, with software prefetch a fixed
//            distance ahead, and scores for the whole context are kept (two passes, no online rescaling).
//   prefill  (sequence, kv head, tile of up to QT query tokens): keys are staged KC at a time into float scratch
//            and both products (Q K^T and P V) run as small register-blocked matrix multiplies; softmax is online
//            across stages. Tiles wholly in a row block's future are skipped.
//   group    (decode group, kv head, chunk of members): decodes whose first blocks are the same (a prefix shared
//            through the prefix cache, at least GROUP_MIN_SEQS of them over GROUP_MIN_SHARED positions) attend
//            those positions as a prefill stage does, every member's query heads against keys staged once; each
//            member's own positions then go as in decode, and the two parts merge by their maxima. For 64
//            decodes sharing 512 of 600 positions this took 0.78-0.9x the time of a pass per member.
// The G = H/KVH query heads of a kv head are always processed together so each K/V row is read once.
// Accumulation is in float32 for both dtypes. On CPUs with AVX512-BF16, bfloat16 prefill runs both products on
// vdpbf16ps (prefill_dp: about 1.3x the float path's speed). bfloat16 decode does so when asked (dp_decode,
// decode_dp): on Zen 4 it measured level with the float path with the KV in DRAM and 10-15% faster with it in
// cache (a shared prefix); on an AMX Xeon an earlier dot-product decode measured slower, so the caller decides.
// On CPUs with AMX-BF16, when asked (amx_prefill), bfloat16 prefill items and the shared part of decode groups run
// both products on the tile unit instead (prefill_amx, group_shared_amx; heads of 32 or 64): 1.7-2.8x torch's SDPA
// on a layer's 8 x 256 prompt tokens. Decode stays on vectors there: it waits on memory, and a tile version was no faster.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

#include "vec.h"

constexpr int W = VW;   // floats per vector (vec.h: 16 on AVX-512, else 8), and keys per tile
constexpr int MAX_NV = 256 / W;  // head_dim up to 256

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
const vi IOTA = iota();

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf loadv(const float* p) { return loadu(p); }
inline vf loadv(const c10::BFloat16* p) { return widen_bf16(p); }
inline void store_row(float* dst, const float* src, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }
// Rounded to nearest even as c10::BFloat16 rounds (NaN to its quiet NaN), a vector at a time (d is a multiple of W):
// the scalar conversion per element took about a third of a bfloat16 prefill item's time.
inline void store_row(c10::BFloat16* dst, const float* src, int64_t d) {
  for (int64_t i = 0; i < d; i += W) {
    const vf v = loadu(src + i);
    const vu u = std::bit_cast<vu>(v);
    const vu r = v != v ? vu{} + 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vh h = __builtin_convertvector(r, vh);
    std::memcpy(dst + i, &h, sizeof h);
  }
}

inline float hmax(vf v) {
  auto a = NIMBUS_LO(v), b = NIMBUS_HI(v);
  a = a > b ? a : b;
#if NIMBUS_VW == 16
  auto c = __builtin_shufflevector(a, a, 0, 1, 2, 3), e = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = c > e ? c : e;
#else
  auto c = a;
#endif
  return std::max(std::max(c[0], c[1]), std::max(c[2], c[3]));
}

struct Problem {
  const void* q;
  void* out;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* query_start;
  const int32_t* context_lens;
  int64_t q_token_stride, q_head_stride, out_token_stride, out_head_stride;
  int64_t table_stride, block_size, kv_heads, group, head_dim;
  float scale;
  bool dp_decode;  // bfloat16 decode on vdpbf16ps where the build has it (decode_dp)
  bool amx_prefill;  // bfloat16 prefill and decode groups' shared part on AMX tiles, where build, CPU and shapes allow
};

struct Item {
  int32_t seq, head_begin, head_end;  // kv heads [head_begin, head_end)
  int32_t q_begin, q_end;             // query tokens, relative to the sequence's first query row (in a group
                                      // item: members [q_begin, q_end) of the group)
  int64_t cost;                       // keys scanned x query heads x tokens, to hand out the longest first
  int32_t group = -1;                 // a decode group (below), else -1
};

// Decodes whose first `shared` positions lie in the same blocks (a common prefix, shared through the prefix
// cache): their attention over those positions is one small matrix product per kv head, every member's query
// heads against keys staged once, instead of one pass over the same keys per member.
struct Group {
  std::vector<int32_t> seqs;
  int64_t shared;
};

// Per-thread scratch, grown on demand and reused across calls and layers.
struct Scratch {
  std::vector<float> q, acc, s, kt, v, max, sum;
  std::vector<int64_t> rows;
  static void fit(std::vector<float>& x, int64_t n) {
    if (x.size() < size_t(n)) x.resize(n);
  }
};

// Element offsets (into one layer's key or value pool, kv head 0) of the rows of positions k0 .. k0+n-1.
inline void tile_rows(const Problem& P, const int32_t* table, int64_t k0, int64_t n, int64_t* rows) {
  int64_t block = k0 / P.block_size, offset = k0 % P.block_size;
  const int64_t row = P.kv_heads * P.head_dim;
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = (int64_t(table[block]) * P.block_size + offset) * row;
    if (++offset == P.block_size) offset = 0, ++block;
  }
}

// Asks for the rows of kv heads [h0, h1) at the given positions: contiguous within a position, and within a
// block when the item covers every head, so the hardware gets whole lines early.
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* rows, int64_t n, int64_t h0, int64_t h1, int64_t d) {
  const int64_t bytes = (h1 - h0) * d * int64_t(sizeof(T));
  for (int64_t j = 0; j < n; ++j) {
    const char* p = reinterpret_cast<const char*>(base + rows[j] + h0 * d);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
  }
}

// lane j of the result = the sum of the lanes of d[j]: W dot products finished with 2(W - 1) shuffles
// instead of W horizontal sums.
#if NIMBUS_VW == 16
inline vf reduce_lanes(const vf* d) {
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // a[i]: lanes 0-7 partials of d[2i], 8-15 of d[2i+1]
    a[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  for (int i = 0; i < 4; ++i)  // b[i]: lanes 4k..4k+3 partials of d[4i+k]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // c[i]: lanes 2k, 2k+1 partials of d[8i+k]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
inline vf reduce_lanes(const vf* d) {
  vf a[4], b[2];
  for (int i = 0; i < 4; ++i)  // a[i]: lanes 0-3 partials of d[2i], 4-7 of d[2i+1]
    a[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)  // b[i]: lanes 2k, 2k+1 partials of d[4i+k]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif

#ifdef __AVX512F__
// exp(x) for softmax weights that are rounded to bfloat16 (8 significant bits) right after (prefill_dp, prefill_amx):
// 2^f on [-0.5, 0.5] by a degree-4 polynomial (relative error 2.7e-6, fitted here) and vscalefps for the power of
// two, which also takes very negative x to zero without the clamps of vexp. Half vexp's instructions.
inline __m512 exp_weights(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009560510516166687f), f, _mm512_set1_ps(0.05591703951358795f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024981260299683f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219696998596f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999991655349731f));
  return _mm512_scalef_ps(p, n);
}

#endif

// Softmax of one row's scores s[0, n) in place, padded with zeros to the next multiple of W; returns the sum of
// the exponentials (s is left unnormalised: the caller divides once at the end). `Rounded`: the caller rounds the
// weights to bfloat16, so where there is AVX-512 they take exp_weights, half vexp's instructions (a bfloat16 prefill
// layer of 8 x 256 tokens on the Zen 4: docs/benchmarks.md, fourteenth pass).
template <bool Rounded = false>
inline float exp_row(float* s, int64_t n, float& row_max) {
  vf m = splat(NEG_INF);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf x = loadu(s + j);
    m = x > m ? x : m;
  }
  if (j < n) {
    const vf x = IOTA < int(n - j) ? loadu(s + j) : splat(NEG_INF);
    m = x > m ? x : m;
  }
  row_max = hmax(m);
  vf sum{};
  for (j = 0; j < n; j += W) {
    vf e;
#ifdef __AVX512F__
    if constexpr (Rounded) e = std::bit_cast<vf>(exp_weights(std::bit_cast<__m512>(loadu(s + j) - row_max)));
    else
#endif
      e = vexp(loadu(s + j) - row_max);
    e = IOTA < int(n - j) ? e : vf{};
    sum += e;
    storeu(s + j, e);
  }
  return hsum(sum);
}

// Decode reads K and V rows from memory once each, one kv head's row at a time; each row read asks for the
// same head's row AHEAD positions later, which keeps a steady number of lines in flight. The requests go to L2
// (prefetcht1), two blocks ahead: prefetcht0 one block ahead left decode waiting on memory, likely because L1
// has few miss buffers (on Zen 4, 64 decodes at context 320 from DRAM: 0.64-0.82 ms a layer against 0.88-1.28
// with prefetcht0 and 16 positions, docs/benchmarks.md).
constexpr int AHEAD = 32;

template <typename T>
inline void prefetch_row(const T* p, int nv) {
  for (int64_t b = 0; b < nv * W * int64_t(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 2);
}

// The first AHEAD positions of a pass, kv heads [h0, h1) (adjacent in a pool row), asked for at once before the
// pass needs them: the pass's own requests only start AHEAD positions in. decode_dp does this for its K pass: on
// the Zen 4, 64 decodes at context 320 from DRAM took 0.62-0.69 ms a layer against 0.64-0.90 (six alternating
// runs each); the same for its V pass, and for the float path in float32, measured no gain.
template <typename T>
inline void prefetch_start(const T* c, const int64_t* rows, int64_t ctx, int64_t h0, int64_t h1, int64_t d) {
  const int64_t bytes = (h1 - h0) * d * int64_t(sizeof(T));
  for (int64_t j = 0; j < std::min<int64_t>(AHEAD, ctx); ++j)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(c + rows[j] + h0 * d) + b, 0, 2);
}

// Decode rows: scores of R query heads (sharing a kv head) against up to W keys; q rows are pre-scaled floats.
template <typename T, int NV, int R>
inline void decode_scores(const T* kc, const int64_t* rows, int64_t n, int64_t hoff, const float* q, int nv,
                          float* s, int64_t s_stride, int64_t n_ahead) {
  vf qr[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < nv; ++c) qr[r][c] = loadu(q + (r * nv + c) * W);
  if constexpr (R == 1 && W == 8) {
    // one row against the tile's keys side by side: W independent accumulator chains (the row-by-row form below
    // runs one chain of nv dependent multiply-adds per key); past n, the last key again (its lanes are not read)
    const T* kr[W];
    for (int j = 0; j < W; ++j) {
      kr[j] = kc + rows[j < n ? j : n - 1] + hoff;
      if (j < n_ahead) prefetch_row(kc + rows[j + AHEAD] + hoff, nv);
    }
    vf dd[W];
    for (int j = 0; j < W; ++j) dd[j] = qr[0][0] * loadv(kr[j]);
    for (int c = 1; c < nv; ++c)
      for (int j = 0; j < W; ++j) dd[j] += qr[0][c] * loadv(kr[j] + c * W);
    storeu(s, reduce_lanes(dd));
    return;
  }
  vf dots[R][W];
  for (int64_t j = 0; j < n; ++j) {
    vf k[NV];
    if (j < n_ahead) prefetch_row(kc + rows[j + AHEAD] + hoff, nv);
    for (int c = 0; c < nv; ++c) k[c] = loadv(kc + rows[j] + hoff + c * W);
    for (int r = 0; r < R; ++r) {
      vf d = qr[r][0] * k[0];
      for (int c = 1; c < nv; ++c) d += qr[r][c] * k[c];
      dots[r][j] = d;
    }
  }
  for (int64_t j = n; j < W; ++j)
    for (int r = 0; r < R; ++r) dots[r][j] = vf{};
  for (int r = 0; r < R; ++r) storeu(s + r * s_stride, reduce_lanes(dots[r]));
}

template <typename T, int NV, int R>
inline void decode_values(const T* vc, const int64_t* rows, int64_t n, int64_t hoff, const float* p,
                          int64_t p_stride, int nv, float* acc, int64_t n_ahead) {
  vf a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < nv; ++c) a[r][c] = loadu(acc + (r * nv + c) * W);
  for (int64_t j = 0; j < n; ++j) {
    vf v[NV];
    if (j < n_ahead) prefetch_row(vc + rows[j + AHEAD] + hoff, nv);
    for (int c = 0; c < nv; ++c) v[c] = loadv(vc + rows[j] + hoff + c * W);
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * p_stride + j];
      for (int c = 0; c < nv; ++c) a[r][c] += pr * v[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < nv; ++c) storeu(acc + (r * nv + c) * W, a[r][c]);
}

// rows per register block in the decode loops: q (or acc) rows of NV vectors plus one K/V row fit the vector
// registers (32 on AVX-512, 16 on AVX2)
template <int NV>
constexpr int decode_rows_per_block() {
  if constexpr (VREGS == 32) return NV <= 4 ? 4 : NV <= 8 ? 2 : 1;
  else return NV <= 2 ? 4 : NV <= 4 ? 2 : 1;
}

// Calls f.operator()<R>() with the largest R <= min(RMAX, n) from {8, 6, 4, 3, 2, 1}; returns R.
template <int RMAX, typename F>
inline int64_t with_rows(int64_t n, F&& f) {
  if constexpr (RMAX >= 8)
    if (n >= 8) return f.template operator()<8>(), 8;
  if constexpr (RMAX >= 6)
    if (n >= 6) return f.template operator()<6>(), 6;
  if constexpr (RMAX >= 4)
    if (n >= 4) return f.template operator()<4>(), 4;
  if constexpr (RMAX >= 3)
    if (n == 3) return f.template operator()<3>(), 3;
  if constexpr (RMAX >= 2)
    if (n >= 2) return f.template operator()<2>(), 2;
  return f.template operator()<1>(), 1;
}

// Decode: one query token, the G query heads of each kv head in [head_begin, head_end). Two passes over the
// context: scores for every key (K read once, position by position across the heads), softmax over whole
// rows, then the weighted sum of V (read once). Scores for a whole context fit the scratch easily.
template <typename Q, typename T, int NVC>
void decode(const Problem& P, const Item& it, Scratch& S) {
  const int nv = NVC ? NVC : int(P.head_dim / W);
  constexpr int NV = NVC ? NVC : MAX_NV;
  constexpr int R = NVC ? decode_rows_per_block<NVC>() : 1;
  const int64_t d = P.head_dim, G = P.group, h0 = it.head_begin, h1 = it.head_end;
  const int64_t heads = (h1 - h0) * G, row = P.query_start[it.seq], ctx = P.context_lens[it.seq];
  const int64_t stride = (ctx + W - 1) / W * W;
  Scratch::fit(S.q, heads * d);
  Scratch::fit(S.acc, heads * d);
  Scratch::fit(S.s, heads * stride);
  if (S.rows.size() < size_t(stride)) S.rows.resize(stride);
  const Q* q = static_cast<const Q*>(P.q) + row * P.q_token_stride;
  for (int64_t i = 0; i < heads; ++i)
    for (int c = 0; c < nv; ++c)
      storeu(S.q.data() + i * d + c * W, loadv(q + (h0 * G + i) * P.q_head_stride + c * W) * P.scale);
  std::fill_n(S.acc.data(), heads * d, 0.0f);
  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  int64_t* rows = S.rows.data();
  tile_rows(P, P.block_tables + it.seq * P.table_stride, 0, ctx, rows);

  for (int64_t k0 = 0; k0 < ctx; k0 += W) {
    const int64_t n = std::min<int64_t>(W, ctx - k0);
    const int64_t ahead = std::clamp<int64_t>(ctx - k0 - AHEAD, 0, n);
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t g = 0; g < G;) {
        const int64_t i = (h - h0) * G + g;
        float* s = S.s.data() + i * stride + k0;
        const float* qi = S.q.data() + i * d;
        g += with_rows<R>(G - g, [&]<int RR>() { decode_scores<T, NV, RR>(kc, rows + k0, n, h * d, qi, nv, s, stride, ahead); });
      }
  }
  float* inv = S.q.data();  // q is spent: reuse it for the rows' 1 / sum
  for (int64_t i = 0; i < heads; ++i) {
    float m;
    inv[i] = 1.0f / exp_row(S.s.data() + i * stride, ctx, m);
  }
  for (int64_t k0 = 0; k0 < ctx; k0 += W) {
    const int64_t n = std::min<int64_t>(W, ctx - k0);
    const int64_t ahead = std::clamp<int64_t>(ctx - k0 - AHEAD, 0, n);
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t g = 0; g < G;) {
        const int64_t i = (h - h0) * G + g;
        const float* p = S.s.data() + i * stride + k0;
        g += with_rows<R>(G - g, [&]<int RR>() {
          decode_values<T, NV, RR>(vc, rows + k0, n, h * d, p, stride, nv, S.acc.data() + i * d, ahead);
        });
      }
  }
  Q* out = static_cast<Q*>(P.out) + row * P.out_token_stride;
  alignas(64) float buf[MAX_NV * W];
  for (int64_t i = 0; i < heads; ++i) {
    for (int c = 0; c < nv; ++c) storeu(buf + c * W, loadu(S.acc.data() + i * d + c * W) * inv[i]);
    store_row(out + (h0 * G + i) * P.out_head_stride, buf, d);
  }
}

constexpr int QT = 32;   // query tokens per prefill item
// per prefill item on AMX (prefill_amx): each item stages its keys, so longer items stage fewer times (8 x 256
// tokens, one layer: 1.55-1.65 ms with 128, 1.85-1.92 with 32)
constexpr int AMX_QT = 128;
constexpr int KC = 256;  // keys staged per pass of a prefill item (a multiple of W)
constexpr int RQ = 8;    // rows per block of the bfloat16 dot-product score product (prefill_dp)
#ifdef __AVX512F__
#define NIMBUS_PIN(v) asm("" : "+v"(v))
#else
#define NIMBUS_PIN(v) asm("" : "+x"(v))
#endif
// Register blocking of the two small matrix products (prefill stages, and the shared prefix of a decode group):
// scores take SR rows x ST key tiles of accumulators, with ST tile vectors and a broadcast of q beside them, so
// each tile vector loaded serves SR rows (one tile vector per row, as before, left the loads outnumbering the
// multiply-adds); values take VR rows x VC column vectors, with VC V vectors and a broadcast weight.
constexpr int SR = VREGS == 32 ? 8 : 6;
constexpr int ST = VREGS == 32 ? 3 : 2;
constexpr int VR = 6;
constexpr int VC = VREGS == 32 ? 4 : 2;

// s[r][t * W + j] = q[r] . key j of tile t, for R rows (stride d) against TN transposed key tiles kt ([d][W] each).
template <int R, int TN>
inline void score_tiles(const float* q, int64_t d, const float* kt, float* s, int64_t s_stride) {
  vf a[R][TN] = {};
  for (int64_t i = 0; i < d; ++i) {
    vf k[TN];
    for (int t = 0; t < TN; ++t) {
      k[t] = loadu(kt + (t * d + i) * W);
      NIMBUS_PIN(k[t]);  // one load per tile vector, kept in a register for the R rows
    }
    for (int r = 0; r < R; ++r) {
      const float x = q[r * d + i];
      for (int t = 0; t < TN; ++t) a[r][t] += x * k[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TN; ++t) storeu(s + r * s_stride + t * W, a[r][t]);
}

// Scores of R rows against key tiles [0, tiles).
template <int R>
inline void score_rows(const float* q, int64_t d, const float* kt, int64_t tiles, float* s, int64_t s_stride) {
  int64_t t = 0;
  for (; t + ST <= tiles; t += ST) score_tiles<R, ST>(q, d, kt + t * d * W, s + t * W, s_stride);
  for (; t < tiles; ++t) score_tiles<R, 1>(q, d, kt + t * d * W, s + t * W, s_stride);
}

// acc[r][0, CN * W) += sum_j p[r][j] v[j][0, CN * W) over nk float V rows (stride d), R rows at once.
template <int R, int CN>
inline void value_cols(const float* p, int64_t p_stride, const float* v, int64_t d, int64_t nk, float* acc) {
  vf a[R][CN];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CN; ++c) a[r][c] = loadu(acc + r * d + c * W);
  for (int64_t j = 0; j < nk; ++j) {
    vf vv[CN];
    for (int c = 0; c < CN; ++c) {
      vv[c] = loadu(v + j * d + c * W);
      NIMBUS_PIN(vv[c]);  // one load per V vector for the R rows, not one memory operand per row
    }
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * p_stride + j];
      for (int c = 0; c < CN; ++c) a[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CN; ++c) storeu(acc + r * d + c * W, a[r][c]);
}

// acc[r] += sum_j p[r][j] v[j] for R rows over all nv column vectors, VC at a time.
template <int R>
inline void value_rows(const float* p, int64_t p_stride, const float* v, int64_t d, int64_t nk, int nv, float* acc) {
  int c = 0;
  for (; c + VC <= nv; c += VC) value_cols<R, VC>(p, p_stride, v + c * W, d, nk, acc + c * W);
  switch (nv - c) {
    case 0: return;
    case 1: return value_cols<R, 1>(p, p_stride, v + c * W, d, nk, acc + c * W);
    case 2: return value_cols<R, 2>(p, p_stride, v + c * W, d, nk, acc + c * W);
  }
  if constexpr (VC > 3) value_cols<R, 3>(p, p_stride, v + c * W, d, nk, acc + c * W);
}

// Stages keys [0, cn) of one kv head (element offset hoff in each row) into float scratch: K transposed per tile
// of W keys (kt[tile][i][j]), V as rows, both zero past cn up to a whole tile.
template <typename T>
inline void stage_keys(const T* kc, const T* vc, const int64_t* rows, int64_t cn, int64_t hoff, int64_t d, int nv,
                       float* kt, float* v) {
  const int64_t tiles = (cn + W - 1) / W;
  constexpr int64_t ahead = 16;  // positions: the rows lie in blocks scattered over the pool
  for (int64_t j = 0; j < tiles * W; ++j) {
    float* ktile = kt + (j / W) * d * W;
    const int64_t lane = j % W;
    if (j + ahead < cn) {
      const char* kp = reinterpret_cast<const char*>(kc + rows[j + ahead] + hoff);
      const char* vp = reinterpret_cast<const char*>(vc + rows[j + ahead] + hoff);
      for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) __builtin_prefetch(kp + b), __builtin_prefetch(vp + b);
    }
    if (j < cn) {
      const T* krow = kc + rows[j] + hoff;
      const T* vrow = vc + rows[j] + hoff;
      for (int c = 0; c < nv; ++c) {
        alignas(64) float k[W];
        storeu(k, loadv(krow + c * W));
        for (int i = 0; i < W; ++i) ktile[(c * W + i) * W + lane] = k[i];
        storeu(v + j * d + c * W, loadv(vrow + c * W));
      }
    } else {
      for (int64_t i = 0; i < d; ++i) ktile[i * W + lane] = 0.0f;
      std::fill_n(v + j * d, d, 0.0f);
    }
  }
}

// One stage's online-softmax update of a prefill row: exponentiates its visible scores in place (zeros up to
// `width`, where the value product reads), rescales the row's accumulator when this stage raised its maximum, and
// returns the factor this stage's weights still need (1 unless an earlier stage saw a larger score).
template <bool Rounded = false>
inline float online_softmax(float* sr, int64_t vis, int64_t width, float& row_max, float& row_sum, float* acc,
                            int64_t d) {
  float m;
  const float total = exp_row<Rounded>(sr, vis, m);
  std::fill(sr + vis, sr + width, 0.0f);
  const float new_max = std::max(row_max, m);
  float f = 1.0f;
  if (new_max != m) {  // an earlier stage saw a larger score: this stage is scaled down to the running max
    f = std::exp(m - new_max);
    row_sum += total * f;
  } else {
    const float corr = std::exp(row_max - new_max);  // 0 on the first stage
    for (int64_t c = 0; c < d; c += W) storeu(acc + c, loadu(acc + c) * corr);
    row_sum = row_sum * corr + total;
  }
  row_max = new_max;
  return f;
}

// Prefill: up to QT query tokens of one sequence x the G heads of one kv head, causal (row = token * G + g).
// Keys are staged KC at a time into float scratch (K transposed in tiles of W, V as rows), shared by every row;
// then scores for all rows (a small matrix product), one online-softmax update per row per stage, and the
// weighted sum of V (another small matrix product). Tiles wholly in a row block's future are skipped.
template <typename Q, typename T, int NVC>
void prefill(const Problem& P, const Item& it, Scratch& S) {
  const int nv = NVC ? NVC : int(P.head_dim / W);
  const int64_t d = P.head_dim, G = P.group, kv_head = it.head_begin;
  const int64_t first_row = P.query_start[it.seq] + it.q_begin;
  const int64_t q_len = P.query_start[it.seq + 1] - P.query_start[it.seq];
  const int64_t first_pos = P.context_lens[it.seq] - q_len + it.q_begin;  // this item's first token
  const int64_t tokens = it.q_end - it.q_begin, nrows = tokens * G;
  Scratch::fit(S.q, nrows * d);
  Scratch::fit(S.acc, nrows * d);
  Scratch::fit(S.s, nrows * KC);
  Scratch::fit(S.kt, KC * d);
  Scratch::fit(S.v, KC * d);
  Scratch::fit(S.max, nrows);
  Scratch::fit(S.sum, nrows);
  if (S.rows.size() < size_t(KC)) S.rows.resize(KC);
  const int64_t head0 = kv_head * G;
  const Q* q = static_cast<const Q*>(P.q);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const Q* src = q + (first_row + t) * P.q_token_stride + (head0 + g) * P.q_head_stride;
      for (int c = 0; c < nv; ++c) storeu(S.q.data() + (t * G + g) * d + c * W, loadv(src + c * W) * P.scale);
    }
  std::fill_n(S.acc.data(), nrows * d, 0.0f);
  std::fill_n(S.max.data(), nrows, NEG_INF);
  std::fill_n(S.sum.data(), nrows, 0.0f);

  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  const int32_t* table = P.block_tables + int64_t(it.seq) * P.table_stride;
  const int64_t key_end = first_pos + tokens;  // keys [0, key_end) are visible to some row
  int64_t* rows = S.rows.data();
  for (int64_t c0 = 0; c0 < key_end; c0 += KC) {
    const int64_t cn = std::min<int64_t>(KC, key_end - c0), tiles = (cn + W - 1) / W;
    tile_rows(P, table, c0, cn, rows);
    float* kt = S.kt.data();
    float* v = S.v.data();
    stage_keys(kc, vc, rows, cn, kv_head * d, d, nv, kt, v);
    // rows whose token sees at least one key of this stage
    const int64_t r_begin = std::max<int64_t>(0, c0 - first_pos) * G;
    auto visible = [&](int64_t r) { return std::min<int64_t>(cn, first_pos + r / G - c0 + 1); };
    float* s = S.s.data();
    for (int64_t r0 = r_begin; r0 < nrows;) {
      const int64_t nr = std::min<int64_t>(SR, nrows - r0);
      const int64_t need = (visible(r0 + nr - 1) + W - 1) / W;  // the block's last row sees the most keys
      r0 += with_rows<SR>(nr, [&]<int RR>() { score_rows<RR>(S.q.data() + r0 * d, d, kt, need, s + r0 * KC, KC); });
    }
    for (int64_t r = r_begin; r < nrows; ++r) {
      const int64_t vis = visible(r);
      float* sr = s + r * KC;
      const float f = online_softmax(sr, vis, tiles * W, S.max[r], S.sum[r], S.acc.data() + r * d, d);
      if (f != 1.0f)
        for (int64_t j = 0; j < vis; ++j) sr[j] *= f;
    }
    for (int64_t r0 = r_begin; r0 < nrows;) {
      const int64_t nr = std::min<int64_t>(VR, nrows - r0);
      const int64_t nk = visible(r0 + nr - 1);  // only a block's last row can see the most keys
      float* acc = S.acc.data() + r0 * d;
      r0 += with_rows<VR>(nr, [&]<int RR>() { value_rows<RR>(s + r0 * KC, KC, v, d, nk, nv, acc); });
    }
  }
  Q* out = static_cast<Q*>(P.out);
  alignas(64) float buf[MAX_NV * W];
  for (int64_t r = 0; r < nrows; ++r) {
    const float* a = S.acc.data() + r * d;
    const float inv = 1.0f / S.sum[r];
    for (int c = 0; c < nv; ++c) storeu(buf + c * W, loadu(a + c * W) * inv);
    store_row(out + (first_row + r / G) * P.out_token_stride + (head0 + r % G) * P.out_head_stride, buf, d);
  }
}

#ifdef __AVX512BF16__
inline __m512bh load32bh(const c10::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
}

// The value product's accumulators for dimension block b are lo = a[2b], hi = a[2b + 1]: lane 4L + k of lo holds
// dimension 8L + k of the block, of hi 8L + 4 + k (the order unpacklo/unpackhi leave). Here the block's dimensions
// 0-15 (x) and 16-31 (y) from them, in order.
inline void dp_block_order(__m512 lo, __m512 hi, __m512& x, __m512& y) {
  x = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23), hi);
  y = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31), hi);
}

// The block's 32 outputs from those accumulators, times inv, rounded to bfloat16 (nearest even), in dimension order.
inline void store_dp_block(c10::BFloat16* o, __m512 lo, __m512 hi, float inv) {
  __m512 x, y;
  dp_block_order(lo, hi, x, y);
  const __m512 scale = _mm512_set1_ps(inv);
  _mm512_storeu_si512(o, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_mul_ps(y, scale),
                                                                        _mm512_mul_ps(x, scale))));  // x low
}
#endif

#ifdef __AVX512BF16__
// bfloat16 prefill on AVX512-BF16: the same stages as `prefill`, with both small products on vdpbf16ps (two
// products a lane, float32 sums). K is staged as dimension pairs per key tile, V as key pairs (rows j and j+1
// interleaved, in the lane order unpacklo/unpackhi give), the softmax weights rounded to bfloat16 for the value
// product as a bfloat16 P V matrix multiply rounds them. q is used as stored; scores are scaled afterwards.
template <int R>
inline void score_block_dp(const c10::BFloat16* q, int64_t d, const c10::BFloat16* kt2, float scale, float* s,
                           int64_t s_stride) {
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 2) {
    const __m512bh k = load32bh(kt2 + i * W);  // W keys x dimensions (i, i + 1)
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * d + i, sizeof pair);
      a[r] = _mm512_dpbf16_ps(a[r], k, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + r * s_stride, _mm512_mul_ps(a[r], _mm512_set1_ps(scale)));
}

// a[r] += the interleaved value rows vv of keys j and j + 1, weighted by row r's pair of weights at p + r * stride
// (zero past what the row sees: its weights are padded with zeros)
template <int NB, int R>
inline void accumulate_pair(__m512 (&a)[R][2 * NB], const __m512bh (&vv)[2 * NB], const c10::BFloat16* p,
                            int64_t p_stride) {
  for (int r = 0; r < R; ++r) {
    int32_t pair;
    std::memcpy(&pair, p + r * p_stride, sizeof pair);
    const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
    for (int b = 0; b < 2 * NB; ++b) a[r][b] = _mm512_dpbf16_ps(a[r][b], vv[b], w);
  }
}

template <int NB, int R>
inline void value_block_dp(const c10::BFloat16* p, int64_t p_stride, const c10::BFloat16* v2, int64_t nk,
                           float* acc, int64_t d) {
  __m512 a[R][2 * NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * NB; ++b) a[r][b] = _mm512_loadu_ps(acc + r * d + b * W);
  for (int64_t j = 0; j < nk; j += 2) {
    __m512bh vv[2 * NB];
    for (int b = 0; b < 2 * NB; ++b) vv[b] = load32bh(v2 + (j / 2 * 2 * NB + b) * 32);
    accumulate_pair<NB, R>(a, vv, p + j, p_stride);
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * NB; ++b) _mm512_storeu_ps(acc + r * d + b * W, a[r][b]);
}

template <int NB>
void prefill_dp(const Problem& P, const Item& it, Scratch& S) {
  using T = c10::BFloat16;
  constexpr int RV = NB <= 1 ? 8 : NB <= 2 ? 6 : 2;
  const int64_t d = P.head_dim, G = P.group, kv_head = it.head_begin;
  const int64_t first_row = P.query_start[it.seq] + it.q_begin;
  const int64_t q_len = P.query_start[it.seq + 1] - P.query_start[it.seq];
  const int64_t first_pos = P.context_lens[it.seq] - q_len + it.q_begin;
  const int64_t tokens = it.q_end - it.q_begin, nrows = tokens * G;
  // bfloat16 scratch lives in the float vectors, two to a slot
  Scratch::fit(S.q, nrows * d / 2);
  Scratch::fit(S.acc, nrows * d);
  Scratch::fit(S.s, nrows * KC + nrows * KC / 2);
  Scratch::fit(S.kt, KC * d / 2);
  Scratch::fit(S.v, KC * d / 2);
  Scratch::fit(S.max, nrows);
  Scratch::fit(S.sum, nrows);
  if (S.rows.size() < size_t(KC)) S.rows.resize(KC);
  T* hq = reinterpret_cast<T*>(S.q.data());
  const int64_t head0 = kv_head * G;
  const T* q = static_cast<const T*>(P.q);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < G; ++g)
      std::memcpy(hq + (t * G + g) * d, q + (first_row + t) * P.q_token_stride + (head0 + g) * P.q_head_stride,
                  d * sizeof(T));
  std::fill_n(S.acc.data(), nrows * d, 0.0f);
  std::fill_n(S.max.data(), nrows, NEG_INF);
  std::fill_n(S.sum.data(), nrows, 0.0f);

  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  const int32_t* table = P.block_tables + int64_t(it.seq) * P.table_stride;
  const int64_t key_end = first_pos + tokens;
  int64_t* rows = S.rows.data();
  float* s = S.s.data();
  T* hp = reinterpret_cast<T*>(S.s.data() + nrows * KC);  // the weights in bfloat16, rows of KC
  int32_t* kt2 = reinterpret_cast<int32_t*>(S.kt.data());  // [tile][d / 2][W] dimension pairs
  T* v2 = reinterpret_cast<T*>(S.v.data());                // [key pair][2 * NB vectors of 32]
  for (int64_t c0 = 0; c0 < key_end; c0 += KC) {
    const int64_t cn = std::min<int64_t>(KC, key_end - c0), tiles = (cn + W - 1) / W;
    tile_rows(P, table, c0, cn, rows);
    for (int64_t j = 0; j < tiles * W; ++j) {
      int32_t* ktile = kt2 + (j / W) * (d / 2) * W;
      const int64_t lane = j % W;
      if (j < cn) {
        const int32_t* krow = reinterpret_cast<const int32_t*>(kc + rows[j] + kv_head * d);
        for (int64_t i = 0; i < d / 2; ++i) ktile[i * W + lane] = krow[i];
      } else {
        for (int64_t i = 0; i < d / 2; ++i) ktile[i * W + lane] = 0;
      }
    }
    for (int64_t j = 0; j < tiles * W; j += 2) {
      for (int b = 0; b < NB; ++b) {
        const __m512i x = j < cn ? _mm512_loadu_si512(vc + rows[j] + kv_head * d + b * 32) : _mm512_setzero_si512();
        const __m512i y =
            j + 1 < cn ? _mm512_loadu_si512(vc + rows[j + 1] + kv_head * d + b * 32) : _mm512_setzero_si512();
        _mm512_storeu_si512(v2 + (j / 2 * 2 * NB + 2 * b) * 32, _mm512_unpacklo_epi16(x, y));
        _mm512_storeu_si512(v2 + (j / 2 * 2 * NB + 2 * b + 1) * 32, _mm512_unpackhi_epi16(x, y));
      }
    }
    const int64_t r_begin = std::max<int64_t>(0, c0 - first_pos) * G;
    auto visible = [&](int64_t r) { return std::min<int64_t>(cn, first_pos + r / G - c0 + 1); };
    for (int64_t r0 = r_begin; r0 < nrows;) {
      const int64_t nr = std::min<int64_t>(RQ, nrows - r0);
      const int64_t need = (visible(r0 + nr - 1) + W - 1) / W;
      for (int64_t ti = 0; ti < need; ++ti) {
        const T* ktile = reinterpret_cast<const T*>(kt2 + ti * (d / 2) * W);
        float* sb = s + r0 * KC + ti * W;
        if (nr == RQ) {
          score_block_dp<RQ>(hq + r0 * d, d, ktile, P.scale, sb, KC);
        } else {
          for (int64_t r = 0; r < nr; ++r) score_block_dp<1>(hq + (r0 + r) * d, d, ktile, P.scale, sb + r * KC, KC);
        }
      }
      r0 += nr;
    }
    for (int64_t r = r_begin; r < nrows; ++r) {
      float* sr = s + r * KC;
      const float f = online_softmax<true>(sr, visible(r), tiles * W, S.max[r], S.sum[r], S.acc.data() + r * d, d);
      for (int64_t j = 0; j < tiles * W; j += W)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hp + r * KC + j),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sr + j) * f)));
    }
    for (int64_t r0 = r_begin; r0 < nrows;) {
      const int64_t nr = std::min<int64_t>(RV, nrows - r0);
      const int64_t nk = visible(r0 + nr - 1);
      float* acc = S.acc.data() + r0 * d;
      r0 += with_rows<RV>(nr, [&]<int RR>() { value_block_dp<NB, RR>(hp + r0 * KC, KC, v2, nk, acc, d); });
    }
  }
  T* out = static_cast<T*>(P.out);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* a = S.acc.data() + r * d;
    T* o = out + (first_row + r / G) * P.out_token_stride + (head0 + r % G) * P.out_head_stride;
    for (int b = 0; b < NB; ++b)
      store_dp_block(o + 32 * b, _mm512_loadu_ps(a + 2 * b * W), _mm512_loadu_ps(a + (2 * b + 1) * W), 1.0f / S.sum[r]);
  }
}
#endif

#ifdef __AVX512BF16__
// bfloat16 decode on vdpbf16ps: the stages of `decode` (K pass, softmax, V pass, the same prefetch), with both
// products on two-products-a-lane dot instructions over the rows as stored, so no row is widened to float. Scores:
// a K row's NB vectors of 32 against the query head's (q as stored; scaled after the lane sums). Values: rows j
// and j + 1 interleaved by unpacklo/unpackhi against the pair of their weights, rounded to bfloat16 as in
// `prefill_dp`; the sums come out in that lane order and are put back in place once at the end.
template <int NB, int R>
inline void decode_scores_dp(const c10::BFloat16* kc, const int64_t* rows, int64_t n, int64_t hoff,
                             const c10::BFloat16* q, int64_t d, float scale, float* s, int64_t s_stride,
                             int64_t n_ahead) {
  __m512bh qr[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) qr[r][b] = load32bh(q + r * d + b * 32);
  vf dots[R][W];
  for (int64_t j = 0; j < n; ++j) {
    if (j < n_ahead) prefetch_row(kc + rows[j + AHEAD] + hoff, 2 * NB);
    __m512bh k[NB];
    for (int b = 0; b < NB; ++b) k[b] = load32bh(kc + rows[j] + hoff + b * 32);
    for (int r = 0; r < R; ++r) {
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), k[0], qr[r][0]);
      for (int b = 1; b < NB; ++b) a = _mm512_dpbf16_ps(a, k[b], qr[r][b]);
      dots[r][j] = std::bit_cast<vf>(a);
    }
  }
  for (int64_t j = n; j < W; ++j)
    for (int r = 0; r < R; ++r) dots[r][j] = vf{};
  for (int r = 0; r < R; ++r) storeu(s + r * s_stride, reduce_lanes(dots[r]) * scale);
}

template <int NB, int R>
inline void decode_values_dp(const c10::BFloat16* vc, const int64_t* rows, int64_t n, int64_t hoff,
                             const c10::BFloat16* p, int64_t p_stride, float* acc, int64_t d, int64_t n_ahead) {
  __m512 a[R][2 * NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * NB; ++b) a[r][b] = _mm512_loadu_ps(acc + r * d + b * W);
  for (int64_t j = 0; j < n; j += 2) {
    if (j < n_ahead) prefetch_row(vc + rows[j + AHEAD] + hoff, 2 * NB);
    if (j + 1 < n_ahead) prefetch_row(vc + rows[j + 1 + AHEAD] + hoff, 2 * NB);
    __m512bh vv[2 * NB];
    for (int b = 0; b < NB; ++b) {
      const __m512i x = _mm512_loadu_si512(vc + rows[j] + hoff + b * 32);
      const __m512i y = j + 1 < n ? _mm512_loadu_si512(vc + rows[j + 1] + hoff + b * 32) : _mm512_setzero_si512();
      vv[2 * b] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(x, y));
      vv[2 * b + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(x, y));
    }
    accumulate_pair<NB, R>(a, vv, p + j, p_stride);
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * NB; ++b) _mm512_storeu_ps(acc + r * d + b * W, a[r][b]);
}

template <int NB>
void decode_dp(const Problem& P, const Item& it, Scratch& S) {
  using T = c10::BFloat16;
  constexpr int R = NB <= 2 ? 4 : 2;  // value rows: R x 2NB sums plus 2NB interleaved rows in the registers
  const int64_t d = P.head_dim, G = P.group, h0 = it.head_begin, h1 = it.head_end;
  const int64_t heads = (h1 - h0) * G, row = P.query_start[it.seq], ctx = P.context_lens[it.seq];
  const int64_t stride = (ctx + W - 1) / W * W;
  Scratch::fit(S.q, heads * d / 2);  // bfloat16 q, two to a float slot
  Scratch::fit(S.acc, heads * d);
  Scratch::fit(S.s, heads * stride + heads * stride / 2);  // float scores, then the weights in bfloat16
  if (S.rows.size() < size_t(stride)) S.rows.resize(stride);
  T* hq = reinterpret_cast<T*>(S.q.data());
  const T* q = static_cast<const T*>(P.q) + row * P.q_token_stride;
  for (int64_t i = 0; i < heads; ++i) std::memcpy(hq + i * d, q + (h0 * G + i) * P.q_head_stride, d * sizeof(T));
  std::fill_n(S.acc.data(), heads * d, 0.0f);
  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  int64_t* rows = S.rows.data();
  tile_rows(P, P.block_tables + it.seq * P.table_stride, 0, ctx, rows);
  float* s = S.s.data();
  T* hp = reinterpret_cast<T*>(s + heads * stride);
  prefetch_start(kc, rows, ctx, h0, h1, d);

  for (int64_t k0 = 0; k0 < ctx; k0 += W) {
    const int64_t n = std::min<int64_t>(W, ctx - k0);
    const int64_t ahead = std::clamp<int64_t>(ctx - k0 - AHEAD, 0, n);
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t g = 0; g < G;) {
        const int64_t i = (h - h0) * G + g;
        g += with_rows<R>(G - g, [&]<int RR>() {
          decode_scores_dp<NB, RR>(kc, rows + k0, n, h * d, hq + i * d, d, P.scale, s + i * stride + k0, stride, ahead);
        });
      }
  }
  float* inv = S.q.data();  // q is spent: reuse it for the rows' 1 / sum
  for (int64_t i = 0; i < heads; ++i) {
    float m;
    float* si = s + i * stride;
    inv[i] = 1.0f / exp_row(si, ctx, m);  // zero past ctx up to stride
    for (int64_t j = 0; j < stride; j += W)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hp + i * stride + j),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(si + j))));
  }
  for (int64_t k0 = 0; k0 < ctx; k0 += W) {
    const int64_t n = std::min<int64_t>(W, ctx - k0);
    const int64_t ahead = std::clamp<int64_t>(ctx - k0 - AHEAD, 0, n);
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t g = 0; g < G;) {
        const int64_t i = (h - h0) * G + g;
        g += with_rows<R>(G - g, [&]<int RR>() {
          decode_values_dp<NB, RR>(vc, rows + k0, n, h * d, hp + i * stride + k0, stride, S.acc.data() + i * d, d, ahead);
        });
      }
  }
  T* out = static_cast<T*>(P.out) + row * P.out_token_stride;
  for (int64_t i = 0; i < heads; ++i) {
    const float* a = S.acc.data() + i * d;
    T* o = out + (h0 * G + i) * P.out_head_stride;
    for (int b = 0; b < NB; ++b)
      store_dp_block(o + 32 * b, _mm512_loadu_ps(a + 2 * b * W), _mm512_loadu_ps(a + (2 * b + 1) * W), inv[i]);
  }
}
#endif

#ifdef __AMX_BF16__
// The AMX tile unit (CPUs with AMX-BF16): bfloat16 products of 16-row tiles, float32 sums. Here for prefill-shaped
// attention (many query rows against the same keys): prefill items and the shared part of decode groups. The keys
// are staged once per item into the layouts B tiles take (amx_stage), and each block of 16 query rows is one exact
// softmax over them (amx_row_block). Heads of 32 or 64 dimensions (KS = head_dim / 32); the caller checks.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per
// process; oneDNN asks the same for its own bfloat16 matmuls.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// out[c][r] = in[r][c] for a 16 x 16 matrix of 32-bit elements (rows `in_stride` bytes apart); out is 16 x 64 bytes.
inline void transpose16(const void* in, int64_t in_stride, int64_t n, void* out) {
  __m512i r[16], t[16];
  const char* base = static_cast<const char*>(in);
  for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_loadu_si512(base + i * in_stride) : _mm512_setzero_si512();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4b + k] now holds, in each 128-bit lane L, elements (rows 4b..4b+3) of column 4L + k
  const __m512i lo_idx = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi_idx = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i lo2 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i hi2 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  char* o = static_cast<char*>(out);
  for (int k = 0; k < 4; ++k) {
    // a = rows 0-7 (r[k], r[4 + k]), b = rows 8-15 (r[8 + k], r[12 + k]), lane-interleaved
    const __m512i a0 = _mm512_permutex2var_epi64(r[k], lo_idx, r[4 + k]);   // lanes: L0 of r[k], L0 of r[4+k], L2.., L2..
    const __m512i a1 = _mm512_permutex2var_epi64(r[k], hi_idx, r[4 + k]);   // L1, L1, L3, L3
    const __m512i b0 = _mm512_permutex2var_epi64(r[8 + k], lo_idx, r[12 + k]);
    const __m512i b1 = _mm512_permutex2var_epi64(r[8 + k], hi_idx, r[12 + k]);
    // column 4L + k = (L of r[k], L of r[4+k], L of r[8+k], L of r[12+k])
    _mm512_storeu_si512(o + (0 + k) * 64, _mm512_permutex2var_epi64(a0, lo2, b0));   // L0
    _mm512_storeu_si512(o + (8 + k) * 64, _mm512_permutex2var_epi64(a0, hi2, b0));   // L2
    _mm512_storeu_si512(o + (4 + k) * 64, _mm512_permutex2var_epi64(a1, lo2, b1));   // L1
    _mm512_storeu_si512(o + (12 + k) * 64, _mm512_permutex2var_epi64(a1, hi2, b1));  // L3
  }
}

// Stages keys [0, key_end) of one kv head (element offset hoff in a row) from the pool rows at `rows`: K^T tiles
// kt [16-key group][dimension step] (16 rows of dimension pairs x 16 keys) and V tiles vt [32-key group][value
// tile] (16 key pairs x 16 dimensions, unpacklo/unpackhi lane order), zero past key_end.
template <int KS>
void amx_stage(const Problem& P, const int64_t* rows, int64_t key_end, int64_t hoff, uint32_t* kt,
               c10::BFloat16* vt) {
  using T = c10::BFloat16;
  constexpr int VT = 2 * KS;
  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  const int64_t kv_stride = P.kv_heads * P.head_dim * 2;
  alignas(64) T tmp[16 * 32];
  for (int64_t j = 0; j < (key_end + 15) / 16; ++j) {
    const int64_t n = std::min<int64_t>(16, key_end - 16 * j);
    for (int k = 0; k < KS; ++k) {
      const T* src;
      int64_t src_stride;
      if (P.block_size % 16 == 0) {  // 16 keys of one block: rows kv_stride bytes apart
        src = kc + rows[16 * j] + hoff + 32 * k, src_stride = kv_stride;
      } else {
        for (int64_t i = 0; i < n; ++i) std::memcpy(tmp + i * 32, kc + rows[16 * j + i] + hoff + 32 * k, 64);
        src = tmp, src_stride = 64;
      }
      transpose16(src, src_stride, n, kt + (j * KS + k) * 256);
    }
  }
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < (key_end + 31) / 32; ++c)
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t j = 32 * c + 2 * r;
      for (int b = 0; b < KS; ++b) {
        const __m512i x = j < key_end ? _mm512_loadu_si512(vc + rows[j] + hoff + 32 * b) : zero;
        const __m512i y = j + 1 < key_end ? _mm512_loadu_si512(vc + rows[j + 1] + hoff + 32 * b) : zero;
        _mm512_storeu_si512(vt + ((c * VT + 2 * b) * 16 + r) * 32, _mm512_unpacklo_epi16(x, y));
        _mm512_storeu_si512(vt + ((c * VT + 2 * b + 1) * 16 + r) * 32, _mm512_unpackhi_epi16(x, y));
      }
    }
}

// Scratch floats amx_row_block needs for `keys` staged keys: a row block's scores, then its weights in bfloat16.
inline int64_t amx_score_stride(int64_t keys) { return (keys + 31) / 32 * 32 + 32; }

// One block of 16 query rows (their Q tiles at qb, rows q_stride bytes apart) against the staged keys: row i sees
// keys [0, vis[i]) (0: a padding row), all within [0, block_keys). Exact softmax in two passes: scores S = Q K^T
// into four C tiles (64 keys) at a time, then per row the max, exp and sum with the weights rounded to bfloat16,
// then O = P V over 32 keys at a time. Leaves per row the scaled max, the sum of exps and the unnormalised output,
// its 32-dimension blocks in unpacklo/unpackhi lane order, in acc [16][d]. The caller has loaded the tile config
// (all eight tiles 16 rows x 64 bytes). A tile register is not renamed (loading one that a multiply still reads
// waits for it), so the B operands alternate between tmm6 and tmm7 and the A operands of P V between tmm4 and tmm5.
template <int KS>
void amx_row_block(const Problem& P, const c10::BFloat16* qb, int64_t q_stride, const uint32_t* kt,
                   const c10::BFloat16* vt, int64_t block_keys, const int64_t* vis, float* s, float* acc,
                   float* row_max, float* row_sum) {
  using T = c10::BFloat16;
  constexpr int VT = 2 * KS;
  const int64_t d = P.head_dim, stride = amx_score_stride(block_keys);
  T* pw = reinterpret_cast<T*>(s + 16 * stride);
  _tile_loadd(4, qb, q_stride);
  if constexpr (KS == 2) _tile_loadd(5, qb + 32, q_stride);
  for (int64_t j0 = 0; j0 < block_keys; j0 += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint32_t* kj = kt + (j0 / 16) * KS * 256;
    const int64_t groups = std::min<int64_t>(4, (block_keys - j0 + 15) / 16);
#define NIMBUS_SCORE(C)                            \
  if (groups > C) {                                \
    _tile_loadd(6, kj + (C * KS) * 256, 64);       \
    _tile_dpbf16ps(C, 4, 6);                       \
    if constexpr (KS == 2) {                       \
      _tile_loadd(7, kj + (C * KS + 1) * 256, 64); \
      _tile_dpbf16ps(C, 5, 7);                     \
    }                                              \
  }
    NIMBUS_SCORE(0)
    NIMBUS_SCORE(1)
    NIMBUS_SCORE(2)
    NIMBUS_SCORE(3)
#undef NIMBUS_SCORE
    _tile_stored(0, s + j0, stride * 4);
    _tile_stored(1, s + j0 + 16, stride * 4);
    _tile_stored(2, s + j0 + 32, stride * 4);
    _tile_stored(3, s + j0 + 48, stride * 4);
  }
  const __m512 scale = _mm512_set1_ps(P.scale);
  const int64_t kend32 = (block_keys + 31) / 32 * 32;  // P V reads whole 32-key groups: zero weights up to it
  for (int64_t i = 0; i < 16; ++i) {
    const float* si = s + i * stride;
    T* pi = pw + i * stride;
    const int64_t n = vis[i];
    __m512 m = _mm512_set1_ps(NEG_INF);
    int64_t j = 0;
    for (; j + W <= n; j += W) m = _mm512_max_ps(m, _mm512_loadu_ps(si + j));
    if (j < n) m = _mm512_mask_max_ps(m, __mmask16((1u << (n - j)) - 1), m, _mm512_loadu_ps(si + j));
    row_max[i] = n ? _mm512_reduce_max_ps(m) * P.scale : NEG_INF;
    // exp(scale * x - max) as one multiply-add; weights past the row's visible keys are zero
    const __m512 neg_max = _mm512_set1_ps(n ? -row_max[i] : 0.0f);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < kend32; j += W) {
      const __mmask16 live = j + W <= n ? __mmask16(0xffff) : j < n ? __mmask16((1u << (n - j)) - 1) : 0;
      const __m512 e = _mm512_maskz_mov_ps(live, exp_weights(_mm512_fmadd_ps(_mm512_loadu_ps(si + j), scale, neg_max)));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pi + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    }
    row_sum[i] = _mm512_reduce_add_ps(sum);
  }
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (KS == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t j0 = 0; j0 < block_keys; j0 += 64) {
#define NIMBUS_VALUES(A, J)                        \
  {                                                \
    const T* vj = vt + ((j0 + J) / 32) * VT * 512; \
    _tile_loadd(A, pw + j0 + J, stride * 2);       \
    _tile_loadd(6, vj, 64);                        \
    _tile_dpbf16ps(0, A, 6);                       \
    _tile_loadd(7, vj + 512, 64);                  \
    _tile_dpbf16ps(1, A, 7);                       \
    if constexpr (KS == 2) {                       \
      _tile_loadd(6, vj + 1024, 64);               \
      _tile_dpbf16ps(2, A, 6);                     \
      _tile_loadd(7, vj + 1536, 64);               \
      _tile_dpbf16ps(3, A, 7);                     \
    }                                              \
  }
    NIMBUS_VALUES(4, 0)
    if (j0 + 32 < block_keys) NIMBUS_VALUES(5, 32)
#undef NIMBUS_VALUES
  }
  _tile_stored(0, acc, d * 4);
  _tile_stored(1, acc + 16, d * 4);
  if constexpr (KS == 2) {
    _tile_stored(2, acc + 32, d * 4);
    _tile_stored(3, acc + 48, d * 4);
  }
}

inline void amx_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// bfloat16 prefill on AMX: one kv head's G query heads over a tile of up to AMX_QT tokens, rows head-major (a row
// block is 16 tokens of one head, so a whole block's Q rows are q_token_stride apart and load as a tile where they
// lie; a block of fewer tokens is copied out, zero-padded). Each item stages the keys its rows see.
template <int KS>
void prefill_amx(const Problem& P, const Item& it, Scratch& S) {
  using T = c10::BFloat16;
  const int64_t d = P.head_dim, G = P.group, kv_head = it.head_begin;
  const int64_t first_row = P.query_start[it.seq] + it.q_begin;
  const int64_t q_len = P.query_start[it.seq + 1] - P.query_start[it.seq];
  const int64_t first_pos = P.context_lens[it.seq] - q_len + it.q_begin;  // this item's first token
  const int64_t tokens = it.q_end - it.q_begin, key_end = first_pos + tokens;  // keys any row sees
  const int64_t stride = amx_score_stride(key_end);
  Scratch::fit(S.kt, (key_end + 15) / 16 * KS * 256);
  Scratch::fit(S.v, (key_end + 31) / 32 * 2 * KS * 256);
  Scratch::fit(S.q, 16 * d / 2);  // a partial block's Q rows in bfloat16, zero-padded
  Scratch::fit(S.s, 16 * stride + 16 * stride / 2);
  Scratch::fit(S.acc, 16 * d);
  Scratch::fit(S.max, 16);
  Scratch::fit(S.sum, 16);
  if (S.rows.size() < size_t(key_end)) S.rows.resize(key_end);
  tile_rows(P, P.block_tables + int64_t(it.seq) * P.table_stride, 0, key_end, S.rows.data());
  uint32_t* kt = reinterpret_cast<uint32_t*>(S.kt.data());
  T* vt = reinterpret_cast<T*>(S.v.data());
  amx_stage<KS>(P, S.rows.data(), key_end, kv_head * d, kt, vt);
  amx_config();
  T* qs = reinterpret_cast<T*>(S.q.data());
  const T* q = static_cast<const T*>(P.q);
  T* out = static_cast<T*>(P.out);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t0 = 0; t0 < tokens; t0 += 16) {
      const int64_t rn = std::min<int64_t>(16, tokens - t0), head = kv_head * G + g;
      const T* qb = q + (first_row + t0) * P.q_token_stride + head * P.q_head_stride;
      int64_t q_stride = P.q_token_stride * 2;
      if (rn < 16) {
        for (int64_t i = 0; i < 16; ++i)
          if (i < rn) std::memcpy(qs + i * d, qb + i * P.q_token_stride, d * sizeof(T));
          else std::memset(qs + i * d, 0, d * sizeof(T));
        qb = qs, q_stride = d * 2;
      }
      int64_t vis[16];
      for (int64_t i = 0; i < 16; ++i) vis[i] = i < rn ? first_pos + t0 + i + 1 : 0;
      amx_row_block<KS>(P, qb, q_stride, kt, vt, first_pos + t0 + rn, vis, S.s.data(), S.acc.data(), S.max.data(),
                        S.sum.data());
      const float* acc = S.acc.data();
      for (int64_t i = 0; i < rn; ++i) {
        T* o = out + (first_row + t0 + i) * P.out_token_stride + head * P.out_head_stride;
        for (int b = 0; b < KS; ++b)
          store_dp_block(o + 32 * b, _mm512_loadu_ps(acc + i * d + 2 * b * W),
                         _mm512_loadu_ps(acc + i * d + (2 * b + 1) * W), 1.0f / S.sum[i]);
      }
    }
  _tile_release();
}

// The shared positions [0, grp.shared) of a decode group item (group_decode's first part) on AMX: rows are member *
// G + head as there, copied out in bfloat16 (members' q rows lie apart), every row seeing every shared key. Leaves
// what group_decode's float path leaves: per row the scaled max, the sum of exps, and the unnormalised output in
// dimension order in S.acc.
template <int KS>
void group_shared_amx(const Problem& P, const Item& it, const Group& grp, Scratch& S) {
  using T = c10::BFloat16;
  const int64_t d = P.head_dim, G = P.group, h = it.head_begin, L = grp.shared;
  const int32_t* members = grp.seqs.data() + it.q_begin;
  const int64_t nrows = (it.q_end - it.q_begin) * G, blocks = (nrows + 15) / 16, stride = amx_score_stride(L);
  Scratch::fit(S.kt, (L + 15) / 16 * KS * 256);
  Scratch::fit(S.v, (L + 31) / 32 * 2 * KS * 256);
  Scratch::fit(S.s, 16 * stride + 16 * stride / 2 + blocks * 16 * d / 2);  // + Q rows in bfloat16
  if (S.rows.size() < size_t(L)) S.rows.resize(L);
  tile_rows(P, P.block_tables + int64_t(members[0]) * P.table_stride, 0, L, S.rows.data());
  uint32_t* kt = reinterpret_cast<uint32_t*>(S.kt.data());
  T* vt = reinterpret_cast<T*>(S.v.data());
  amx_stage<KS>(P, S.rows.data(), L, h * d, kt, vt);
  T* qs = reinterpret_cast<T*>(S.s.data() + 16 * stride + 16 * stride / 2);
  const T* q = static_cast<const T*>(P.q);
  for (int64_t r = 0; r < blocks * 16; ++r)
    if (r < nrows)
      std::memcpy(qs + r * d, q + P.query_start[members[r / G]] * P.q_token_stride + (h * G + r % G) * P.q_head_stride,
                  d * sizeof(T));
    else
      std::memset(qs + r * d, 0, d * sizeof(T));
  amx_config();
  alignas(64) float acc[16 * 64];
  for (int64_t b0 = 0; b0 < blocks; ++b0) {
    const int64_t r0 = b0 * 16, rn = std::min<int64_t>(16, nrows - r0);
    int64_t vis[16];
    for (int64_t i = 0; i < 16; ++i) vis[i] = i < rn ? L : 0;
    float mx[16], sm[16];
    amx_row_block<KS>(P, qs + r0 * d, d * 2, kt, vt, L, vis, S.s.data(), acc, mx, sm);
    for (int64_t i = 0; i < rn; ++i) {
      S.max[r0 + i] = mx[i];
      S.sum[r0 + i] = sm[i];
      float* a = S.acc.data() + (r0 + i) * d;
      for (int b = 0; b < KS; ++b) {  // back to dimension order, in float32
        __m512 x, y;
        dp_block_order(_mm512_loadu_ps(acc + i * d + 2 * b * W), _mm512_loadu_ps(acc + i * d + (2 * b + 1) * W), x, y);
        _mm512_storeu_ps(a + 32 * b, x);
        _mm512_storeu_ps(a + 32 * b + 16, y);
      }
    }
  }
  _tile_release();
}
#endif

// A decode group item: members [q_begin, q_end) of group `g`, the G query heads of kv head head_begin. The shared
// positions [0, shared) go as in a prefill stage (keys staged KC at a time, shared by all the item's rows, online
// softmax), without a causal mask; then each member's own positions [shared, context) go as in `decode`, and the
// two parts are merged by their maxima. Rows are member * G + head.
template <typename Q, typename T, int NVC>
void group_decode(const Problem& P, const Item& it, const Group& grp, Scratch& S) {
  const int nv = NVC ? NVC : int(P.head_dim / W);
  constexpr int NV = NVC ? NVC : MAX_NV;
  constexpr int R = NVC ? decode_rows_per_block<NVC>() : 1;
  const int64_t d = P.head_dim, G = P.group, h = it.head_begin, L = grp.shared;
  const int32_t* members = grp.seqs.data() + it.q_begin;
  const int64_t n = it.q_end - it.q_begin, nrows = n * G;
  int64_t own_max = 0;
  for (int64_t m = 0; m < n; ++m) own_max = std::max<int64_t>(own_max, P.context_lens[members[m]] - L);
  const int64_t own_stride = (own_max + W - 1) / W * W;
  Scratch::fit(S.q, nrows * d);
  Scratch::fit(S.acc, nrows * d);
  Scratch::fit(S.s, std::max(nrows * KC, G * own_stride));
  Scratch::fit(S.kt, KC * d);
  Scratch::fit(S.v, KC * d);
  Scratch::fit(S.max, nrows);
  Scratch::fit(S.sum, nrows);
  if (S.rows.size() < size_t(std::max<int64_t>(KC, own_stride))) S.rows.resize(std::max<int64_t>(KC, own_stride));
  const Q* q = static_cast<const Q*>(P.q);
  for (int64_t m = 0; m < n; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const Q* src = q + P.query_start[members[m]] * P.q_token_stride + (h * G + g) * P.q_head_stride;
      for (int c = 0; c < nv; ++c) storeu(S.q.data() + (m * G + g) * d + c * W, loadv(src + c * W) * P.scale);
    }
  std::fill_n(S.acc.data(), nrows * d, 0.0f);
  std::fill_n(S.max.data(), nrows, NEG_INF);
  std::fill_n(S.sum.data(), nrows, 0.0f);
  bool shared_done = false;  // the shared part on AMX tiles (bfloat16, where prefill takes them too)
#ifdef __AMX_BF16__
  if constexpr (std::is_same_v<Q, c10::BFloat16> && std::is_same_v<T, c10::BFloat16>)
    if (P.amx_prefill) {
      if (P.head_dim == 64) group_shared_amx<2>(P, it, grp, S);
      else group_shared_amx<1>(P, it, grp, S);
      shared_done = true;
    }
#endif

  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  int64_t* rows = S.rows.data();  // (taken after the AMX part, which may grow the scratch)
  float* s = S.s.data();
  const int32_t* shared_table = P.block_tables + int64_t(members[0]) * P.table_stride;
  for (int64_t c0 = 0; c0 < L && !shared_done; c0 += KC) {
    const int64_t cn = std::min<int64_t>(KC, L - c0), tiles = (cn + W - 1) / W;
    tile_rows(P, shared_table, c0, cn, rows);
    stage_keys(kc, vc, rows, cn, h * d, d, nv, S.kt.data(), S.v.data());
    for (int64_t r0 = 0; r0 < nrows;)
      r0 += with_rows<SR>(std::min<int64_t>(SR, nrows - r0), [&]<int RR>() {
        score_rows<RR>(S.q.data() + r0 * d, d, S.kt.data(), tiles, s + r0 * KC, KC);
      });
    for (int64_t r = 0; r < nrows; ++r) {
      float* sr = s + r * KC;
      const float f = online_softmax(sr, cn, tiles * W, S.max[r], S.sum[r], S.acc.data() + r * d, d);
      if (f != 1.0f)
        for (int64_t j = 0; j < cn; ++j) sr[j] *= f;
    }
    for (int64_t r0 = 0; r0 < nrows;)
      r0 += with_rows<VR>(std::min<int64_t>(VR, nrows - r0), [&]<int RR>() {
        value_rows<RR>(s + r0 * KC, KC, S.v.data(), d, cn, nv, S.acc.data() + r0 * d);
      });
  }

  Q* out = static_cast<Q*>(P.out);
  alignas(64) float buf[MAX_NV * W];
  for (int64_t m = 0; m < n; ++m) {
    const int32_t seq = members[m];
    const int64_t own = P.context_lens[seq] - L;  // at least 1: the member's own token
    const int64_t stride = (own + W - 1) / W * W;
    tile_rows(P, P.block_tables + int64_t(seq) * P.table_stride, L, own, rows);
    const float* qm = S.q.data() + m * G * d;
    for (int64_t k0 = 0; k0 < own; k0 += W) {
      const int64_t kn = std::min<int64_t>(W, own - k0);
      const int64_t ahead = std::clamp<int64_t>(own - k0 - AHEAD, 0, kn);
      for (int64_t g = 0; g < G;)
        g += with_rows<R>(G - g, [&]<int RR>() {
          decode_scores<T, NV, RR>(kc, rows + k0, kn, h * d, qm + g * d, nv, s + g * stride + k0, stride, ahead);
        });
    }
    for (int64_t g = 0; g < G; ++g) {  // merge: both parts scaled to the larger of their maxima
      const int64_t r = m * G + g;
      float own_max_score;
      const float own_sum = exp_row(s + g * stride, own, own_max_score);
      const float top = std::max(S.max[r], own_max_score);
      const float f_shared = std::exp(S.max[r] - top), f_own = std::exp(own_max_score - top);
      float* a = S.acc.data() + r * d;
      for (int c = 0; c < nv; ++c) storeu(a + c * W, loadu(a + c * W) * f_shared);
      for (int64_t j = 0; j < own; ++j) s[g * stride + j] *= f_own;
      S.sum[r] = S.sum[r] * f_shared + own_sum * f_own;
    }
    for (int64_t k0 = 0; k0 < own; k0 += W) {
      const int64_t kn = std::min<int64_t>(W, own - k0);
      const int64_t ahead = std::clamp<int64_t>(own - k0 - AHEAD, 0, kn);
      for (int64_t g = 0; g < G;)
        g += with_rows<R>(G - g, [&]<int RR>() {
          decode_values<T, NV, RR>(vc, rows + k0, kn, h * d, s + g * stride + k0, stride, nv,
                                   S.acc.data() + (m * G + g) * d, ahead);
        });
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = m * G + g;
      const float inv = 1.0f / S.sum[r];
      for (int c = 0; c < nv; ++c) storeu(buf + c * W, loadu(S.acc.data() + r * d + c * W) * inv);
      store_row(out + P.query_start[seq] * P.out_token_stride + (h * G + g) * P.out_head_stride, buf, d);
    }
  }
}

// Q: the type of q and out (the model's); T: the cache's (the same, or bfloat16 under float32 queries).
template <typename Q, typename T, int NVC>
void attend(const Problem& P, const Item& it, const std::vector<Group>& groups, Scratch& S) {
  if (it.group >= 0) return group_decode<Q, T, NVC>(P, it, groups[it.group], S);
#ifdef __AVX512BF16__
  constexpr bool all_bf16 = std::is_same_v<Q, c10::BFloat16> && std::is_same_v<T, c10::BFloat16>;
  if constexpr (all_bf16 && NVC > 0 && NVC % 2 == 0)
    if (P.dp_decode && P.query_start[it.seq + 1] - P.query_start[it.seq] == 1) return decode_dp<NVC / 2>(P, it, S);
#endif
  if (P.query_start[it.seq + 1] - P.query_start[it.seq] == 1) return decode<Q, T, NVC>(P, it, S);
#ifdef __AMX_BF16__
  if constexpr (all_bf16)
    if (P.amx_prefill) return P.head_dim == 64 ? prefill_amx<2>(P, it, S) : prefill_amx<1>(P, it, S);
#endif
#ifdef __AVX512BF16__
  if constexpr (all_bf16 && NVC > 0 && NVC % 2 == 0) return prefill_dp<NVC / 2>(P, it, S);
#endif
  prefill<Q, T, NVC>(P, it, S);
}

// Kept out of interprocedural optimisation: GCC otherwise specialised the kernels for their one caller's scratch, a
// thread_local, and re-derived its address (a __tls_get_addr call, with a vzeroupper before it) inside their loops:
// 437 such calls in the library. Without them, 64 decodes with their KV in cache took 0.89-0.96x the time (medians
// of three alternating runs); from memory, over a shared prefix and in prefill, level.
#ifdef __clang__
#define NIMBUS_NOIPA __attribute__((noinline))
#else
#define NIMBUS_NOIPA __attribute__((noipa))
#endif
template <typename Q, typename T>
NIMBUS_NOIPA void attend_dispatch(const Problem& P, const Item& it, const std::vector<Group>& groups,
                                  Scratch& S) {
  switch (P.head_dim) {  // compile-time sizes for the common heads keep rows in registers
    case 32: return attend<Q, T, 32 / W>(P, it, groups, S);
    case 64: return attend<Q, T, 64 / W>(P, it, groups, S);
    case 128: return attend<Q, T, 128 / W>(P, it, groups, S);
    default: return attend<Q, T, 0>(P, it, groups, S);
  }
}

// A decode group forms from at least GROUP_MIN_SEQS decodes sharing at least GROUP_MIN_SHARED positions; below
// that, staging the keys costs more than the passes it saves.
constexpr int64_t GROUP_MIN_SEQS = 4;
constexpr int64_t GROUP_MIN_SHARED = 64;

// Decodes that share their first blocks, grouped (each decode in at most one group; `grouped` marks them).
std::vector<Group> make_groups(const Problem& P, int64_t num_seqs, std::vector<char>& grouped) {
  std::vector<int32_t> order;
  for (int32_t s = 0; s < num_seqs; ++s)
    if (P.query_start[s + 1] - P.query_start[s] == 1 && P.context_lens[s] > GROUP_MIN_SHARED) order.push_back(s);
  auto table = [&](int32_t s) { return P.block_tables + int64_t(s) * P.table_stride; };
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return table(a)[0] < table(b)[0]; });
  std::vector<Group> groups;
  for (size_t i = 0; i < order.size();) {
    size_t j = i + 1;
    while (j < order.size() && table(order[j])[0] == table(order[i])[0]) ++j;
    if (int64_t(j - i) >= GROUP_MIN_SEQS) {
      // positions every member has in the leader's blocks, short of each member's own last token
      const int32_t* lead = table(order[i]);
      int64_t shared = std::numeric_limits<int64_t>::max();
      for (size_t k = i; k < j; ++k) {
        const int64_t last = P.context_lens[order[k]] - 1, blocks = (last + P.block_size - 1) / P.block_size;
        const int32_t* t = table(order[k]);
        int64_t b = 0;
        while (b < blocks && t[b] == lead[b]) ++b;
        shared = std::min(shared, std::min(b * P.block_size, last));
      }
      shared = shared / W * W;  // own positions start on a whole tile
      if (shared >= GROUP_MIN_SHARED) {
        groups.push_back({std::vector<int32_t>(order.begin() + i, order.begin() + j), shared});
        for (size_t k = i; k < j; ++k) grouped[order[k]] = 1;
      }
    }
    i = j;
  }
  return groups;
}

std::vector<Item> make_items(const Problem& P, int64_t num_seqs, int64_t threads, bool decode_only,
                             const std::vector<Group>& groups, const std::vector<char>& grouped) {
  int64_t decodes = 0;
  for (int32_t s = 0; s < num_seqs; ++s) decodes += P.query_start[s + 1] - P.query_start[s] == 1;
  // with many decodes, one item per sequence reads each KV block whole; with few, split by kv head so every
  // thread has work
  const int32_t decode_heads = decodes >= 4 * threads ? int32_t(P.kv_heads) : 1;
  std::vector<Item> items;
  items.reserve(num_seqs * P.kv_heads);
  // a group goes in member chunks per kv head, enough of them that every thread gets several
  const int64_t chunks = std::max<int64_t>(1, (4 * threads + P.kv_heads - 1) / P.kv_heads);
  for (int32_t gi = 0; gi < int32_t(groups.size()); ++gi) {
    const int64_t n = int64_t(groups[gi].seqs.size());
    const int64_t per = std::max<int64_t>(GROUP_MIN_SEQS, (n + chunks - 1) / chunks);
    for (int64_t m = 0; m < n; m += per) {
      const int32_t e = int32_t(std::min(n, m + per));
      int64_t keys = 0;
      for (int64_t k = m; k < e; ++k) keys += P.context_lens[groups[gi].seqs[k]];
      for (int32_t h = 0; h < P.kv_heads; ++h)
        items.push_back({groups[gi].seqs[m], h, h + 1, int32_t(m), e, keys * P.group, gi});
    }
  }
  for (int32_t s = 0; s < num_seqs; ++s) {
    if (grouped[s]) continue;
    const int32_t q_len = P.query_start[s + 1] - P.query_start[s];
    const int64_t start = P.context_lens[s] - q_len;
    if (q_len == 1) {
      for (int32_t h = 0; h < P.kv_heads; h += decode_heads)
        items.push_back({s, h, std::min<int32_t>(h + decode_heads, P.kv_heads), 0, 1,
                         (start + 1) * std::min<int64_t>(decode_heads, P.kv_heads - h) * P.group});
      continue;
    }
    if (decode_only) continue;
    const int32_t qt = P.amx_prefill ? AMX_QT : QT;
    for (int32_t b = 0; b < q_len; b += qt) {
      const int32_t e = std::min(q_len, b + qt);
      const int64_t cost = (start + e) * (e - b) * P.group;
      for (int32_t h = 0; h < P.kv_heads; ++h) items.push_back({s, h, h + 1, b, e, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// The step's new K or V rows (type Q) into the cache (type T): copied, or rounded to bfloat16 under float32.
template <typename Q, typename T>
void write_cache(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots, int64_t kv_heads,
                 int64_t d) {
  const Q* s = src.const_data_ptr<Q>();
  T* c = cache.data_ptr<T>();
  const int64_t n = src.size(0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const Q* row = s + t * src.stride(0) + h * src.stride(1);
      if constexpr (std::is_same_v<Q, T>)
        std::memcpy(c + (slots[t] * kv_heads + h) * d, row, d * sizeof(T));
      else
        store_row(c + (slots[t] * kv_heads + h) * d, row, d);
    }
}

// Whether bfloat16 prefill asked to run on AMX tiles (amx_prefill) does here: the build has the tile instructions,
// Linux grants the tile state, and the head fits prefill_amx.
bool amx_prefill_available(int64_t head_dim) {
#ifdef __AMX_BF16__
  return amx_permitted() && (head_dim == 32 || head_dim == 64);
#else
  (void)head_dim;
  return false;
#endif
}

void check_rows(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, name, " must be [tokens, heads, head_dim], last dim contiguous");
  TORCH_CHECK(x.scalar_type() == dtype, name, " has dtype ", x.scalar_type(), ", q ", dtype);
}

void check_int32(const at::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.scalar_type() == at::kInt && x.dim() == dims && x.is_contiguous(), name,
              " must be a contiguous int32 tensor of ", dims, " dims");
}

// Writes k/v at slot_mapping, then attention for every query row (with decode_only, for the rows of sequences
// computing one token: the caller attends the prefill chunks itself and their rows of out are left as they were).
// kv_cache is one layer's [2, num_blocks, block_size, KVH, D] pool.
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& query_start, const at::Tensor& context_lens, double scale,
                     bool decode_only, bool dp_decode, bool amx_prefill) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, num_blocks, block_size, kv_heads, head_dim] tensor");
  const auto dtype = kv_cache.scalar_type(), qtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only, got ", dtype);
  TORCH_CHECK(qtype == dtype || (qtype == at::kFloat && dtype == at::kBFloat16), "q in ", qtype, " with a ", dtype,
              " cache: the cache holds q's dtype, or bfloat16 under float32");
  const int64_t kv_heads = kv_cache.size(3), d = kv_cache.size(4);
  TORCH_CHECK(d % 16 == 0 && d <= MAX_NV * W, "head_dim must be a multiple of 16 up to 256, got ", d);
  check_rows(q, "q", qtype);
  check_rows(k, "k", qtype);
  check_rows(v, "v", qtype);
  check_rows(out, "out", qtype);
  TORCH_CHECK(q.size(2) == d && k.size(1) == kv_heads && v.size(1) == kv_heads && q.size(1) % kv_heads == 0,
              "head shapes of q/k/v do not match the cache");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0) && v.size(0) == k.size(0),
              "slot_mapping must be int64 with one slot per new token");
  check_int32(block_tables, "block_tables", 2);
  check_int32(query_start, "query_start", 1);
  check_int32(context_lens, "context_lens", 1);
  const int64_t num_seqs = context_lens.numel();
  TORCH_CHECK(query_start.numel() == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "one block table and context length per sequence, query_start has one more entry");
  TORCH_CHECK(query_start.const_data_ptr<int32_t>()[num_seqs] == q.size(0), "query_start must end at q.size(0)");

  const at::Tensor key_cache = kv_cache.select(0, 0), value_cache = kv_cache.select(0, 1);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  // every slot written and every block read must lie in the pool: a bad step is an error, not a stray write
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), width = block_tables.size(1);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_blocks * block_size, "slot_mapping[", t, "] = ", slots[t],
                " lies outside the pool of ", num_blocks, " blocks of ", block_size);
  const int32_t* starts = query_start.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0, "query_start must begin at 0");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = int64_t(starts[s + 1]) - starts[s], used = (int64_t(lens[s]) + block_size - 1) / block_size;
    TORCH_CHECK(q_len >= 0 && lens[s] >= q_len && used <= width, "sequence ", s, ": ", q_len, " new tokens, context ",
                lens[s], ", block table of ", width);
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(tables[s * width + b] >= 0 && tables[s * width + b] < num_blocks, "sequence ", s, " block ", b,
                  " = ", tables[s * width + b], " is not in the pool of ", num_blocks);
  }
  using BF16 = c10::BFloat16;
  const bool mixed = qtype != dtype;  // float32 q, bfloat16 cache
  if (dtype == at::kFloat) {
    write_cache<float, float>(k, key_cache, slots, kv_heads, d);
    write_cache<float, float>(v, value_cache, slots, kv_heads, d);
  } else if (mixed) {
    write_cache<float, BF16>(k, key_cache, slots, kv_heads, d);
    write_cache<float, BF16>(v, value_cache, slots, kv_heads, d);
  } else {
    write_cache<BF16, BF16>(k, key_cache, slots, kv_heads, d);
    write_cache<BF16, BF16>(v, value_cache, slots, kv_heads, d);
  }

  Problem P{q.const_data_ptr(), out.data_ptr(), key_cache.const_data_ptr(), value_cache.const_data_ptr(),
            block_tables.const_data_ptr<int32_t>(), query_start.const_data_ptr<int32_t>(),
            context_lens.const_data_ptr<int32_t>(), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            block_tables.stride(0), kv_cache.size(2), kv_heads, q.size(1) / kv_heads, d, float(scale), dp_decode,
            amx_prefill && dtype == at::kBFloat16 && !mixed && amx_prefill_available(d)};
  std::vector<char> grouped(num_seqs, 0);
  const std::vector<Group> groups = make_groups(P, num_seqs, grouped);
  const std::vector<Item> items = make_items(P, num_seqs, at::get_num_threads(), decode_only, groups, grouped);
  const int64_t n = int64_t(items.size());
  std::atomic<int64_t> next{0};
  // one task per thread, each pulling items until none is left: costs differ by orders of magnitude
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (dtype == at::kFloat)
        attend_dispatch<float, float>(P, items[i], groups, scratch);
      else if (mixed)
        attend_dispatch<float, BF16>(P, items[i], groups, scratch);
      else
        attend_dispatch<BF16, BF16>(P, items[i], groups, scratch);
    }
  });
}

// The decode groups paged_attention would form for these sequences: one int64 tensor per group, [shared positions,
// member sequence indices...] (tests check grouping with it).
std::vector<at::Tensor> decode_groups(const at::Tensor& block_tables, const at::Tensor& query_start,
                                      const at::Tensor& context_lens, int64_t block_size) {
  check_int32(block_tables, "block_tables", 2);
  check_int32(query_start, "query_start", 1);
  check_int32(context_lens, "context_lens", 1);
  const int64_t num_seqs = context_lens.numel();
  TORCH_CHECK(query_start.numel() == num_seqs + 1 && block_tables.size(0) == num_seqs && block_size > 0,
              "one block table and context length per sequence, query_start has one more entry");
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  for (int64_t s = 0; s < num_seqs; ++s)
    TORCH_CHECK((int64_t(lens[s]) + block_size - 1) / block_size <= block_tables.size(1), "sequence ", s,
                ": context ", lens[s], " needs more blocks than its table has");
  Problem P{};
  P.block_tables = block_tables.const_data_ptr<int32_t>();
  P.query_start = query_start.const_data_ptr<int32_t>();
  P.context_lens = lens;
  P.table_stride = block_tables.stride(0);
  P.block_size = block_size;
  std::vector<char> grouped(num_seqs, 0);
  std::vector<at::Tensor> out;
  for (const Group& g : make_groups(P, num_seqs, grouped)) {
    at::Tensor t = at::empty({int64_t(g.seqs.size()) + 1}, at::kLong);
    int64_t* d = t.data_ptr<int64_t>();
    d[0] = g.shared;
    for (size_t i = 0; i < g.seqs.size(); ++i) d[i + 1] = g.seqs[i];
    out.push_back(t);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(nimbus, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!) kv_cache, Tensor slot_mapping, "
      "Tensor block_tables, Tensor query_start, Tensor context_lens, float scale, bool decode_only=False, "
      "bool dp_decode=False, bool amx_prefill=False) -> ()");
  m.def("amx_prefill_available(int head_dim) -> bool", &amx_prefill_available);
  m.def("decode_groups(Tensor block_tables, Tensor query_start, Tensor context_lens, int block_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(nimbus, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("decode_groups", &decode_groups);
}
