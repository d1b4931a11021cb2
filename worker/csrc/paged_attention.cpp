// CPU paged attention for Nimbus: reads each sequence's K/V blocks where they lie in the paged pool
// (no gather, no padding) and computes causal attention for decode and prefill chunks in one call.
//
// Layouts (as worker/attention.py documents them):
//   q, out          [T, H, D]    new tokens of all sequences, flattened; last dim contiguous
//   k, v            [T, KVH, D]  new tokens' keys/values, written into the pool at slot_mapping first
//   key/value pool  [num_blocks, block_size, KVH, D] contiguous (one layer)
//   block_tables    int32 [S, W] block ids of each sequence, in position order (padding never read)
//   query_start     int32 [S+1]  rows of sequence s are query_start[s] .. query_start[s+1]-1
//   context_lens    int32 [S]    positions attended after this step; the chunk ends at the last one
//
// Work is split into items (sequence, kv head, tile of up to QT query tokens) handed out dynamically to
// the torch intra-op threads: a prefill tile late in a long prompt costs many times a decode item.
// One item processes the G = H/KVH query heads of its kv head together so each K/V row is read once.
// Keys go in tiles of 16; softmax is online (running max and sum per query row), accumulated in float.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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

namespace {

// GCC/Clang vector extensions: explicit 16-float vectors the compiler maps onto whatever the CPU has
// (one AVX-512 register, two AVX2 ones, four NEON ones) without intrinsics, so the build stays portable.
constexpr int W = 16;   // floats per vector, and keys per tile
constexpr int QT = 16;  // query tokens per work item in a prefill chunk
constexpr int RB = 4;   // query rows handled together: independent accumulators sharing each key load
constexpr int MAX_NV = 16;  // head_dim up to 256
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
const vi IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline vf splat(float x) { return vf{} + x; }
inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf load16(const float* p) { return loadu(p); }
inline vf load16(const c10::BFloat16* p) {  // bfloat16 is the top half of a float
  vh h;
  std::memcpy(&h, p, sizeof h);
  return std::bit_cast<vf>(__builtin_convertvector(h, vi) << 16);
}
inline void store_row(float* dst, const float* src, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }
inline void store_row(c10::BFloat16* dst, const float* src, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = c10::BFloat16(src[i]);
}

inline float hsum(vf v) {
  auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  auto b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float hmax(vf v) {
  auto a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  auto b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > b ? a : b;
  auto c = __builtin_shufflevector(a, a, 0, 1, 2, 3), e = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = c > e ? c : e;
  return std::max(std::max(c[0], c[1]), std::max(c[2], c[3]));
}

// exp for x <= 0, lane-wise (Cephes single-precision polynomial after reduction by ln 2; relative error
// ~1e-7). Below -87 it returns ~1e-38 rather than 0: callers zero masked lanes themselves.
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
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
};

struct Item {
  int32_t seq, kv_head, q_begin, q_end;  // q_* relative to the sequence's first query row
  int64_t cost;                         // keys scanned x rows, to hand out the longest first
};

// Element offsets (into one layer's key or value pool) of the rows of positions k0 .. k0+n-1 for a kv head.
inline void tile_rows(const Problem& P, const int32_t* table, int64_t k0, int n, int64_t kv_head, int64_t* rows) {
  int64_t block = k0 / P.block_size, offset = k0 % P.block_size;
  const int64_t row = P.kv_heads * P.head_dim;
  for (int j = 0; j < n; ++j) {
    rows[j] = (int64_t(table[block]) * P.block_size + offset) * row + kv_head * P.head_dim;
    if (++offset == P.block_size) offset = 0, ++block;
  }
}

template <typename T>
inline void prefetch_rows(const T* base, const int64_t* rows, int n, int64_t d) {
  for (int j = 0; j < n; ++j)
    for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + rows[j]) + b);
}

// Online softmax update of one row for one tile: scores s (lanes >= visible ignored) -> weights p.
// Returns the factor the row's accumulator must be scaled by before adding this tile.
inline float softmax_step(vf s, int visible, float& row_max, float& row_sum, float* p) {
  const auto live = IOTA < visible;
  const float new_max = std::max(row_max, hmax(live ? s : splat(NEG_INF)));
  // 0 on the first tile (row_max = -inf); mostly 1 later on, where the libm call is skipped
  const float correction = new_max == row_max ? 1.0f : std::exp(row_max - new_max);
  const vf e = live ? vexp(s - new_max) : vf{};
  row_max = new_max;
  row_sum = row_sum * correction + hsum(e);
  storeu(p, e);
  return correction;
}

