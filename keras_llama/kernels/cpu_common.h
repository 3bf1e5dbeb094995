// Shared by the native CPU kernels (decode_matmul.cc, block_dot.cc, attention.cc, ...): 16-float
// vectors (GCC/Clang vector extensions: AVX-512 registers under -march=native on x86, two AVX2
// or four NEON registers elsewhere), a vectorized exp, the way a call shares its work with
// XLA's intra-op thread pool, and the panel scheduling of the decode matmuls.

#ifndef KERAS_LLAMA_KERNELS_CPU_COMMON_H_
#define KERAS_LLAMA_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace keras_llama {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load(const float* p) { return *reinterpret_cast<const f32x16u*>(p); }
inline void store(float* p, f32x16 v) { *reinterpret_cast<f32x16u*>(p) = v; }
inline f32x16 splat(float x) { return f32x16{} + x; }

inline float hsum(f32x16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

inline float hmax(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for 16 floats (Cephes' single-precision polynomial; about 1 ulp). Inputs below -87
// give 0, above 88 saturate.
inline f32x16 vexp(f32x16 x) {
  const f32x16 lo = splat(-87.0f), hi = splat(88.0f);
  const i32x16 tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x16 fx = x * 1.44269504088896341f + 0.5f;
  f32x16 fn = __builtin_convertvector(__builtin_convertvector(fx, i32x16), f32x16);
  fn = fn > fx ? fn - 1.0f : fn;  // truncation rounded a negative value up: floor it
  const i32x16 n = __builtin_convertvector(fn, i32x16);
  const f32x16 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const f32x16 r2 = r * r;
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const i32x16 bits = (n + 127) << 23;  // 2^n
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const f32x16 out = p * scale;
  return tiny ? f32x16{} : out;
}

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs ``work->run()`` on the calling thread and on up to ``items - 1`` helpers from XLA's
// intra-op pool, then waits until ``work->done`` reaches ``work->items``. ``run()`` claims
// items through an atomic counter until none is left and counts each one it finishes, so a
// helper that starts late finds nothing to do and the caller never waits for it; ``work`` is
// kept alive by whoever still holds it.
template <typename Work>
void run_shared(xla::ffi::ThreadPool& pool, const std::shared_ptr<Work>& work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads - 1, work->items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  int64_t spins = 0;
  while (work->done.load(std::memory_order_acquire) < work->items) {
    pause();
    if (++spins > 4096) std::this_thread::yield();
  }
}

// Calls ``f(std::integral_constant<int, R>{})`` with R = ``rows`` (1..8; more is 8): a kernel
// compiled for its number of input rows, chosen at run time.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Panels [0, panels) in chunks of ``chunk``, claimed by the threads of `run_shared`.
template <typename Body>
struct PanelChunks {
  Body body;  // body(first, last): panels [first, last)
  int64_t panels, chunk, items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  PanelChunks(Body b, int64_t count, int64_t size)
      : body(std::move(b)), panels(count), chunk(size), items((count + size - 1) / size) {}

  void run() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= items) return;
      body(c * chunk, std::min(panels, c * chunk + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs ``body(first, last)`` over panels [0, panels) of ``panel_bytes`` each, shared with
// XLA's pool: about 4 chunks per thread, each at least 64 KB of weights. ``body`` moves into
// the shared work, so what it captures by value outlives a helper that starts late.
template <typename Body>
void run_panel_chunks(xla::ffi::ThreadPool& pool, int64_t panels, int64_t panel_bytes,
                      Body body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_panels = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, panel_bytes));
  const int64_t chunk = std::max(min_panels, (panels + 4 * threads - 1) / (4 * threads));
  run_shared(pool, std::make_shared<PanelChunks<Body>>(std::move(body), panels, chunk));
}

}  // namespace keras_llama

#endif  // KERAS_LLAMA_KERNELS_CPU_COMMON_H_
