// Decoding attention on CPU: one query per row (and query head) against the key/value caches,
// in the caches' own layout (keras_llama/models/llama/llama_cache.py):
//
//   query  [N, G, H]   N = batch * key/value heads, G query heads per key/value head
//   keys   [R, H, S]   (transposed: one key dimension's values for every position contiguous)
//   values [R, S, H]   R >= N: caches may hold more rows than the queries (the serving
//                      engine's step over its leading rows); rows [0, N) are the queries'.
//   mask   [B, S]      bool, N = B * V (row n reads mask row n / V)
//   out    [N, G, H]   softmax(where(mask, scale * q.k, -1e30)) @ v
//
// The caches are float32 or float16 (`compile(kv_cache_dtype="float16")`: half the memory and
// half the bytes read per step); float16 values are widened to float32 as they are loaded, and
// all arithmetic is float32.
//
// Only the positions from the first to the last unmasked one are read: while a cache fills,
// decoding step t reads t positions, not the cache's full length. Inside that range, masked
// positions (left padding, or the slots of other requests in the serving engine's shared
// cache) get the score -1e30 as in XLA's path, and their keys and values are not read: a
// block of 16 masked positions is skipped, and a masked position's weight is exactly 0. A row
// with no unmasked position attends to every position uniformly, as that path does.
//
// Work is one item per row n, shared with XLA's intra-op pool (cpu_common.h: run_shared).

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "halves.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr float kMasked = -1e30f;
constexpr int64_t kMaxGroups = 16;  // query heads per key/value head, in registers

// 16 cache values -> float32 (``count`` < 16: the rest are zeros).
inline f32x16 load_cache(const float* p) { return load(p); }
inline f32x16 load_cache(const uint16_t* p) { return load_halves(p); }

template <typename T>
inline f32x16 load_cache(const T* p, int64_t count) {
  if (count == 16) return load_cache(p);
  T part[16] = {};
  std::memcpy(part, p, count * sizeof(T));
  return load_cache(part);
}

