// Multi-token attention on CPU, forward and backward, for training and scoring: the softmax
// attention of queries q [B, T, U, H] over keys and values k, v [B, S, V, H] (grouped-query:
// query head u reads key/value head u / (U / V)) under a boolean mask [B, T, S].
//
// XLA:CPU runs a model's attention as many small batched matmuls around full [B, U, T, S]
// score tensors, with layout copies between them: about a fifth of a SmolLM2-135M training
// step. Here the scores of a block of query rows live only in a thread-local buffer (the way
// flash attention keeps them in on-chip memory): the forward pass writes just the output and
// one log-sum-exp per row, and the backward pass recomputes the probabilities from them. The
// operands are read in their own [B, T, heads, H] layout: no transposes, no repeated keys.
//
// Semantics match `softmax(where(mask, scale * q.k, -inf))` row by row, including a row whose
// mask is all False: like the XLA path (a very negative score for every key) it attends to
// every key uniformly, and no gradient reaches its scores.
//
// Work (blocks of query rows, blocks of keys) is shared with XLA's intra-op thread pool through
// an atomic counter, as in decode_matmul.cc. Built and loaded at first use by
// keras_llama/kernels/library.py.

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr int64_t kRowBlock = 32;  // query rows per forward / dQ work item
constexpr int64_t kKeyBlock = 64;  // keys per dK/dV work item
constexpr int64_t kRowChunk = 64;  // query rows per step inside a dK/dV work item

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// C[M, N] (=|+=) A[M, K] B[K, N]: A's element (m, k) at a[m * a_m + k * a_k], B's row k at
// b + k * ldb (N contiguous floats, N a multiple of 16), C's row m at c + m * ldc.
template <int R, int NV, bool kAccumulate>
void tile(const float* a, int64_t a_m, int64_t a_k, const float* b, int64_t ldb, float* c,
          int64_t ldc, int64_t K) {
  f32x16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = kAccumulate ? load(c + r * ldc + 16 * j) : f32x16{};
  for (int64_t k = 0; k < K; ++k) {
    f32x16 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load(b + k * ldb + 16 * j);
    for (int r = 0; r < R; ++r) {
      const float av = a[r * a_m + k * a_k];
      for (int j = 0; j < NV; ++j) acc[r][j] += av * bv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(c + r * ldc + 16 * j, acc[r][j]);
}

template <int R, bool kAccumulate>
void row_tile(const float* a, int64_t a_m, int64_t a_k, const float* b, int64_t ldb, float* c,
              int64_t ldc, int64_t N, int64_t K) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) tile<R, 4, kAccumulate>(a, a_m, a_k, b + j, ldb, c + j, ldc, K);
  switch ((N - j) / 16) {
    case 3: tile<R, 3, kAccumulate>(a, a_m, a_k, b + j, ldb, c + j, ldc, K); break;
    case 2: tile<R, 2, kAccumulate>(a, a_m, a_k, b + j, ldb, c + j, ldc, K); break;
    case 1: tile<R, 1, kAccumulate>(a, a_m, a_k, b + j, ldb, c + j, ldc, K); break;
    default: break;
  }
}

template <bool kAccumulate>
void gemm(const float* a, int64_t a_m, int64_t a_k, const float* b, int64_t ldb, float* c,
          int64_t ldc, int64_t M, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    row_tile<4, kAccumulate>(a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, N, K);
  for (; m < M; ++m) row_tile<1, kAccumulate>(a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, N, K);
}

inline float dot(const float* x, const float* y, int64_t n) {
  f32x16 acc = f32x16{};
  for (int64_t i = 0; i < n; i += 16) acc += load(x + i) * load(y + i);
  return hsum(acc);
}

// out[h, j] = rows[j][h] for j < n (rows of `width` floats at src + j * stride), zero for
// n <= j < n16 (out's row length).
void transpose_rows(const float* src, int64_t stride, int64_t n, int64_t width, float* out,
                    int64_t n16) {
  for (int64_t h = 0; h < width; ++h) {
    float* o = out + h * n16;
    for (int64_t j = 0; j < n; ++j) o[j] = src[j * stride + h];
    for (int64_t j = n; j < n16; ++j) o[j] = 0.0f;
  }
}

struct Shape {
  int64_t B, T, S, U, V, H, G;
};