// Decode: one query token, R query heads of one kv head. Dot products straight from the cache rows;
// q and the accumulators stay in registers across the whole context.
template <typename T, int NVC, int R>
void decode_rows(const Problem& P, int64_t seq, int64_t kv_head, int64_t g0) {
  const int nv = NVC ? NVC : int(P.head_dim / W);
  constexpr int NV = NVC ? NVC : MAX_NV;
  const int64_t row = P.query_start[seq];
  const int64_t head0 = kv_head * P.group + g0;
  vf q[R][NV], acc[R][NV];
  float row_max[R], row_sum[R];
  const T* qp = static_cast<const T*>(P.q) + row * P.q_token_stride + head0 * P.q_head_stride;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < nv; ++c) q[r][c] = load16(qp + r * P.q_head_stride + c * W) * P.scale, acc[r][c] = vf{};
    row_max[r] = NEG_INF, row_sum[r] = 0.0f;
  }
  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  const int32_t* table = P.block_tables + seq * P.table_stride;
  const int64_t ctx = P.context_lens[seq];
  int64_t rows[W], next[W];
  alignas(64) float s[R][W];
  tile_rows(P, table, 0, int(std::min<int64_t>(W, ctx)), kv_head, next);
  for (int64_t k0 = 0; k0 < ctx; k0 += W) {
    const int n = int(std::min<int64_t>(W, ctx - k0));
    std::copy_n(next, n, rows);
    if (k0 + W < ctx) {  // decode reads each row once, from memory: ask for the next tile early
      const int n_next = int(std::min<int64_t>(W, ctx - k0 - W));
      tile_rows(P, table, k0 + W, n_next, kv_head, next);
      prefetch_rows(kc, next, n_next, P.head_dim);
      prefetch_rows(vc, next, n_next, P.head_dim);
    }
    for (int j = 0; j < n; ++j) {
      vf k[NV];
      for (int c = 0; c < nv; ++c) k[c] = load16(kc + rows[j] + c * W);
      for (int r = 0; r < R; ++r) {
        vf dot = q[r][0] * k[0];
        for (int c = 1; c < nv; ++c) dot += q[r][c] * k[c];
        s[r][j] = hsum(dot);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float corr = softmax_step(loadu(s[r]), n, row_max[r], row_sum[r], s[r]);
      if (corr != 1.0f)
        for (int c = 0; c < nv; ++c) acc[r][c] *= corr;
    }
    for (int j = 0; j < n; ++j) {
      vf v[NV];
      for (int c = 0; c < nv; ++c) v[c] = load16(vc + rows[j] + c * W);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < nv; ++c) acc[r][c] += s[r][j] * v[c];
    }
  }
  T* out = static_cast<T*>(P.out) + row * P.out_token_stride + head0 * P.out_head_stride;
  alignas(64) float buf[NV * W];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < nv; ++c) storeu(buf + c * W, acc[r][c] / row_sum[r]);
    store_row(out + r * P.out_head_stride, buf, P.head_dim);
  }
}

template <typename T, int NVC>
void decode(const Problem& P, int64_t seq, int64_t kv_head) {
  for (int64_t g0 = 0; g0 < P.group; g0 += RB) {
    switch (std::min<int64_t>(RB, P.group - g0)) {
      case 4: decode_rows<T, NVC, 4>(P, seq, kv_head, g0); break;
      case 3: decode_rows<T, NVC, 3>(P, seq, kv_head, g0); break;
      case 2: decode_rows<T, NVC, 2>(P, seq, kv_head, g0); break;
      default: decode_rows<T, NVC, 1>(P, seq, kv_head, g0); break;
    }
  }
}

// Per-thread scratch for prefill tiles, reused across calls.
struct Scratch {
  std::vector<float> q, acc, max, sum, kt, v, p;
  void fit(int64_t rows, int64_t d) {
    if (q.size() < size_t(rows * d)) {
      q.resize(rows * d), acc.resize(rows * d), max.resize(rows), sum.resize(rows), p.resize(rows * W);
    }
    if (kt.size() < size_t(d * W)) kt.resize(d * W), v.resize(d * W);
  }
};

// Scores of R rows against a transposed key tile: S[r] = sum_i Q[r][i] * Kt[i] (16 keys per vector).
template <int R>
inline void score_rows(const float* q, const float* kt, int64_t d, vf* s) {
  vf a[R] = {};
  for (int64_t i = 0; i < d; ++i) {
    const vf k = loadu(kt + i * W);
    for (int r = 0; r < R; ++r) a[r] += q[r * d + i] * k;
  }
  for (int r = 0; r < R; ++r) s[r] = a[r];
}

