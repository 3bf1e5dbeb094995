// The gated feed-forward activation of Llama (SwiGLU) on CPU, forward and backward:
//
//   forward:  out = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   backward: dgate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  dup = dout * silu(g)
//
// XLA:CPU computes these as three to five separate elementwise passes with scalar
// exponentials (about 0.25 s of a SmolLM2-135M training step, 30 x [1024, 1536]); here each
// direction is one pass with 16-wide exponentials. Elements are shared with XLA's intra-op
// thread pool in blocks (cpu_common.h). Built and loaded at first use by
// keras_llama/kernels/library.py.

#include <cmath>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace keras_llama;  // NOLINT: the shared vector helpers

constexpr int64_t kBlock = 16384;  // elements per work item

inline f32x16 sigmoid(f32x16 g) { return 1.0f / (1.0f + vexp(-g)); }
inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

struct Elementwise {
  int64_t n, items;
  std::atomic<int64_t> next{0}, done{0};
  virtual void block(int64_t first, int64_t last) = 0;
  virtual ~Elementwise() = default;
  void run() {
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      const int64_t first = item * kBlock;
      block(first, std::min(n, first + kBlock));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

struct Forward : Elementwise {
  const float *gate, *up;
  float* out;
  void block(int64_t first, int64_t last) override {
    int64_t i = first;
    for (; i + 16 <= last; i += 16) {
      const f32x16 g = load(gate + i);
      store(out + i, g * sigmoid(g) * load(up + i));
    }
    for (; i < last; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
  }
};

struct Backward : Elementwise {
  const float *gate, *up, *dout;
  float *dgate, *dup;
  void block(int64_t first, int64_t last) override {
    int64_t i = first;
    for (; i + 16 <= last; i += 16) {
      const f32x16 g = load(gate + i), u = load(up + i), d = load(dout + i);
      const f32x16 s = sigmoid(g);
      store(dgate + i, d * u * s * (1.0f + g * (1.0f - s)));
      store(dup + i, d * g * s);
    }
    for (; i < last; ++i) {
      const float g = gate[i], s = sigmoid(g);
      dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
      dup[i] = dout[i] * g * s;
    }
  }
};

ffi::Error swiglu_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                          ffi::Buffer<ffi::F32> up, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t n = static_cast<int64_t>(gate.element_count());
  if (static_cast<int64_t>(up.element_count()) != n ||
      static_cast<int64_t>(out->element_count()) != n) {
    return ffi::Error::InvalidArgument("swiglu_forward: gate, up and out must have one size");
  }
  if (n == 0) return ffi::Error::Success();
  auto work = std::make_shared<Forward>();
  work->n = n;
  work->items = (n + kBlock - 1) / kBlock;
  work->gate = gate.typed_data();
  work->up = up.typed_data();
  work->out = out->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

ffi::Error swiglu_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                           ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dout,
                           ffi::ResultBuffer<ffi::F32> dgate, ffi::ResultBuffer<ffi::F32> dup) {
  const int64_t n = static_cast<int64_t>(gate.element_count());
  if (static_cast<int64_t>(up.element_count()) != n ||
      static_cast<int64_t>(dout.element_count()) != n ||
      static_cast<int64_t>(dgate->element_count()) != n ||
      static_cast<int64_t>(dup->element_count()) != n) {
    return ffi::Error::InvalidArgument(
        "swiglu_backward: gate, up, dout, dgate and dup must have one size");
  }
  if (n == 0) return ffi::Error::Success();
  auto work = std::make_shared<Backward>();
  work->n = n;
  work->items = (n + kBlock - 1) / kBlock;
  work->gate = gate.typed_data();
  work->up = up.typed_data();
  work->dout = dout.typed_data();
  work->dgate = dgate->typed_data();
  work->dup = dup->typed_data();
  run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaSwigluForward, swiglu_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasLlamaSwigluBackward, swiglu_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