// Per query row (b, t): the first and last key its mask allows (lo > hi when none).
struct RowRanges {
  std::vector<int32_t> lo, hi;
  RowRanges(const bool* mask, const Shape& d) : lo(d.B * d.T), hi(d.B * d.T) {
    for (int64_t r = 0; r < d.B * d.T; ++r) {
      const bool* m = mask + r * d.S;
      int64_t first = 0, last = d.S - 1;
      while (first < d.S && !m[first]) ++first;
      while (last >= first && !m[last]) --last;
      lo[r] = static_cast<int32_t>(first);
      hi[r] = static_cast<int32_t>(last);
    }
  }
  bool empty(int64_t r) const { return lo[r] > hi[r]; }
};

// Probabilities of one query row over keys [s0, s0 + n) (buffer p, n16 long) from its scores
// (in p) and the row's log-sum-exp: exp(scale * score - lse) where the mask allows, else 0;
// 1 / S everywhere for a row with no allowed key (its lse is log S, its scores are ignored).
inline void probabilities(float* p, const bool* mask_row, int64_t s0, int64_t n, int64_t n16,
                          float scale, float lse, bool empty, int64_t S) {
  if (empty) {
    const float u = 1.0f / static_cast<float>(S);
    for (int64_t j = 0; j < n; ++j) p[j] = u;
    for (int64_t j = n; j < n16; ++j) p[j] = 0.0f;
    return;
  }
  const f32x16 vs = splat(scale), vl = splat(lse);
  for (int64_t j = 0; j < n16; j += 16) store(p + j, vexp(load(p + j) * vs - vl));
  for (int64_t j = 0; j < n; ++j)
    if (!mask_row[s0 + j]) p[j] = 0.0f;
  for (int64_t j = n; j < n16; ++j) p[j] = 0.0f;
}

// --- forward --------------------------------------------------------------------------------
struct Forward {
  Shape d;
  float scale;
  const float *q, *k, *v;
  const bool* mask;
  float *o, *lse;
  std::unique_ptr<RowRanges> ranges;
  int64_t row_blocks, items;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    std::vector<float> kt, scores;
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      // Heaviest (latest) row blocks first.
      const int64_t blk = row_blocks - 1 - item % row_blocks, bv = item / row_blocks;
      const int64_t b = bv / d.V, vh = bv % d.V;
      const int64_t t0 = blk * kRowBlock, rows = std::min(kRowBlock, d.T - t0);
      int64_t n = 0;
      for (int64_t t = t0; t < t0 + rows; ++t) {
        const int64_t r = b * d.T + t;
        n = std::max<int64_t>(n, ranges->empty(r) ? d.S : ranges->hi[r] + 1);
      }
      const int64_t n16 = round16(std::max<int64_t>(n, 1));
      const int64_t kv_row = d.V * d.H;  // stride between consecutive keys
      const float* kb = k + b * d.S * kv_row + vh * d.H;
      const float* vb = v + b * d.S * kv_row + vh * d.H;
      kt.resize(d.H * n16);
      scores.resize(rows * n16);
      transpose_rows(kb, kv_row, n, d.H, kt.data(), n16);
      for (int64_t g = 0; g < d.G; ++g) {
        const int64_t u = vh * d.G + g;
        const float* qb = q + ((b * d.T + t0) * d.U + u) * d.H;
        gemm<false>(qb, d.U * d.H, 1, kt.data(), n16, scores.data(), n16, rows, n16, d.H);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = b * d.T + t0 + i;
          float* p = scores.data() + i * n16;
          const bool* m = mask + r * d.S;
          float row_lse;
          if (ranges->empty(r)) {
            row_lse = std::log(static_cast<float>(d.S));
          } else {
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t j = ranges->lo[r]; j <= ranges->hi[r]; ++j)
              if (m[j]) mx = std::max(mx, p[j] * scale);
            const f32x16 vs = splat(scale), vm = splat(mx);
            f32x16 sum = f32x16{};
            for (int64_t j = 0; j < n16; j += 16) {
              f32x16 e = vexp(load(p + j) * vs - vm);
              for (int l = 0; l < 16; ++l)
                if (j + l >= n || !m[j + l]) e[l] = 0.0f;
              store(p + j, e);
              sum += e;
            }
            const float total = hsum(sum);
            row_lse = mx + std::log(total);
            const f32x16 inv = splat(1.0f / total);
            for (int64_t j = 0; j < n16; j += 16) store(p + j, load(p + j) * inv);
          }
          if (ranges->empty(r)) probabilities(p, m, 0, n, n16, scale, row_lse, true, d.S);
          lse[(b * d.U + u) * d.T + t0 + i] = row_lse;
        }
        float* ob = o + ((b * d.T + t0) * d.U + u) * d.H;
        gemm<false>(scores.data(), n16, 1, vb, kv_row, ob, d.U * d.H, rows, d.H, n);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// --- backward -------------------------------------------------------------------------------