// Prefill: up to QT query tokens of one sequence x the G heads of one kv head, causal. Each key tile is
// transposed once into float scratch and then used by all G x QT rows, a small matrix multiply.
template <typename T, int NVC>
void prefill(const Problem& P, const Item& it, Scratch& S) {
  const int nv = NVC ? NVC : int(P.head_dim / W);
  constexpr int NV = NVC ? NVC : MAX_NV;
  const int64_t d = P.head_dim, G = P.group;
  const int64_t first_row = P.query_start[it.seq] + it.q_begin;
  const int64_t q_len = P.query_start[it.seq + 1] - P.query_start[it.seq];
  const int64_t first_pos = P.context_lens[it.seq] - q_len + it.q_begin;  // this item's first token
  const int64_t tokens = it.q_end - it.q_begin, rows = tokens * G;  // row = token * G + g
  S.fit(rows, d);
  const int64_t head0 = int64_t(it.kv_head) * G;
  const T* q = static_cast<const T*>(P.q);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = q + (first_row + t) * P.q_token_stride + (head0 + g) * P.q_head_stride;
      for (int c = 0; c < nv; ++c) storeu(S.q.data() + (t * G + g) * d + c * W, load16(src + c * W) * P.scale);
    }
  std::fill_n(S.acc.data(), rows * d, 0.0f);
  std::fill_n(S.max.data(), rows, NEG_INF);
  std::fill_n(S.sum.data(), rows, 0.0f);

  const T* kc = static_cast<const T*>(P.key_cache);
  const T* vc = static_cast<const T*>(P.value_cache);
  const int32_t* table = P.block_tables + int64_t(it.seq) * P.table_stride;
  const int64_t key_end = first_pos + tokens;  // keys [0, key_end) are visible to some row
  int64_t offsets[W];
  const float* vrows[W];
  float* kt = S.kt.data();
  for (int64_t k0 = 0; k0 < key_end; k0 += W) {
    const int n = int(std::min<int64_t>(W, key_end - k0));
    tile_rows(P, table, k0, n, it.kv_head, offsets);
    for (int j = 0; j < n; ++j) {
      for (int c = 0; c < nv; ++c) {
        alignas(64) float k[W];
        storeu(k, load16(kc + offsets[j] + c * W));
        for (int i = 0; i < W; ++i) kt[(c * W + i) * W + j] = k[i];
      }
      if constexpr (std::is_same_v<T, float>) {
        vrows[j] = vc + offsets[j];
      } else {
        for (int c = 0; c < nv; ++c) storeu(S.v.data() + j * d + c * W, load16(vc + offsets[j] + c * W));
        vrows[j] = S.v.data() + j * d;
      }
    }
    // tokens before k0 see none of this tile (early rows of a tile on the diagonal)
    const int64_t t0 = std::max<int64_t>(0, k0 - first_pos);
    for (int64_t r0 = t0 * G; r0 < rows; r0 += RB) {
      const int nr = int(std::min<int64_t>(RB, rows - r0));
      vf s[RB];
      switch (nr) {
        case 4: score_rows<4>(S.q.data() + r0 * d, kt, d, s); break;
        case 3: score_rows<3>(S.q.data() + r0 * d, kt, d, s); break;
        case 2: score_rows<2>(S.q.data() + r0 * d, kt, d, s); break;
        default: score_rows<1>(S.q.data() + r0 * d, kt, d, s); break;
      }
      for (int rr = 0; rr < nr; ++rr) {
        const int64_t r = r0 + rr;
        const int visible = int(std::min<int64_t>(n, first_pos + r / G - k0 + 1));
        float p[W];
        const float corr = softmax_step(s[rr], visible, S.max[r], S.sum[r], p);
        float* accp = S.acc.data() + r * d;
        vf a[NV];
        for (int c = 0; c < nv; ++c) a[c] = loadu(accp + c * W) * corr;
        for (int j = 0; j < visible; ++j)
          for (int c = 0; c < nv; ++c) a[c] += p[j] * loadu(vrows[j] + c * W);
        for (int c = 0; c < nv; ++c) storeu(accp + c * W, a[c]);
      }
    }
  }
  T* out = static_cast<T*>(P.out);
  alignas(64) float buf[MAX_NV * W];
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = S.acc.data() + r * d;
    for (int c = 0; c < nv; ++c) storeu(buf + c * W, loadu(a + c * W) / S.sum[r]);
    store_row(out + (first_row + r / G) * P.out_token_stride + (head0 + r % G) * P.out_head_stride, buf, d);
  }
}