// T: the caches' element type, float (float32) or uint16_t (float16 bits).
template <typename T>
struct Work {
  const float* query;
  const T* keys;
  const T* values;
  const bool* mask;
  float* out;
  int64_t N, G, H, S, V;
  float scale;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    std::vector<float> scores;
    for (;;) {
      const int64_t n = next.fetch_add(1, std::memory_order_relaxed);
      if (n >= items) return;
      one_row(n, &scores);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  void one_row(int64_t n, std::vector<float>* buffer) {
    // Compile-time query groups and head size (in 16-float chunks) for the common shapes:
    // the sums then stay in registers.
    if (H == 64) {
      switch (G) {
        case 1: return row<1, 4>(n, buffer);
        case 2: return row<2, 4>(n, buffer);
        case 3: return row<3, 4>(n, buffer);
        case 4: return row<4, 4>(n, buffer);
        case 8: return row<8, 4>(n, buffer);
        default: break;
      }
    } else if (H == 128) {
      switch (G) {
        case 1: return row<1, 8>(n, buffer);
        case 2: return row<2, 8>(n, buffer);
        case 4: return row<4, 8>(n, buffer);
        case 8: return row<8, 8>(n, buffer);
        default: break;
      }
    }
    row<0, 0>(n, buffer);
  }

  // kG query heads per key/value head and kC chunks of 16 head dimensions (0: G and H / 16
  // read at run time).
  template <int kG, int kC>
  void row(int64_t n, std::vector<float>* buffer) {
    const int64_t groups = kG > 0 ? kG : G, chunks = kC > 0 ? kC : H / 16;
    constexpr int kGroups = kG > 0 ? kG : kMaxGroups;
    const bool* m = mask + (n / V) * S;
    int64_t lo = 0, hi = S;
    while (lo < S && !m[lo]) ++lo;
    while (hi > lo && !m[hi - 1]) --hi;
    const bool none = lo == hi;
    if (none) {  // nothing unmasked: every position, all scores equal
      lo = 0;
      hi = S;
    }
    const int64_t count = hi - lo;
    const int64_t padded = (count + 15) / 16 * 16;
    buffer->resize(groups * padded);
    float* scores = buffer->data();
    const float* q = query + n * groups * chunks * 16;
    const T* k = keys + n * H * S;
    // scores[g, s] = scale * sum_h q[g, h] k[h, lo + s], 16 positions at a time.
    for (int64_t s0 = 0; s0 < count; s0 += 16) {
      const int64_t width = std::min<int64_t>(16, count - s0);
      if (!none && std::none_of(m + lo + s0, m + lo + s0 + width, [](bool b) { return b; })) {
        continue;  // all masked: their scores are set to -1e30 below, nothing read
      }
      f32x16 acc[kGroups];
      for (int64_t g = 0; g < groups; ++g) acc[g] = f32x16{};
      for (int64_t h = 0; h < H; ++h) {
        const f32x16 kv = load_cache(k + h * S + lo + s0, width);
        for (int64_t g = 0; g < groups; ++g) acc[g] += q[g * H + h] * kv;
      }
      for (int64_t g = 0; g < groups; ++g) store(scores + g * padded + s0, acc[g] * scale);
    }
    // Masked positions inside the range (all of them when none is unmasked: equal scores,
    // uniform weights), then a softmax per query head.
    for (int64_t s = 0; s < count; ++s) {
      if (!m[lo + s]) {
        for (int64_t g = 0; g < groups; ++g) scores[g * padded + s] = kMasked;
      }
    }
    float inverse[kGroups];
    for (int64_t g = 0; g < groups; ++g) {
      float* p = scores + g * padded;
      float top = kMasked;
      for (int64_t s = 0; s < count; ++s) top = std::max(top, p[s]);
      float total = 0.0f;
      for (int64_t s0 = 0; s0 < count; s0 += 16) {
        const f32x16 e = vexp(load(p + s0) - top);
        store(p + s0, e);
        for (int64_t i = 0; i < std::min<int64_t>(16, count - s0); ++i) total += e[i];
      }
      inverse[g] = 1.0f / total;
    }
    // out[g, :] = sum_s p[g, s] v[lo + s, :]: each value row read once for every query head.
    const T* v = values + n * S * H;
    float* o = out + n * groups * H;
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
      const int64_t cs = std::min<int64_t>(4, chunks - c0);
      f32x16 acc[kGroups][4];
      for (int64_t g = 0; g < groups; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = f32x16{};
      for (int64_t s = 0; s < count; ++s) {
        if (!none && !m[lo + s]) continue;  // weight exactly 0 (exp(-1e30 - top))
        const T* row = v + (lo + s) * H + c0 * 16;
        for (int64_t c = 0; c < cs; ++c) {
          const f32x16 vv = load_cache(row + c * 16);
          for (int64_t g = 0; g < groups; ++g) acc[g][c] += scores[g * padded + s] * vv;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t c = 0; c < cs; ++c) store(o + g * H + (c0 + c) * 16, acc[g][c] * inverse[g]);
      }
    }
  }
};

template <typename T, typename Cache>
ffi::Error decode_attention(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& query, Cache& keys,
                            Cache& values, ffi::Buffer<ffi::PRED>& mask,
                            ffi::ResultBuffer<ffi::F32>& out, float scale) {
  const auto qd = query.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  const auto md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 ||
      kd[0] < qd[0] || kd[1] != qd[2] || vd[0] != kd[0] || vd[1] != kd[2] ||
      vd[2] != qd[2] || md[1] != kd[2] || md[0] <= 0 || qd[0] % md[0] != 0 ||
      qd[1] > kMaxGroups || qd[2] % 16 != 0 || kd[2] <= 0) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected query [N, G <= 16, H % 16 == 0], keys [R >= N, H, S], "
        "values [R, S, H], mask [B, S] with N a multiple of B");
  }
  auto work = std::make_shared<Work<T>>();
  work->query = query.typed_data();
  work->keys = reinterpret_cast<const T*>(keys.untyped_data());
  work->values = reinterpret_cast<const T*>(values.untyped_data());
  work->mask = mask.typed_data();
  work->out = out->typed_data();
  work->N = qd[0];
  work->G = qd[1];
  work->H = qd[2];
  work->S = kd[2];
  work->V = qd[0] / md[0];
  work->scale = scale;
  work->items = qd[0];
  run_shared(pool, work);
  return ffi::Error::Success();
}

ffi::Error decode_attention_f32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> query,
                                ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                                ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                                float scale) {
  return decode_attention<float>(pool, query, keys, values, mask, out, scale);
}

ffi::Error decode_attention_f16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> query,
                                ffi::Buffer<ffi::F16> keys, ffi::Buffer<ffi::F16> values,
                                ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                                float scale) {
  return decode_attention<uint16_t>(pool, query, keys, values, mask, out, scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeAttention, decode_attention_f32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaDecodeAttentionF16, decode_attention_f16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