struct Backward {
  Shape d;
  float scale;
  const float *q, *k, *v, *o, *lse, *dout;
  const bool* mask;
  float *dq, *dk, *dv;
  std::unique_ptr<RowRanges> ranges;
  int64_t row_blocks, key_blocks, dq_items, items;
  bool single_pass;
  std::atomic<int64_t> next{0}, done{0};

  // dQ for one block of query rows (all query heads of one key/value head).
  void query_block(int64_t item, std::vector<float>& kt, std::vector<float>& vt,
                   std::vector<float>& p, std::vector<float>& dp) {
    const int64_t blk = row_blocks - 1 - item % row_blocks, bv = item / row_blocks;
    const int64_t b = bv / d.V, vh = bv % d.V;
    const int64_t t0 = blk * kRowBlock, rows = std::min(kRowBlock, d.T - t0);
    int64_t n = 0;
    for (int64_t t = t0; t < t0 + rows; ++t) {
      const int64_t r = b * d.T + t;
      if (!ranges->empty(r)) n = std::max<int64_t>(n, ranges->hi[r] + 1);
    }
    const int64_t kv_row = d.V * d.H, q_row = d.U * d.H;
    const float* kb = k + b * d.S * kv_row + vh * d.H;
    const float* vb = v + b * d.S * kv_row + vh * d.H;
    if (n == 0) {  // every row empty: no gradient reaches the queries
      for (int64_t g = 0; g < d.G; ++g)
        for (int64_t i = 0; i < rows; ++i)
          std::memset(dq + ((b * d.T + t0 + i) * d.U + vh * d.G + g) * d.H, 0,
                      d.H * sizeof(float));
      return;
    }
    const int64_t n16 = round16(n);
    kt.resize(d.H * n16);
    vt.resize(d.H * n16);
    p.resize(rows * n16);
    dp.resize(rows * n16);
    transpose_rows(kb, kv_row, n, d.H, kt.data(), n16);
    transpose_rows(vb, kv_row, n, d.H, vt.data(), n16);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t u = vh * d.G + g;
      const int64_t first = (b * d.T + t0) * d.U + u;
      gemm<false>(q + first * d.H, q_row, 1, kt.data(), n16, p.data(), n16, rows, n16, d.H);
      gemm<false>(dout + first * d.H, q_row, 1, vt.data(), n16, dp.data(), n16, rows, n16, d.H);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = b * d.T + t0 + i;
        float* pi = p.data() + i * n16;
        float* dpi = dp.data() + i * n16;
        if (ranges->empty(r)) {
          std::memset(dpi, 0, n16 * sizeof(float));
          continue;
        }
        probabilities(pi, mask + r * d.S, 0, n, n16, scale, lse[(b * d.U + u) * d.T + t0 + i],
                      false, d.S);
        const float D = dot(dout + (first + i * d.U) * d.H, o + (first + i * d.U) * d.H, d.H);
        const f32x16 vd = splat(D);
        for (int64_t j = 0; j < n16; j += 16) store(dpi + j, load(pi + j) * (load(dpi + j) - vd));
      }
      float* dqb = dq + first * d.H;
      gemm<false>(dp.data(), n16, 1, kb, kv_row, dqb, q_row, rows, d.H, n);
      const f32x16 vs = splat(scale);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t h = 0; h < d.H; h += 16)
          store(dqb + i * q_row + h, load(dqb + i * q_row + h) * vs);
    }
  }

  // dK and dV for one block of keys (from every query head of their key/value head).
  // With ``with_dq``, also adds this block's share of dQ (unscaled) into dq: the caller owns
  // every query head of this key/value head (single-pass mode).
  void key_block(int64_t item, std::vector<float>& kt, std::vector<float>& vt,
                 std::vector<float>& p, std::vector<float>& dp, std::vector<float>& acc,
                 bool with_dq) {
    const int64_t blk = item % key_blocks, bv = item / key_blocks;  // earliest (heaviest) first
    const int64_t b = bv / d.V, vh = bv % d.V;
    const int64_t s0 = blk * kKeyBlock, n = std::min(kKeyBlock, d.S - s0), n16 = round16(n);
    const int64_t kv_row = d.V * d.H, q_row = d.U * d.H;
    const float* kb = k + (b * d.S + s0) * kv_row + vh * d.H;
    const float* vb = v + (b * d.S + s0) * kv_row + vh * d.H;
    // The query rows that see a key of this block (or see every key uniformly).
    int64_t ta = d.T, tb = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t r = b * d.T + t;
      if (ranges->empty(r) || (ranges->lo[r] < s0 + n && ranges->hi[r] >= s0)) {
        ta = std::min(ta, t);
        tb = t + 1;
      }
    }
    acc.assign(2 * n * d.H, 0.0f);  // dK then dV, [n, H] each
    float* dk_acc = acc.data();
    float* dv_acc = acc.data() + n * d.H;
    kt.resize(d.H * n16);
    vt.resize(d.H * n16);
    p.resize(kRowChunk * n16);
    dp.resize(kRowChunk * n16);
    transpose_rows(kb, kv_row, n, d.H, kt.data(), n16);
    transpose_rows(vb, kv_row, n, d.H, vt.data(), n16);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t u = vh * d.G + g;
      for (int64_t c0 = ta; c0 < tb; c0 += kRowChunk) {
        const int64_t rows = std::min(kRowChunk, tb - c0);
        const int64_t first = (b * d.T + c0) * d.U + u;
        gemm<false>(q + first * d.H, q_row, 1, kt.data(), n16, p.data(), n16, rows, n16, d.H);
        gemm<false>(dout + first * d.H, q_row, 1, vt.data(), n16, dp.data(), n16, rows, n16,
                    d.H);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = b * d.T + c0 + i;
          float* pi = p.data() + i * n16;
          float* dpi = dp.data() + i * n16;
          const bool empty = ranges->empty(r);
          probabilities(pi, mask + r * d.S, s0, n, n16, scale,
                        lse[(b * d.U + u) * d.T + c0 + i], empty, d.S);
          if (empty) {
            std::memset(dpi, 0, n16 * sizeof(float));
            continue;
          }
          const float D = dot(dout + (first + i * d.U) * d.H, o + (first + i * d.U) * d.H, d.H);
          const f32x16 vd = splat(D);
          for (int64_t j = 0; j < n16; j += 16)
            store(dpi + j, load(pi + j) * (load(dpi + j) - vd));
        }
        // dV += P^T dO, dK += dS^T Q over this chunk's rows.
        gemm<true>(p.data(), 1, n16, dout + first * d.H, q_row, dv_acc, d.H, n, d.H, rows);
        gemm<true>(dp.data(), 1, n16, q + first * d.H, q_row, dk_acc, d.H, n, d.H, rows);
        if (with_dq) gemm<true>(dp.data(), n16, 1, kb, kv_row, dq + first * d.H, q_row, rows, d.H, n);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      float* dkr = dk + (b * d.S + s0 + j) * kv_row + vh * d.H;
      float* dvr = dv + (b * d.S + s0 + j) * kv_row + vh * d.H;
      for (int64_t h = 0; h < d.H; ++h) {
        dkr[h] = dk_acc[j * d.H + h] * scale;
        dvr[h] = dv_acc[j * d.H + h];
      }
    }
  }

  // Single pass for one (batch, key/value head): dK and dV block by block, dQ accumulated
  // along the way (5 products per score block instead of the two-pass 7).
  void head_pair(int64_t bv, std::vector<float>& kt, std::vector<float>& vt,
                 std::vector<float>& p, std::vector<float>& dp, std::vector<float>& acc) {
    const int64_t b = bv / d.V, vh = bv % d.V;
    for (int64_t t = 0; t < d.T; ++t)
      std::memset(dq + ((b * d.T + t) * d.U + vh * d.G) * d.H, 0, d.G * d.H * sizeof(float));
    for (int64_t blk = 0; blk < key_blocks; ++blk)
      key_block(bv * key_blocks + blk, kt, vt, p, dp, acc, true);
    const f32x16 vs = splat(scale);
    for (int64_t t = 0; t < d.T; ++t) {
      float* row = dq + ((b * d.T + t) * d.U + vh * d.G) * d.H;
      for (int64_t h = 0; h < d.G * d.H; h += 16) store(row + h, load(row + h) * vs);
    }
  }

  void run() {
    std::vector<float> kt, vt, p, dp, acc;
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      if (single_pass) {
        head_pair(item, kt, vt, p, dp, acc);
      } else if (item < dq_items) {
        query_block(item, kt, vt, p, dp);
      } else {
        key_block(item - dq_items, kt, vt, p, dp, acc, false);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error check_shapes(const char* name, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                        ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& mask, Shape* d) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3 ||
      kd[0] != qd[0] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3] || md[0] != qd[0] || md[1] != qd[1] ||
      md[2] != kd[1] || kd[2] == 0 || qd[2] % kd[2] != 0 || qd[3] % 16 != 0) {
    return ffi::Error::InvalidArgument(
        std::string(name) +
        ": expected q [B, T, U, H], k and v [B, S, V, H], mask [B, T, S], U % V == 0, "
        "H % 16 == 0");
  }
  *d = Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], qd[2] / kd[2]};
  return ffi::Error::Success();
}