template <typename T, int NVC>
void attend(const Problem& P, const Item& it, Scratch& S) {
  if (it.q_end - it.q_begin == 1 && P.query_start[it.seq + 1] - P.query_start[it.seq] == 1)
    decode<T, NVC>(P, it.seq, it.kv_head);
  else
    prefill<T, NVC>(P, it, S);
}

template <typename T>
void attend_dispatch(const Problem& P, const Item& it, Scratch& S) {
  switch (P.head_dim) {  // compile-time sizes for the common heads keep rows in registers
    case 64: return attend<T, 4>(P, it, S);
    case 128: return attend<T, 8>(P, it, S);
    default: return attend<T, 0>(P, it, S);
  }
}

std::vector<Item> make_items(const Problem& P, int64_t num_seqs) {
  std::vector<Item> items;
  items.reserve(num_seqs * P.kv_heads);
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = P.query_start[s + 1] - P.query_start[s];
    const int64_t start = P.context_lens[s] - q_len;
    for (int32_t b = 0; b < q_len; b += QT) {
      const int32_t e = std::min(q_len, b + QT);
      const int64_t cost = (start + e) * (e - b);
      for (int32_t h = 0; h < P.kv_heads; ++h) items.push_back({s, h, b, e, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

template <typename T>
void write_cache(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots, int64_t kv_heads,
                 int64_t d) {
  const T* s = src.const_data_ptr<T>();
  T* c = cache.data_ptr<T>();
  const int64_t n = src.size(0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(c + (slots[t] * kv_heads + h) * d, s + t * src.stride(0) + h * src.stride(1), d * sizeof(T));
}

void check_rows(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, name, " must be [tokens, heads, head_dim], last dim contiguous");
  TORCH_CHECK(x.scalar_type() == dtype, name, " has dtype ", x.scalar_type(), ", the cache ", dtype);
}

void check_int32(const at::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.scalar_type() == at::kInt && x.dim() == dims && x.is_contiguous(), name,
              " must be a contiguous int32 tensor of ", dims, " dims");
}

// Writes k/v at slot_mapping, then attention for every query row. kv_cache is one layer's
// [2, num_blocks, block_size, KVH, D] pool.
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& query_start, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, num_blocks, block_size, kv_heads, head_dim] tensor");
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only, got ", dtype);
  const int64_t kv_heads = kv_cache.size(3), d = kv_cache.size(4);
  TORCH_CHECK(d % W == 0 && d <= MAX_NV * W, "head_dim must be a multiple of 16 up to 256, got ", d);
  check_rows(q, "q", dtype);
  check_rows(k, "k", dtype);
  check_rows(v, "v", dtype);
  check_rows(out, "out", dtype);
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
  if (dtype == at::kFloat) {
    write_cache<float>(k, key_cache, slots, kv_heads, d);
    write_cache<float>(v, value_cache, slots, kv_heads, d);
  } else {
    write_cache<c10::BFloat16>(k, key_cache, slots, kv_heads, d);
    write_cache<c10::BFloat16>(v, value_cache, slots, kv_heads, d);
  }

  Problem P{q.const_data_ptr(), out.data_ptr(), key_cache.const_data_ptr(), value_cache.const_data_ptr(),
            block_tables.const_data_ptr<int32_t>(), query_start.const_data_ptr<int32_t>(),
            context_lens.const_data_ptr<int32_t>(), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            block_tables.stride(0), kv_cache.size(2), kv_heads, q.size(1) / kv_heads, d, float(scale)};
  const std::vector<Item> items = make_items(P, num_seqs);
  const int64_t n = int64_t(items.size());
  std::atomic<int64_t> next{0};
  // one task per thread, each pulling items until none is left: costs differ by orders of magnitude
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (dtype == at::kFloat)
        attend_dispatch<float>(P, items[i], scratch);
      else
        attend_dispatch<c10::BFloat16>(P, items[i], scratch);
    }
  });
}

}  // namespace

TORCH_LIBRARY(nimbus, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!) kv_cache, Tensor slot_mapping, "
      "Tensor block_tables, Tensor query_start, Tensor context_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(nimbus, CPU, m) { m.impl("paged_attention", &paged_attention); }
