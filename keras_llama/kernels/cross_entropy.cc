// Softmax cross-entropy from logits on CPU, forward and backward, for training a language
// model: per row of logits [N, V] (float32) and an int label,
//
//   forward:  loss = logsumexp(logits) - logits[label],  and the row's logsumexp;
//   backward: dlogits = (exp(logits - logsumexp) - one_hot(label)) * grad[row].
//
// A label outside [0, V) contributes nothing, as in Keras (its one-hot row is all zeros):
// loss 0 and gradient 0.
//
// At a 49k vocabulary the logits are the largest tensor of a small model's training step
// ([1024, 49152] float32 = 200 MB at 4 x 256 tokens). XLA:CPU makes three passes over them
// with scalar exponentials (about 0.2 s of a SmolLM2-135M step); here the forward pass reads
// them twice and the backward pass once, with 16-wide exponentials, and the backward pass
// can write its gradient over the logits (the caller aliases them).
//
// Rows are shared with XLA's intra-op thread pool through an atomic counter, as in
// decode_matmul.cc. Built and loaded at first use by keras_llama/kernels/__init__.py.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

constexpr int64_t kRowsPerItem = 8;

inline f32x16 load(const float* p) { return *reinterpret_cast<const f32x16u*>(p); }
inline void store(float* p, f32x16 v) { *reinterpret_cast<f32x16u*>(p) = v; }
inline f32x16 splat(float x) { return f32x16{} + x; }

// exp(x) for 16 floats (Cephes' single-precision polynomial; about 1 ulp). Inputs below -87
// give 0.
inline f32x16 vexp(f32x16 x) {
  const f32x16 lo = splat(-87.0f), hi = splat(88.0f);
  const i32x16 tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  f32x16 fx = x * 1.44269504088896341f + 0.5f;
  i32x16 n = __builtin_convertvector(fx, i32x16);
  f32x16 fn = __builtin_convertvector(n, f32x16);
  const i32x16 over = fn > fx;
  fn = over ? fn - 1.0f : fn;
  n = __builtin_convertvector(fn, i32x16);
  const f32x16 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const f32x16 r2 = r * r;
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const f32x16 out = p * scale;
  return tiny ? f32x16{} : out;
}

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

// logsumexp of one row of V floats.
float row_logsumexp(const float* x, int64_t V) {
  const int64_t body = V / 16 * 16;
  float mx = -std::numeric_limits<float>::infinity();
  if (body) {
    f32x16 m = load(x);
    for (int64_t j = 16; j < body; j += 16) {
      const f32x16 v = load(x + j);
      m = v > m ? v : m;
    }
    mx = hmax(m);
  }
  for (int64_t j = body; j < V; ++j) mx = std::max(mx, x[j]);
  if (std::isinf(mx)) return mx;  // all -inf (or an inf): logsumexp is that value
  const f32x16 vm = splat(mx);
  f32x16 acc = f32x16{};
  for (int64_t j = 0; j < body; j += 16) acc += vexp(load(x + j) - vm);
  float sum = hsum(acc);
  for (int64_t j = body; j < V; ++j) sum += std::exp(x[j] - mx);
  return mx + std::log(sum);
}

struct Rows {
  int64_t N, V, items;
  std::atomic<int64_t> next{0}, done{0};
  virtual void rows(int64_t first, int64_t last) = 0;
  virtual ~Rows() = default;
  void run() {
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      const int64_t first = item * kRowsPerItem;
      rows(first, std::min(N, first + kRowsPerItem));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

struct Forward : Rows {
  const float* logits;
  const int32_t* labels;
  float *loss, *lse;
  void rows(int64_t first, int64_t last) override {
    for (int64_t r = first; r < last; ++r) {
      const float* x = logits + r * V;
      const int32_t label = labels[r];
      const float l = row_logsumexp(x, V);
      lse[r] = l;
      loss[r] = (label >= 0 && label < V) ? l - x[label] : 0.0f;
    }
  }
};

struct Backward : Rows {
  const float* logits;
  const int32_t* labels;
  const float *lse, *grad;
  float* dlogits;
  void rows(int64_t first, int64_t last) override {
    const int64_t body = V / 16 * 16;
    for (int64_t r = first; r < last; ++r) {
      const float* x = logits + r * V;
      float* d = dlogits + r * V;
      const int32_t label = labels[r];
      if (label < 0 || label >= V) {
        std::memset(d, 0, V * sizeof(float));
        continue;
      }
      const float g = grad[r];
      const f32x16 vl = splat(lse[r]), vg = splat(g);
      for (int64_t j = 0; j < body; j += 16) store(d + j, vexp(load(x + j) - vl) * vg);
      for (int64_t j = body; j < V; ++j) d[j] = std::exp(x[j] - lse[r]) * g;
      d[label] -= g;
    }
  }
};

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

void run_shared(ffi::ThreadPool& pool, const std::shared_ptr<Rows>& work) {
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

bool rows_and_vocab(const ffi::Buffer<ffi::F32>& logits, int64_t* N, int64_t* V) {
  const auto d = logits.dimensions();
  if (d.size() != 2) return false;
  *N = d[0];
  *V = d[1];
  return true;
}

ffi::Error cross_entropy_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                                 ffi::Buffer<ffi::S32> labels, ffi::ResultBuffer<ffi::F32> loss,
                                 ffi::ResultBuffer<ffi::F32> lse) {
  int64_t N, V;
  if (!rows_and_vocab(logits, &N, &V) || static_cast<int64_t>(labels.element_count()) != N ||
      static_cast<int64_t>(loss->element_count()) != N ||
      static_cast<int64_t>(lse->element_count()) != N) {
    return ffi::Error::InvalidArgument(
        "cross_entropy_forward: expected logits [N, V], labels [N], loss and lse [N]");
  }
  if (N == 0) return ffi::Error::Success();
  auto work = std::make_shared<Forward>();
  work->N = N;
  work->V = V;
  work->items = (N + kRowsPerItem - 1) / kRowsPerItem;
  work->logits = logits.typed_data();
  work->labels = labels.typed_data();
  work->loss = loss->typed_data();
  work->lse = lse->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

ffi::Error cross_entropy_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                                  ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> lse,
                                  ffi::Buffer<ffi::F32> grad,
                                  ffi::ResultBuffer<ffi::F32> dlogits) {
  int64_t N, V;
  if (!rows_and_vocab(logits, &N, &V) || static_cast<int64_t>(labels.element_count()) != N ||
      static_cast<int64_t>(lse.element_count()) != N ||
      static_cast<int64_t>(grad.element_count()) != N ||
      dlogits->element_count() != logits.element_count()) {
    return ffi::Error::InvalidArgument(
        "cross_entropy_backward: expected logits [N, V], labels, lse and grad [N], "
        "dlogits [N, V]");
  }
  if (N == 0) return ffi::Error::Success();
  auto work = std::make_shared<Backward>();
  work->N = N;
  work->V = V;
  work->items = (N + kRowsPerItem - 1) / kRowsPerItem;
  work->logits = logits.typed_data();
  work->labels = labels.typed_data();
  work->lse = lse.typed_data();
  work->grad = grad.typed_data();
  work->dlogits = dlogits->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaCrossEntropyForward, cross_entropy_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaCrossEntropyBackward, cross_entropy_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