ffi::Error attention_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::PRED> mask, float scale,
                             ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Shape d;
  ffi::Error status = check_shapes("attention_forward", q, k, v, mask, &d);
  if (status.failure()) return status;
  if (d.B * d.T == 0) return ffi::Error::Success();
  if (d.S == 0) return ffi::Error::InvalidArgument("attention_forward: no keys (S == 0)");
  auto work = std::make_shared<Forward>();
  work->d = d;
  work->scale = scale;
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->mask = mask.typed_data();
  work->o = o->typed_data();
  work->lse = lse->typed_data();
  work->ranges = std::make_unique<RowRanges>(work->mask, d);
  work->row_blocks = (d.T + kRowBlock - 1) / kRowBlock;
  work->items = d.B * d.V * work->row_blocks;
  run_shared(pool, work);
  return ffi::Error::Success();
}

ffi::Error attention_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o,
                              ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                              int32_t passes, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                              ffi::ResultBuffer<ffi::F32> dv) {
  Shape d;
  ffi::Error status = check_shapes("attention_backward", q, k, v, mask, &d);
  if (status.failure()) return status;
  if (o.element_count() != q.element_count() || dout.element_count() != q.element_count() ||
      static_cast<int64_t>(lse.element_count()) != d.B * d.U * d.T) {
    return ffi::Error::InvalidArgument(
        "attention_backward: expected o and dout like q, lse [B, U, T]");
  }
  if (d.S == 0 || d.B * d.T == 0) {
    std::memset(dq->typed_data(), 0, q.element_count() * sizeof(float));
    std::memset(dk->typed_data(), 0, k.element_count() * sizeof(float));
    std::memset(dv->typed_data(), 0, v.element_count() * sizeof(float));
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Backward>();
  work->d = d;
  work->scale = scale;
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->mask = mask.typed_data();
  work->o = o.typed_data();
  work->lse = lse.typed_data();
  work->dout = dout.typed_data();
  work->dq = dq->typed_data();
  work->dk = dk->typed_data();
  work->dv = dv->typed_data();
  work->ranges = std::make_unique<RowRanges>(work->mask, d);
  work->row_blocks = (d.T + kRowBlock - 1) / kRowBlock;
  work->key_blocks = (d.S + kKeyBlock - 1) / kKeyBlock;
  work->dq_items = d.B * d.V * work->row_blocks;
  // One pass per (batch, key/value head) when there are enough of them to keep every thread
  // busy; otherwise two passes (query blocks for dQ, key blocks for dK and dV) for finer work.
  // ``passes``: 1 or 2 forces a scheme (tests), 0 chooses.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->single_pass = passes == 1 || (passes == 0 && d.B * d.V >= 4 * threads);
  work->items = work->single_pass ? d.B * d.V
                                  : work->dq_items + d.B * d.V * work->key_blocks;
  run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaAttentionForward, attention_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaAttentionBackward, attention_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("passes")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
